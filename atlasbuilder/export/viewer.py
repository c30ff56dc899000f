"""A local web viewer of an atlas: NiiVue in the browser, a small JSON API in Python.

``atlasbuilder view DIR`` serves, on 127.0.0.1 only, a page that shows the space's template with
the maximum probability map and any probability map as overlays, a region picker with the
hierarchy, the areas and probabilities at a clicked voxel (answered by :meth:`Atlas.query`, so the
page shows exactly what ``atlasbuilder query`` prints) and a box that jumps to a coordinate.

Routes (all GET)::

    /                                  the page (viewer_page/index.html)
    /static/<file>                     the page's script and style sheet
    /vendor/niivue.umd.js              the NiiVue bundle (fetched by scripts/fetch_viewer_assets.sh)
    /api/info                          atlas name, spaces, hierarchy, map regions, colours
    /api/query?x=&y=&z=[&space=]       regions and probabilities at a point (Atlas.query)
    /volumes/<space>/template.nii.gz   the template
    /volumes/<space>/mpm.nii.gz        the MPM (int32 region ids)
    /volumes/<space>/pmaps/<key>.nii.gz  one probability map (float32, 0..1)

The NiiVue bundle comes from npm at setup time (never from a CDN at run time); set
``ATLASBUILDER_NIIVUE`` to the path of another ``niivue.umd.js`` to use that one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import webbrowser
from collections import OrderedDict
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from ..atlas import Atlas, load_atlas
from ..errors import AtlasBuilderError, InputError, MissingFileError
from ..spaces import get_space

__all__ = ["PAGE_DIR", "ViewerServer", "make_viewer_server", "niivue_bundle", "serve_viewer"]

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).parent / "viewer_page"
_STATIC = {"viewer.js": "text/javascript", "viewer.css": "text/css"}
_CACHE_ITEMS = 6  # probability maps kept encoded in memory


def niivue_bundle() -> Path:
    """The NiiVue browser bundle the page loads.

    Raises
    ------
    MissingFileError
        The bundle is absent (run ``scripts/fetch_viewer_assets.sh``).
    """
    env = os.environ.get("ATLASBUILDER_NIIVUE")
    p = Path(env) if env else PAGE_DIR / "vendor" / "niivue.umd.js"
    if not p.is_file():
        raise MissingFileError(
            p, "NiiVue bundle of the web viewer (run scripts/fetch_viewer_assets.sh, which "
               "fetches @niivue/niivue from npm, or set ATLASBUILDER_NIIVUE)")
    return p


class ViewerState:
    """What the request handlers share: the atlas, encoded volumes, a lock around the store."""

    def __init__(self, atlas: Atlas, bundle: Path) -> None:
        self.atlas = atlas
        self.bundle = bundle
        self.lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def template_path(self, space: str) -> Path:
        doc = self.atlas.path / "spaces.json"
        if doc.is_file():
            for entry in json.loads(doc.read_text(encoding="utf-8")):
                if entry.get("name") == space and entry.get("template"):
                    p = Path(entry["template"])
                    p = p if p.is_absolute() else self.atlas.path / p
                    if p.is_file():
                        return p
        return get_space(space).template_path()

    def volume(self, space: str, what: str) -> bytes:
        """Encoded NIfTI bytes of ``mpm`` or ``pmaps/<key>``, kept in a small LRU cache."""
        from .nifti import nifti_bytes

        key = (space, what)
        with self.lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            sm = self.atlas.space_maps(space)
            if what == "mpm":
                ids = np.asarray(self.atlas.mpm(space).values)
                # NiiVue draws uint16 label images with its atlas shader (exact colours, 0 clear)
                dtype = np.uint16 if ids.min() >= 0 and ids.max() < 65536 else np.int32
                data = nifti_bytes(ids.astype(dtype), sm.grid, intent="label", compresslevel=1)
            else:
                region_key = what.removeprefix("pmaps/")
                pm = self.atlas.probability_map(region_key, space)
                data = nifti_bytes(np.asarray(pm.values, dtype=np.float32), sm.grid, compresslevel=1)
            self._cache[key] = data
            while len(self._cache) > _CACHE_ITEMS:
                self._cache.popitem(last=False)
            return data

    def info(self) -> dict[str, Any]:
        atlas = self.atlas
        spaces = []
        for s in atlas.spaces:
            sm = atlas.space_maps(s)
            spaces.append({"name": s, "mapped": [atlas.regions.get(i).key for i in sm.region_ids],
                           "shape": list(sm.grid.shape), "spacing": list(sm.grid.spacing),
                           "centre": [float(o + sp * (n - 1) / 2) for o, sp, n in
                                      zip(sm.grid.origin, sm.grid.spacing, sm.grid.shape,
                                          strict=True)]})

        def node(r: Any) -> dict[str, Any]:
            return {"id": r.id, "key": r.key, "name": r.name, "colour": r.colour,
                    "level": r.level, "children": [node(c) for c in atlas.regions.children(r)]}

        return {"name": atlas.name, "version": atlas.version, "spaces": spaces,
                "tree": [node(r) for r in atlas.regions.roots()]}

    def query(self, params: dict[str, list[str]]) -> dict[str, Any]:
        try:
            pt = [float(params[a][0]) for a in ("x", "y", "z")]
        except (KeyError, ValueError, IndexError):
            raise InputError("query needs numeric x, y and z parameters (mm)") from None
        if not all(math.isfinite(v) for v in pt):
            raise InputError("query coordinates must be finite")
        space = params.get("space", [None])[0]
        with self.lock:
            ans = self.atlas.query([pt], space, min_probability=0.0)[0]
            sm = self.atlas.space_maps(space)
            idx, inside = sm.grid.nearest_voxel(np.asarray([pt]))
            label = 0
            if inside[0]:
                label = int(self.atlas.mpm(space).values[tuple(idx[0])])
        ans["mpm"] = None
        if label:
            r = self.atlas.regions.get(label)
            ans["mpm"] = {"id": r.id, "key": r.key, "name": r.name, "colour": r.colour}
        for reg in ans["regions"]:
            reg["colour"] = self.atlas.regions.get(reg["id"]).colour
        ans["voxel"] = idx[0].tolist() if inside[0] else None
        return ans


class _Handler(BaseHTTPRequestHandler):
    server_version = "atlasbuilder-viewer"
    protocol_version = "HTTP/1.1"

    def __init__(self, *args: Any, state: ViewerState, **kwargs: Any) -> None:
        self.state = state
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str, *, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, doc: Any, status: int = 200) -> None:
        self._send(status, json.dumps(doc).encode("utf-8"), "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        try:
            self._route(path, parse_qs(url.query))
        except AtlasBuilderError as exc:
            self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a server thread must answer, not die; the message is logged
            log.exception("viewer request %s failed", path)
            self._json({"error": f"{type(exc).__name__}: {exc}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _route(self, path: str, params: dict[str, list[str]]) -> None:
        st = self.state
        if path in ("/", "/index.html"):
            self._send(200, (PAGE_DIR / "index.html").read_bytes(), "text/html; charset=utf-8")
        elif path.startswith("/static/") and path[8:] in _STATIC:
            self._send(200, (PAGE_DIR / path[8:]).read_bytes(), _STATIC[path[8:]])
        elif path == "/vendor/niivue.umd.js":
            self._send(200, st.bundle.read_bytes(), "text/javascript", cache=True)
        elif path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        elif path == "/api/info":
            self._json(st.info())
        elif path == "/api/query":
            self._json(st.query(params))
        elif m := re.fullmatch(r"/volumes/([^/]+)/(template|mpm|pmaps/[A-Za-z0-9_.\-]+)\.nii\.gz",
                               path):
            space = st.atlas.space_maps(m.group(1)).space
            if m.group(2) == "template":
                tp = st.template_path(space)
                body = tp.read_bytes()
                if not tp.name.endswith(".gz"):
                    import gzip

                    body = gzip.compress(body, compresslevel=1, mtime=0)
                self._send(200, body, "application/gzip", cache=True)
            else:
                self._send(200, st.volume(space, m.group(2)), "application/gzip")
        else:
            self._json({"error": f"no such page: {path}"}, HTTPStatus.NOT_FOUND)


class ViewerServer(ThreadingHTTPServer):
    """The viewer's HTTP server (threaded; bound to 127.0.0.1)."""

    daemon_threads = True
    state: ViewerState

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/"


def make_viewer_server(atlas_dir: str | Path | Atlas, port: int = 8765) -> ViewerServer:
    """Create (but do not start) the viewer's server for an atlas on 127.0.0.1.

    Parameters
    ----------
    atlas_dir
        Atlas directory (or an opened :class:`~atlasbuilder.Atlas`) with maps.
    port
        TCP port; 0 picks a free one (see :attr:`ViewerServer.url`).

    Raises
    ------
    MissingFileError
        The NiiVue bundle is missing.
    AtlasDirectoryError
        Not an atlas directory, or one without maps.
    InputError
        The port is out of range or already in use.
    """
    atlas = atlas_dir if isinstance(atlas_dir, Atlas) else load_atlas(atlas_dir)
    atlas.space_maps()  # an atlas without maps has nothing to show: say so now
    bundle = niivue_bundle()
    if not 0 <= int(port) <= 65535:
        raise InputError(f"port must be within 0..65535, got {port}")
    state = ViewerState(atlas, bundle)
    try:
        server = ViewerServer(("127.0.0.1", int(port)), partial(_Handler, state=state))
    except OSError as exc:
        raise InputError(f"cannot serve on 127.0.0.1:{port} ({exc.strerror}); try --port") from None
    server.state = state
    return server


def serve_viewer(atlas_dir: str | Path | Atlas, port: int = 8765, open_browser: bool = True) -> None:
    """Serve the web viewer of an atlas on ``http://127.0.0.1:<port>/`` until interrupted.

    Parameters
    ----------
    atlas_dir
        Atlas directory (or an opened atlas).
    port
        TCP port on 127.0.0.1 (0 picks a free one).
    open_browser
        Open the page in the default browser once the server listens.

    Raises
    ------
    MissingFileError, AtlasDirectoryError, InputError
        See :func:`make_viewer_server`.
    """
    server = make_viewer_server(atlas_dir, port)
    print(f"atlas viewer of {server.state.atlas.name!r} at {server.url} (Ctrl+C stops it)", flush=True)
    if open_browser:
        threading.Timer(0.3, webbrowser.open, args=(server.url,)).start()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
