"""The built atlas: one self-describing directory, opened lazily, queried by coordinate.

Layout of an atlas directory::

    atlas.json        what this is: name, version, format, spaces, map order, encodings
    regions.json      the region hierarchy (see atlasbuilder.regions)
    spaces.json       the spaces and their template files
    provenance.json   inputs (with SHA-256), parameters, package versions, timings
    store.zarr/       one group per space:
        <space>/pmaps   (region, x, y, z) probability maps, chunked; uint8 percent or float
        <space>/mpm     (x, y, z) maximum probability map: region id, 0 = no region
        <space>/region, x, y, z   coordinates (region ids; voxel centres in RAS mm)

Probabilities are stored compactly; ``encoding.divisor`` turns a stored value into a probability
(100 for uint8 percent, 1 for float storage), so a lookup returns exactly ``value / divisor``.

Example
-------
>>> atlas = load_atlas("juelich-atlas")                         # doctest: +SKIP
>>> atlas.query([[-10, -90, 0]])[0]["regions"][0]["key"]         # doctest: +SKIP
'hOc1_left'
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import AtlasDirectoryError, InputError, MissingFileError
from .regions import Region, RegionTree, load_hierarchy
from .spaces import get_space
from .volumes import Grid

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Atlas",
    "load_atlas",
    "write_atlas_metadata",
    "write_space_maps",
]

FORMAT = "atlasbuilder-atlas"
FORMAT_VERSION = 1
CHUNK = 32  # spatial chunk edge (voxels) of the stored maps
DEFAULT_MIN_PROBABILITY = 0.05


@dataclass(frozen=True)
class SpaceMaps:
    """What the store holds for one space: grid, map order, encoding."""

    space: str
    grid: Grid
    region_ids: tuple[int, ...]
    dtype: str
    divisor: float


def write_space_maps(
    store: Path,
    space: str,
    pmaps: np.ndarray,
    grid: Grid,
    region_ids: Sequence[int],
    *,
    divisor: float,
    mpm: np.ndarray | None = None,
) -> SpaceMaps:
    """Write one space's probability maps (``region, x, y, z``, already encoded) and MPM.

    ``pmaps`` must already be in its storage dtype (uint8 percent with ``divisor=100`` or float
    with ``divisor=1``). Writes go into ``store`` (a zarr directory), which callers create inside
    an :func:`~atlasbuilder.storage.atomic_directory`.
    """
    import zarr

    pmaps = np.ascontiguousarray(pmaps)  # region-first chunks write from a contiguous array
    if pmaps.ndim != 4 or pmaps.shape[1:] != grid.shape:
        raise InputError(f"pmaps shape {pmaps.shape} does not match (region, {grid.shape})")
    if len(region_ids) != pmaps.shape[0]:
        raise InputError(f"{len(region_ids)} region ids for {pmaps.shape[0]} maps")
    root = zarr.open_group(str(store), mode="a")
    grp = root.create_group(space, overwrite=True)
    grp.attrs.update({"space": space, "divisor": divisor, "dtype": str(pmaps.dtype)})
    chunks = (pmaps.shape[0], *(min(CHUNK, n) for n in grid.shape))
    arr = grp.create_array("pmaps", shape=pmaps.shape, dtype=pmaps.dtype, chunks=chunks,
                           dimension_names=("region", "x", "y", "z"), fill_value=0)
    arr[...] = pmaps
    if mpm is None:
        mpm = simple_mpm(pmaps, region_ids)
    m = grp.create_array("mpm", shape=grid.shape, dtype="int32", chunks=chunks[1:],
                         dimension_names=("x", "y", "z"), fill_value=0)
    m[...] = mpm.astype(np.int32)
    for ax, values in grid.coords().items():
        c = grp.create_array(ax, shape=values.shape, dtype="float64", dimension_names=(ax,))
        c[...] = values
    r = grp.create_array("region", shape=(len(region_ids),), dtype="int32",
                         dimension_names=("region",))
    r[...] = np.asarray(region_ids, dtype=np.int32)
    return SpaceMaps(space, grid, tuple(int(i) for i in region_ids), str(pmaps.dtype),
                     float(divisor))


def simple_mpm(pmaps: np.ndarray, region_ids: Sequence[int]) -> np.ndarray:
    """Maximum probability map: the id of the most probable region; 0 where all are zero.

    Ties go to the region that comes first in map order (deterministic). This is the rule for
    imported atlases; built atlases use the neighbourhood tie-break of the aggregation stage.
    """
    ids = np.asarray(region_ids, dtype=np.int32)
    best = np.zeros(pmaps.shape[1:], dtype=np.int32)
    top = np.array(pmaps[0], copy=True)
    # a running maximum (one pass per region) is much faster than argmax over a leading axis
    for r in range(1, pmaps.shape[0]):
        better = pmaps[r] > top  # strict: ties keep the earlier region
        best[better] = r
        np.maximum(top, pmaps[r], out=top)
    return np.where(top > 0, ids[best], 0).astype(np.int32)


def write_atlas_metadata(
    directory: Path,
    *,
    name: str,
    version: str,
    regions: RegionTree,
    spaces: Iterable[SpaceMaps],
    space_templates: dict[str, str | None] | None = None,
    reference_spaces: Sequence[str] = (),
    provenance: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``atlas.json``, ``regions.json``, ``spaces.json`` and ``provenance.json``.

    ``spaces.json`` lists the spaces with maps and any further ``reference_spaces`` (a build
    names its target spaces before it has maps in them).
    """
    from . import __version__
    from .storage import atomic_write_text

    space_list = list(spaces)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created_by": f"atlasbuilder {__version__}",
        "spaces": {
            s.space: {
                "shape": list(s.grid.shape),
                "origin_mm": list(s.grid.origin),
                "spacing_mm": list(s.grid.spacing),
                "regions": [regions.get(i).key for i in s.region_ids],
                "encoding": {"dtype": s.dtype, "divisor": s.divisor},
            }
            for s in space_list
        },
    }
    meta.update(extra or {})
    regions.to_json(directory / "regions.json")
    templates = space_templates or {}
    spaces_doc = []
    names = list(dict.fromkeys([*(s.space for s in space_list), *reference_spaces]))
    for sname in names:
        try:
            sp = get_space(sname)
            desc, kind = sp.description, sp.kind
        except InputError:
            desc, kind = "", "reference"
        spaces_doc.append({"name": sname, "description": desc, "kind": kind,
                           "has_maps": sname in meta["spaces"],
                           "template": templates.get(sname)})
    atomic_write_text(directory / "spaces.json", json.dumps(spaces_doc, indent=1))
    atomic_write_text(directory / "provenance.json",
                      json.dumps(provenance or {}, indent=1, default=str))
    # atlas.json last: its presence marks a complete directory
    atomic_write_text(directory / "atlas.json", json.dumps(meta, indent=1))


class Atlas:
    """A built or imported atlas directory, opened lazily (maps are read when queried).

    Use :func:`load_atlas` to open one.
    """

    def __init__(self, path: Path, meta: dict[str, Any], regions: RegionTree) -> None:
        self.path = path
        self.meta = meta
        self.regions = regions
        self.name: str = meta.get("name", path.name)
        self.version: str = str(meta.get("version", ""))
        self._spaces: dict[str, SpaceMaps] = {}
        for sname, s in meta.get("spaces", {}).items():
            ids = tuple(regions.get(k).id for k in s["regions"])
            grid = Grid(tuple(s["shape"]), tuple(s["origin_mm"]), tuple(s["spacing_mm"]))
            self._spaces[sname] = SpaceMaps(sname, grid, ids, s["encoding"]["dtype"],
                                            float(s["encoding"]["divisor"]))

    def __repr__(self) -> str:
        return (f"Atlas({self.name!r}, spaces={self.spaces}, "
                f"{len(self.regions.leaves())} leaf regions, path={str(self.path)!r})")

    # -- description ------------------------------------------------------------------------
    @property
    def spaces(self) -> list[str]:
        """Spaces with probability maps, the primary (default) space first."""
        return list(self._spaces)

    @property
    def provenance(self) -> dict[str, Any]:
        p = self.path / "provenance.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def space_maps(self, space: str | None = None) -> SpaceMaps:
        """Storage description of one space (``None`` = the primary space).

        Raises
        ------
        UnknownSpaceError
            The name is no known space.
        AtlasDirectoryError
            The atlas has no maps in that space (or none at all).
        """
        if not self._spaces:
            raise AtlasDirectoryError(
                f"{self.path}: the atlas has no probability maps yet (the aggregation stage "
                "has not run)"
            )
        if space is None:
            return next(iter(self._spaces.values()))
        canonical = get_space(space).name
        if canonical not in self._spaces:
            raise AtlasDirectoryError(
                f"{self.path}: no maps in space {canonical!r}; this atlas has {self.spaces}"
            )
        return self._spaces[canonical]

    def map_regions(self, space: str | None = None) -> list[Region]:
        """The regions of the stored maps, in map order."""
        return [self.regions.get(i) for i in self.space_maps(space).region_ids]

    # -- lazy access to the store --------------------------------------------------------------
    @cached_property
    def _zarr_root(self) -> Any:
        import zarr

        store = self.path / "store.zarr"
        if not store.is_dir():
            raise AtlasDirectoryError(f"{self.path}: store.zarr is missing (incomplete atlas)")
        return zarr.open_group(str(store), mode="r")

    def _array(self, space: str, name: str) -> Any:
        try:
            return self._zarr_root[f"{space}/{name}"]
        except KeyError:
            raise AtlasDirectoryError(
                f"{self.path}: store.zarr has no {space}/{name} (incomplete atlas)"
            ) from None

    def maps(self, space: str | None = None) -> xr.Dataset:
        """The stored maps of a space as a lazy :class:`xarray.Dataset` (nothing read yet).

        ``pmaps`` holds the stored (encoded) values; divide by ``attrs["divisor"]`` for
        probabilities, or use :meth:`probability_map`.
        """
        import xarray as xr

        sm = self.space_maps(space)
        ds = xr.open_zarr(self.path / "store.zarr", group=sm.space, consolidated=False,
                          chunks=None)
        ds.attrs["space"] = sm.space
        return ds

    def probability_map(self, region: int | str | Region, space: str | None = None) -> xr.DataArray:
        """One region's probability map (float32, 0..1), read on demand.

        Raises
        ------
        UnknownRegionError
            No such region, or the region has no map (a parent: use its leaves).
        """
        from .errors import UnknownRegionError
        from .volumes import from_array

        sm = self.space_maps(space)
        r = self.regions.get(region)
        if r.id not in sm.region_ids:
            raise UnknownRegionError(
                f"region {r.key!r} has no map of its own in space {sm.space!r}",
                [x.key for x in self.regions.leaves(r) if x.id in sm.region_ids][:5],
            )
        i = sm.region_ids.index(r.id)
        data = np.asarray(self._array(sm.space, "pmaps")[i], dtype=np.float32) / np.float32(
            sm.divisor)
        ds = from_array(data, sm.grid, sm.space, name=r.key, source=str(self.path))
        return ds[r.key]

    def mpm(self, space: str | None = None) -> xr.DataArray:
        """The maximum probability map (region ids; 0 = no region)."""
        from .volumes import from_array

        sm = self.space_maps(space)
        data = np.asarray(self._array(sm.space, "mpm")[...])
        return from_array(data, sm.grid, sm.space, name="mpm", source=str(self.path))["mpm"]

    # -- point queries ---------------------------------------------------------------------------
    def probabilities_at(self, points_mm: Any, space: str | None = None) -> xr.DataArray:
        """Probability of every mapped region at each point (nearest voxel, bounds checked).

        Parameters
        ----------
        points_mm
            ``(n, 3)`` or ``(3,)`` coordinates, RAS mm, in ``space``.
        space
            Space of the points (default: the atlas's primary space).

        Returns
        -------
        xarray.DataArray
            dims ``("point", "region")``, float64 probabilities ``stored value / divisor``;
            coords ``region`` (ids), ``key``, ``inside`` (per point). Rows of points outside
            the volume are NaN and ``inside`` is False.

        Raises
        ------
        InputError
            Points are not numeric or not of shape (n, 3).
        """
        import xarray as xr

        sm = self.space_maps(space)
        pts = _as_points(points_mm)
        values, inside = self._lookup(sm, pts)
        probs = values.astype(np.float64) / sm.divisor
        probs[~inside] = np.nan
        keys = [self.regions.get(i).key for i in sm.region_ids]
        return xr.DataArray(
            probs, dims=("point", "region"),
            coords={"region": list(sm.region_ids), "key": ("region", keys),
                    "inside": ("point", inside), "x": ("point", pts[:, 0]),
                    "y": ("point", pts[:, 1]), "z": ("point", pts[:, 2])},
            attrs={"space": sm.space},
        )

    def _lookup(self, sm: SpaceMaps, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored values at the points' nearest voxels, read chunk by chunk."""
        idx, inside = sm.grid.nearest_voxel(pts)
        arr = self._array(sm.space, "pmaps")
        n_reg = len(sm.region_ids)
        out = np.zeros((len(pts), n_reg), dtype=arr.dtype)
        if not inside.any():
            return out, inside
        sel = np.flatnonzero(inside)
        cidx = idx[sel] // np.asarray(arr.chunks[1:])
        # one read per touched chunk: sort points by chunk, then slice each run
        nch = np.asarray([-(-n // c) for n, c in zip(arr.shape[1:], arr.chunks[1:], strict=True)])
        flat = np.ravel_multi_index(cidx.T, nch)
        order = np.argsort(flat, kind="stable")
        flat_sorted = flat[order]
        starts = np.flatnonzero(np.r_[True, flat_sorted[1:] != flat_sorted[:-1]])
        ends = np.r_[starts[1:], len(flat_sorted)]
        cs = np.asarray(arr.chunks[1:])
        for s, e in zip(starts, ends, strict=True):
            members = sel[order[s:e]]
            c = np.asarray(np.unravel_index(flat_sorted[s], nch))
            lo = c * cs
            hi = np.minimum(lo + cs, arr.shape[1:])
            block = arr[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            local = idx[members] - lo
            out[members] = block[:, local[:, 0], local[:, 1], local[:, 2]].T
        return out, inside

    def _hits(
        self, points_mm: Any, space: str | None, min_probability: float
    ) -> tuple[SpaceMaps, np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """Per point, the map columns at or above ``min_probability`` and their probabilities,
        sorted by probability (descending; ties in map order). Vectorised over all points."""
        if not 0 <= min_probability <= 1:
            raise InputError(f"min_probability must be within 0..1, got {min_probability}")
        sm = self.space_maps(space)
        pts = _as_points(points_mm)
        values, inside = self._lookup(sm, pts)
        rows, cols = np.nonzero(values)  # only non-zero entries matter (sparse in practice)
        probs = values[rows, cols].astype(np.float64) / sm.divisor
        keep = probs >= min_probability
        rows, cols, probs = rows[keep], cols[keep], probs[keep]
        order = np.lexsort((cols, -probs, rows))
        rows, cols, probs = rows[order], cols[order], probs[order]
        bounds = np.searchsorted(rows, np.arange(len(pts) + 1))
        col_lists = np.split(cols, bounds[1:-1])
        prob_lists = np.split(probs, bounds[1:-1])
        return sm, pts, inside, col_lists, prob_lists

    def query(
        self,
        points_mm: Any,
        space: str | None = None,
        *,
        min_probability: float = DEFAULT_MIN_PROBABILITY,
    ) -> list[dict[str, Any]]:
        """Regions at each point as plain dicts (what ``atlasbuilder query --json`` prints).

        Each answer is ``{"space", "point", "regions": [{"id", "key", "name", "probability"}]}``
        with regions sorted by probability (descending; ties by map order) and those below
        ``min_probability`` (or zero) left out; a point outside the volume has ``"regions": []``
        and ``"outside": true``.

        Raises
        ------
        InputError
            Bad points or a threshold outside 0..1.
        """
        sm, pts, inside, col_lists, prob_lists = self._hits(points_mm, space, min_probability)
        regs = [self.regions.get(i) for i in sm.region_ids]
        info = [{"id": r.id, "key": r.key, "name": r.name} for r in regs]
        out: list[dict[str, Any]] = []
        for n, (cols, probs) in enumerate(zip(col_lists, prob_lists, strict=True)):
            ans: dict[str, Any] = {"space": sm.space, "point": pts[n].tolist()}
            if inside[n]:
                ans["regions"] = [dict(info[c], probability=p)
                                  for c, p in zip(cols.tolist(), probs.tolist(), strict=True)]
            else:
                ans["regions"] = []
                ans["outside"] = True
            out.append(ans)
        return out

    def query_json_lines(
        self,
        points_mm: Any,
        space: str | None = None,
        *,
        min_probability: float = DEFAULT_MIN_PROBABILITY,
    ) -> str:
        """:meth:`query` serialised as JSON Lines (one object per point), built without the
        intermediate dicts so that 10^5 points print in a fraction of a second."""
        sm, pts, inside, col_lists, prob_lists = self._hits(points_mm, space, min_probability)
        regs = [self.regions.get(i) for i in sm.region_ids]
        frag = [json.dumps({"id": r.id, "key": r.key, "name": r.name})[:-1] + ', "probability": '
                for r in regs]
        head = '{"space": ' + json.dumps(sm.space) + ', "point": ['
        lines = []
        for n, (cols, probs) in enumerate(zip(col_lists, prob_lists, strict=True)):
            x, y, z = pts[n].tolist()
            if inside[n]:
                regions = ", ".join(frag[c] + repr(p) + "}"
                                    for c, p in zip(cols.tolist(), probs.tolist(), strict=True))
                lines.append(f"{head}{x!r}, {y!r}, {z!r}], \"regions\": [{regions}]}}\n")
            else:
                lines.append(f"{head}{x!r}, {y!r}, {z!r}], \"regions\": [], \"outside\": true}}\n")
        return "".join(lines)


def _as_points(points_mm: Any) -> np.ndarray:
    try:
        pts = np.asarray(points_mm, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("points must be numeric (x, y, z) coordinates in mm") from None
    if pts.ndim == 1 and pts.size == 3:
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"points must have shape (n, 3); got {pts.shape}")
    if not np.isfinite(pts).all():
        bad = int(np.flatnonzero(~np.isfinite(pts).all(axis=1))[0])
        raise InputError(f"point {bad} has a NaN or infinite coordinate: {pts[bad].tolist()}")
    return pts


def load_atlas(path: str | Path) -> Atlas:
    """Open an atlas directory lazily (only the small JSON files are read now).

    Raises
    ------
    MissingFileError
        The directory does not exist.
    AtlasDirectoryError
        It is not an atlas directory, is incomplete, or has an unknown format version.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(path, "atlas directory")
    if not path.is_dir():
        raise AtlasDirectoryError(f"{path}: not a directory (expected an atlas directory)")
    meta_path = path / "atlas.json"
    if not meta_path.is_file():
        raise AtlasDirectoryError(
            f"{path}: no atlas.json (not an atlas directory, or a build that has not finished)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AtlasDirectoryError(f"{meta_path}: not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise AtlasDirectoryError(f"{meta_path}: not an atlasbuilder atlas (format field)")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise AtlasDirectoryError(
            f"{meta_path}: format version {meta.get('format_version')} is newer than this "
            f"atlasbuilder understands ({FORMAT_VERSION}); upgrade atlasbuilder"
        )
    regions_path = path / "regions.json"
    if not regions_path.is_file():
        raise AtlasDirectoryError(f"{path}: regions.json is missing (incomplete atlas)")
    regions = load_hierarchy(regions_path)
    return Atlas(path, meta, regions)
