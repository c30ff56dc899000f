"""The atlas report: one self-contained HTML page (``<atlas>/report.html``) a user can open offline.

Sections, each present only when the atlas holds what it shows:

* **Overview** — name, version, spaces and grids, provenance (inputs, versions) and the build's
  stage table;
* **Maps** per space — the maximum probability map over the template (nilearn), a montage of
  slices, each area's probability map at its peak, entropy and coverage when the build stored
  them;
* **Regions** — the hierarchy with MPM volumes and probability-weighted volumes per space;
* **Variability** (``<atlas>/stats/*.csv``, written by the aggregation stage) — volumes per brain
  and hemisphere, individual centroids around the group centroid, the inter-brain Dice matrix and
  the leave-one-brain-out cross-validation curve;
* **Quality control** — every PNG under ``<atlas>/brains/*/`` (segmentation, reconstruction and
  registration QA), captioned from a sibling JSON file (``caption``/``title``/``description``) when
  there is one.

Figures are PNG images embedded as base64 (matplotlib's Agg backend), so the file can be mailed
or archived alone.

Example
-------
>>> write_report("juelich")                                  # doctest: +SKIP
PosixPath('juelich/report.html')
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atlas import Atlas, load_atlas
from .errors import InputError
from .regions import Region
from .spaces import get_space
from .storage import atomic_write_text

if TYPE_CHECKING:
    import nibabel as nib
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["MAX_PMAP_PANELS", "write_report"]

log = logging.getLogger(__name__)

MAX_PMAP_PANELS = 24  # probability-map panels per space (the largest areas when there are more)
MAX_QA_IMAGES = 60
DPI = 90


# -- small helpers -----------------------------------------------------------------------------
def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _png(fig: Figure) -> str:
    """The figure as a ``data:`` URI (and closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor=fig.get_facecolor())
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(fig_id: str, uri: str, caption: str) -> str:
    return (f'<figure id="{_esc(fig_id)}" class="fig"><img alt="{_esc(caption)}" src="{uri}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _fmt(v: object, digits: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    return _esc(v)


def _duration(seconds: float) -> str:
    """``12.3 s``, ``4 min 05 s``; under 0.1 s (a stage taken from the cache): ``< 0.1 s``."""
    if seconds < 0.1:
        return "&lt; 0.1 s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    total = round(seconds)
    return f"{total // 60} min {total % 60:02d} s"


def _swatch(colour: str) -> str:
    return f'<span class="sw" style="background:{_esc(colour)}"></span>'


def _hex_rgb(colour: str) -> tuple[float, float, float]:
    c = colour.lstrip("#")
    if len(c) != 6:
        return (0.5, 0.5, 0.5)
    return tuple(int(c[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


# -- data access -------------------------------------------------------------------------------
def _template_image(atlas: Atlas, space: str) -> nib.Nifti1Image | None:
    """The space's template as a nibabel image, or None when it has none."""
    import nibabel as nib

    doc = atlas.path / "spaces.json"
    candidates: list[Path] = []
    if doc.is_file():
        for entry in json.loads(doc.read_text(encoding="utf-8")):
            if entry.get("name") == space and entry.get("template"):
                p = Path(entry["template"])
                candidates.append(p if p.is_absolute() else atlas.path / p)
    try:
        candidates.append(get_space(space).template_path())
    except InputError:
        pass
    for p in candidates:
        if p.is_file():
            img = nib.load(str(p))
            if isinstance(img, nib.Nifti1Image):
                return img
    return None


def _image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    import nibabel as nib

    return nib.Nifti1Image(np.asarray(data), affine)


def _region_sums(atlas: Atlas, space: str) -> np.ndarray:
    """Sum of stored probability values per mapped region, read in z slabs (bounded memory)."""
    da = atlas.maps(space)["pmaps"]
    n_z = da.sizes["z"]
    step = max(1, int(2e8 // max(1, da.sizes["region"] * da.sizes["x"] * da.sizes["y"])))
    total = np.zeros(da.sizes["region"], dtype=np.float64)
    for z0 in range(0, n_z, step):
        block = np.asarray(da.isel(z=slice(z0, z0 + step)).values)
        total += block.reshape(block.shape[0], -1).sum(axis=1, dtype=np.float64)
    return total


def _volumes(atlas: Atlas) -> dict[str, dict[int, tuple[float, float]]]:
    """space -> region id -> (MPM volume, probability-weighted volume) in mm³, leaves only."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for s in atlas.spaces:
        sm = atlas.space_maps(s)
        vv = float(abs(np.prod(sm.grid.spacing)))
        mpm = np.asarray(atlas.mpm(s).values).ravel()
        ids, counts = np.unique(mpm[mpm > 0], return_counts=True)
        cnt = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        sums = _region_sums(atlas, s) / sm.divisor
        out[s] = {rid: (cnt.get(rid, 0) * vv, float(sums[i]) * vv)
                  for i, rid in enumerate(sm.region_ids)}
    return out


# -- sections ----------------------------------------------------------------------------------
def _overview(atlas: Atlas) -> str:
    meta = atlas.meta
    prov = atlas.provenance
    rows = []
    for s in atlas.spaces:
        sm = atlas.space_maps(s)
        enc = f"{sm.dtype} / {sm.divisor:g}"
        rows.append((_esc(s), "×".join(str(n) for n in sm.grid.shape),
                     " × ".join(f"{v:g}" for v in sm.grid.spacing) + " mm",
                     len(sm.region_ids), _esc(enc)))
    leaves = atlas.regions.leaves()
    parts = [
        '<section id="overview"><h2>Overview</h2>',
        '<dl class="facts">',
        f"<dt>atlas</dt><dd>{_esc(atlas.name)} {_esc(atlas.version)}</dd>",
        f"<dt>written by</dt><dd>{_esc(meta.get('created_by', ''))}</dd>",
        f"<dt>directory</dt><dd><code>{_esc(atlas.path.absolute())}</code></dd>",
        f"<dt>regions</dt><dd>{len(list(atlas.regions))} in the hierarchy, {len(leaves)} leaves</dd>",
    ]
    if prov.get("created"):
        parts.append(f"<dt>built</dt><dd>{_esc(prov['created'])}"
                     + (f" in {prov['seconds']:.0f} s" if isinstance(prov.get("seconds"), int | float)
                        else "") + "</dd>")
    if prov.get("command"):
        parts.append(f"<dt>command</dt><dd><code>atlasbuilder {_esc(prov['command'])}</code>"
                     + (" (quick)" if prov.get("quick") else "") + "</dd>")
    parts.append("</dl>")
    parts.append("<h3>Spaces</h3>")
    parts.append(_table(("space", "grid", "voxel", "maps", "storage (dtype / divisor)"), rows))
    parts.append(_provenance(prov))
    parts.append("</section>")
    return "".join(parts)


def _provenance(prov: dict[str, Any]) -> str:
    if not prov:
        return "<p class='muted'>No provenance recorded.</p>"
    out = []
    stages = prov.get("stages")
    if isinstance(stages, list) and stages:
        recorded = prov.get("units")
        units: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
        rows = []
        for st in stages:
            if not isinstance(st, dict):
                continue
            status = str(st.get("status", ""))
            # what the stage's units cost when they were computed (in this build or an earlier one)
            work = [float(u.get("computed_seconds", u.get("seconds", 0.0)) or 0.0)
                    for u in units.get(str(st.get("name")), []) if isinstance(u, dict)]
            rows.append((f"<b>{_esc(st.get('name', ''))}</b>",
                         f'<span class="status {_esc(status)}">{_esc(status)}</span>',
                         _duration(float(st.get("seconds", 0.0))),
                         _duration(sum(work)) if work else "–",
                         _esc(st.get("items", "")), _esc(st.get("units", "")),
                         _esc(st.get("cache_hits", "")), _esc(st.get("note", ""))))
        out.append('<h3 id="stages">Build stages</h3>')
        out.append("<p class='muted'>time: wall time of the stage in this build (a stage taken from "
                   "the cache takes none); work: the sum of its units' compute times, in whichever "
                   "build computed them (units run in parallel, so work can exceed time).</p>")
        out.append(_table(("stage", "status", "time", "work", "items", "units", "cached", "note"),
                          rows, "stages"))
    inputs = prov.get("inputs")
    if isinstance(inputs, dict) and inputs:
        rows2: list[tuple[str, str]] = []
        for k, v in inputs.items():
            if isinstance(v, dict):
                desc = " ".join(f"{_esc(a)}: <code>{_esc(b)}</code>" for a, b in v.items())
            else:
                desc = _esc(v)
            rows2.append((_esc(k), desc))
        out.append("<h3>Inputs</h3>" + _table(("input", "what"), rows2))
    versions = prov.get("versions")
    if isinstance(versions, dict) and versions:
        rows3 = [(_esc(k), _esc(v)) for k, v in versions.items()]
        out.append("<details><summary>Package versions</summary>"
                   + _table(("package", "version"), rows3) + "</details>")
    rest = {k: v for k, v in prov.items()
            if k not in {"stages", "inputs", "versions", "parameters", "units"}}
    if rest:
        out.append("<details><summary>All provenance fields</summary><pre>"
                   + _esc(json.dumps(rest, indent=1, default=str)) + "</pre></details>")
    if "parameters" in prov:
        out.append("<details><summary>Parameters</summary><pre>"
                   + _esc(json.dumps(prov["parameters"], indent=1, default=str)) + "</pre></details>")
    return "".join(out)


def _display_colours(regions: Sequence[Region]) -> dict[str, str]:
    """Colour per region key for figures: the hierarchy's colours when they tell the regions
    apart, else a qualitative palette (sibling areas often get near-identical shades)."""
    rgb = np.array([_hex_rgb(r.colour) for r in regions])
    if len(rgb) > 1:
        d = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        distinct = float(d.min()) >= 0.15
    else:
        distinct = True
    if distinct:
        return {r.key: r.colour for r in regions}
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10" if len(regions) <= 10 else "tab20"]
    return {r.key: to_hex(cmap(i % cmap.N)) for i, r in enumerate(regions)}


def _label_cmap(regions: Sequence[Region], colours: dict[str, str]) -> Any:
    from matplotlib.colors import ListedColormap

    return ListedColormap([_hex_rgb(colours[r.key]) for r in regions])


def _mpm_figures(atlas: Atlas, space: str, template: nib.Nifti1Image | None) -> list[str]:
    """MPM over the template: orthogonal views at the MPM's centre and an axial montage."""
    import matplotlib.pyplot as plt
    from nilearn import plotting

    sm = atlas.space_maps(space)
    regions = atlas.map_regions(space)
    mpm = np.asarray(atlas.mpm(space).values)
    order = np.zeros(int(max(sm.region_ids)) + 1, dtype=np.int32)
    for n, rid in enumerate(sm.region_ids, start=1):
        order[rid] = n
    dense = np.where(mpm > 0, order[np.clip(mpm, 0, len(order) - 1)], 0).astype(np.int16)
    img = _image(dense, sm.grid.affine)
    colours = _display_colours(regions)
    cmap = _label_cmap(regions, colours)
    bg: Any = template if template is not None else False
    figs = []
    vox = np.argwhere(dense > 0)
    if len(vox) == 0:
        return [f"<p class='muted'>The MPM of {_esc(space)} is empty.</p>"]
    centre = sm.grid.affine[:3, :3] @ vox.mean(axis=0) + sm.grid.affine[:3, 3]
    fig = plt.figure(figsize=(10, 3.6), facecolor="black")
    plotting.plot_roi(img, bg_img=bg, cut_coords=tuple(centre), display_mode="ortho", cmap=cmap,
                      vmin=0.5, vmax=len(regions) + 0.5, alpha=0.75, figure=fig, black_bg=True,
                      resampling_interpolation="nearest", draw_cross=False, colorbar=False,
                      title=f"MPM · {space}")
    figs.append(_figure(f"mpm-{space}", _png(fig),
                        f"Maximum probability map over the {space} template, at its centre "
                        f"({centre[0]:.0f}, {centre[1]:.0f}, {centre[2]:.0f}) mm."))
    zs = vox[:, 2]
    ks = np.unique(np.linspace(np.percentile(zs, 5), np.percentile(zs, 95), 7).round().astype(int))
    cuts = [float(sm.grid.origin[2] + sm.grid.spacing[2] * k) for k in ks]
    fig = plt.figure(figsize=(12, 2.6), facecolor="black")
    plotting.plot_roi(img, bg_img=bg, cut_coords=cuts, display_mode="z", cmap=cmap,
                      vmin=0.5, vmax=len(regions) + 0.5, alpha=0.75, figure=fig, black_bg=True,
                      resampling_interpolation="nearest", colorbar=False)
    figs.append(_figure(f"mpm-montage-{space}", _png(fig),
                        f"Axial slices through the MPM in {space} (z = "
                        + ", ".join(f"{c:.0f}" for c in cuts) + " mm)."))
    present = set(np.unique(mpm).tolist())
    legend = "".join(f'<li>{_swatch(colours[r.key])}{_esc(r.name)} <code>{_esc(r.key)}</code></li>'
                     for r in regions if r.id in present)
    figs.append(f'<ul class="legend">{legend}</ul>')
    return figs


def _template_slice(template: nib.Nifti1Image | None, data: np.ndarray | None, grid: Any,
                    k: int) -> np.ndarray:
    """The template sampled (nearest voxel) at the centres of the atlas grid's axial slice ``k``,
    so a map and its underlay share pixels whatever the two grids are."""
    if template is None or data is None:
        return np.zeros(grid.shape[:2], dtype=np.float32)
    c = grid.coords()
    xx, yy = np.meshgrid(c["x"], c["y"], indexing="ij")
    pts = np.stack([xx, yy, np.full_like(xx, c["z"][k]), np.ones_like(xx)], axis=-1)
    vox = np.floor(pts @ np.linalg.inv(template.affine).T + 0.5).astype(np.int64)[..., :3]
    inside = np.all((vox >= 0) & (vox < np.asarray(data.shape[:3])), axis=-1)
    out = np.zeros(grid.shape[:2], dtype=np.float32)
    v = vox[inside]
    out[inside] = data[v[:, 0], v[:, 1], v[:, 2]]
    return out


def _pmap_figure(atlas: Atlas, space: str, template: nib.Nifti1Image | None,
                 volumes: dict[int, tuple[float, float]]) -> str:
    """One panel per area: its probability map over the template at the axial slice of its
    peak (drawn directly with matplotlib: one nilearn figure per area would be slow)."""
    import matplotlib.pyplot as plt

    sm = atlas.space_maps(space)
    regions = atlas.map_regions(space)
    chosen = list(range(len(regions)))
    note = ""
    if len(chosen) > MAX_PMAP_PANELS:
        chosen = sorted(chosen, key=lambda i: -volumes[regions[i].id][1])[:MAX_PMAP_PANELS]
        chosen.sort()
        note = (f" Showing the {MAX_PMAP_PANELS} largest of {len(regions)} areas (by "
                "probability-weighted volume); the NIfTI bundle and the viewer have all.")
    ncol = 5 if len(chosen) > 8 else max(1, min(4, len(chosen)))
    nrow = math.ceil(len(chosen) / ncol)
    ex, ey = (sm.grid.shape[0] * sm.grid.spacing[0], sm.grid.shape[1] * sm.grid.spacing[1])
    panel_h = 2.6 * ey / max(ex, ey)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol + 0.8, (panel_h + 0.35) * nrow),
                             facecolor="black", squeeze=False)
    tdata = np.asarray(template.dataobj, dtype=np.float32) if template is not None else None
    vmax_t = float(np.percentile(tdata[tdata > 0], 99.5)) if tdata is not None and (tdata > 0).any() else 1.0
    c = sm.grid.coords()
    extent = (c["x"][0], c["x"][-1], c["y"][0], c["y"][-1])
    for ax in axes.ravel():
        ax.set_axis_off()
    im = None
    for ax, i in zip(axes.ravel(), chosen, strict=False):
        r = regions[i]
        pm = np.asarray(atlas.probability_map(r, space).values)
        if pm.max() <= 0:
            ax.text(0.5, 0.5, f"{r.key}\n(empty)", color="w", ha="center", transform=ax.transAxes)
            continue
        k = int(np.unravel_index(int(np.argmax(pm)), pm.shape)[2])
        under = _template_slice(template, tdata, sm.grid, k)
        ax.imshow(under.T, origin="lower", cmap="gray", vmin=0, vmax=vmax_t, extent=extent,
                  interpolation="nearest")
        sl = np.ma.masked_less(pm[:, :, k].T, 0.01)
        im = ax.imshow(sl, origin="lower", cmap="hot", vmin=0, vmax=1, extent=extent,
                       interpolation="nearest", alpha=0.9)
        ax.set_title(f"{r.key}  z = {c['z'][k]:.0f}, max {pm.max():.2f}", color="w", fontsize=8)
        ax.text(0.02, 0.02, "L", color="w", fontsize=7, transform=ax.transAxes)
        ax.text(0.95, 0.02, "R", color="w", fontsize=7, transform=ax.transAxes)
    if im is not None:
        cax = fig.add_axes((0.93, 0.3, 0.012, 0.4))
        cb = fig.colorbar(im, cax=cax)
        cb.set_label("probability", color="w")
        cb.ax.tick_params(colors="w")
    how = {"hard": " Each map is the fraction of the brains whose labels put the area at the voxel.",
           "soft": " Each map is the mean over the brains of the CNN's probability for the area "
                   "(soft aggregation)."}.get(str(atlas.maps(space).attrs.get("mode")), "")
    return _figure(f"pmaps-{space}", _png(fig),
                   f"Probability maps in {space} over the template, each at the axial slice of its "
                   f"maximum (p ≥ 0.01; neurological view, left on the left).{how}{note}")


def _extra_maps(atlas: Atlas, space: str, template: nib.Nifti1Image | None) -> list[str]:
    """Entropy and coverage maps when the build stored them."""
    import matplotlib.pyplot as plt
    from nilearn import plotting

    ds = atlas.maps(space)
    sm = atlas.space_maps(space)
    out = []
    bg: Any = template if template is not None else False
    for name, cmap, label in (("entropy", "viridis", "entropy of the area distribution (bits)"),
                              ("coverage", "cividis", "brains contributing per voxel")):
        if name not in ds.variables:
            continue
        data = np.asarray(ds[name].values, dtype=np.float32)
        if not np.any(data > 0):
            continue
        if name == "coverage" and float(data.min()) == float(data.max()):
            # a uniform map would only hide the template: say it instead
            out.append(f"<p>Coverage, {_esc(space)}: every voxel of the grid has labels from all "
                       f"{int(data.max())} brains.</p>")
            continue
        fig = plt.figure(figsize=(10, 3.4), facecolor="black")
        plotting.plot_stat_map(_image(data, sm.grid.affine), bg_img=bg, display_mode="ortho",
                               figure=fig, cmap=cmap, black_bg=True, threshold=1e-6,
                               vmin=0, vmax=float(data.max()), title=f"{name} · {space}",
                               resampling_interpolation="nearest", draw_cross=False)
        out.append(_figure(f"{name}-{space}", _png(fig), f"{label[0].upper()}{label[1:]}, {space}."))
    return out


def _maps_section(atlas: Atlas, volumes: dict[str, dict[int, tuple[float, float]]],
                  timings: dict[str, float]) -> str:
    parts = ['<section id="maps"><h2>Maps</h2>']
    for s in atlas.spaces:
        t0 = time.perf_counter()
        template = _template_image(atlas, s)
        parts.append(f'<h3 id="maps-{_esc(s)}">{_esc(s)}</h3>')
        if template is None:
            parts.append("<p class='muted'>No template file for this space: maps are drawn on "
                         "black.</p>")
        parts += _mpm_figures(atlas, s, template)
        timings[f"MPM {s}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        parts.append(_pmap_figure(atlas, s, template, volumes[s]))
        timings[f"pmaps {s}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        parts += _extra_maps(atlas, s, template)
        timings[f"extra maps {s}"] = time.perf_counter() - t0
    parts.append("</section>")
    return "".join(parts)


def _hierarchy_section(atlas: Atlas, volumes: dict[str, dict[int, tuple[float, float]]]) -> str:
    spaces = atlas.spaces
    header = ["region", "key", "id", "level"]
    for s in spaces:
        header += [f"MPM mm³ · {s}", f"Σp·dV mm³ · {s}"]
    mapped = {i for s in spaces for i in volumes[s]}
    keep = set(mapped)
    for i in mapped:
        keep |= {a.id for a in atlas.regions.ancestors(i)}
    rows = []
    for depth, r in atlas.regions.walk():
        if r.id not in keep:
            continue
        leaves = [r] if not atlas.regions.children(r) else atlas.regions.leaves(r)
        cells: list[object] = [
            f'<span style="padding-left:{1.1 * depth:.1f}em">{_swatch(r.colour)}{_esc(r.name)}</span>',
            f"<code>{_esc(r.key)}</code>", r.id, _esc(r.level or "")]
        for s in spaces:
            vs = [volumes[s][x.id] for x in leaves if x.id in volumes[s]]
            if vs:
                cells += [_fmt(float(sum(v[0] for v in vs))), _fmt(float(sum(v[1] for v in vs)))]
            else:
                cells += ["–", "–"]
        rows.append(cells)
    n_all = len(list(atlas.regions))
    skipped = (f" The {n_all - len(rows)} regions of the hierarchy without a map (and without "
               "mapped descendants) are not listed." if n_all > len(rows) else "")
    return ('<section id="regions"><h2>Regions</h2><p>The hierarchy with, per space, the volume '
            "each region takes in the maximum probability map and its probability-weighted volume "
            f"(Σ p·dV; parents add their leaves).{skipped}</p>"
            + _table(header, rows, "regions") + "</section>")


# -- variability -------------------------------------------------------------------------------
def _read_stats(atlas: Atlas) -> dict[str, pd.DataFrame]:
    import pandas as pd

    sdir = atlas.path / "stats"
    out: dict[str, pd.DataFrame] = {}
    if sdir.is_dir():
        for f in sorted(sdir.glob("*.csv")):
            out[f.stem] = pd.read_csv(f, dtype={"brain": str, "brain_a": str, "brain_b": str,
                                                "area": str})
    return out


def _area_groups(atlas: Atlas, keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """Leaf keys grouped by their parent area: parent name -> hemisphere -> leaf key."""
    groups: dict[str, dict[str, str]] = {}
    for k in keys:
        try:
            r = atlas.regions.get(k)
        except InputError:
            groups.setdefault(k, {})["–"] = k
            continue
        parent = atlas.regions.parent(r) if r.hemisphere else None
        name = parent.key if parent is not None else r.key
        groups.setdefault(name, {})[r.hemisphere or "–"] = k
    return groups


def _stats_colours(atlas: Atlas, keys: Iterable[str]) -> dict[str, str]:
    regions = []
    for k in dict.fromkeys(keys):
        try:
            regions.append(atlas.regions.get(str(k)))
        except InputError:
            continue
    return _display_colours(regions)


def _volumes_figure(atlas: Atlas, df: pd.DataFrame) -> str | None:
    import matplotlib.pyplot as plt

    spaces = list(dict.fromkeys(df["space"]))
    space = "native" if "native" in spaces else spaces[0]
    d = df[df["space"] == space]
    col = "volume_corrected_mm3" if "volume_corrected_mm3" in d.columns else "volume_mm3"
    groups = _area_groups(atlas, dict.fromkeys(d["area"]))
    if not groups:
        return None
    hemis = ["left", "right", "–"]
    colours = {"left": "#4c8bf5", "right": "#f28e2b", "–": "#9aa1ad"}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4))
    rng = np.random.default_rng(0)  # jitter only
    for gi, by_h in enumerate(groups.values()):
        for h, key in by_h.items():
            vals = d.loc[d["area"] == key, col].to_numpy(dtype=float)
            x = gi + {"left": -0.18, "right": 0.18, "–": 0.0}[h]
            ax.bar(x, np.nanmean(vals) if len(vals) else 0, width=0.34, color=colours[h], alpha=0.35)
            ax.scatter(x + rng.uniform(-0.07, 0.07, len(vals)), vals, s=14, color=colours[h],
                       edgecolor="k", linewidth=0.3, zorder=3)
    ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right")
    ax.set_ylabel("volume (mm³)" + (", shrinkage-corrected" if col.endswith("corrected_mm3")
                                     and space == "native" else ""))
    for h in hemis:
        if any(h in by for by in groups.values()):
            ax.scatter([], [], color=colours[h], label=h if h != "–" else "no hemisphere")
    ax.legend(frameon=False)
    ax.set_title(f"Area volumes per brain ({space} space)")
    ax.spines[["top", "right"]].set_visible(False)
    return _figure("var-volumes", _png(fig),
                   f"Volume of each area in each brain ({space} space; dots = brains, bars = mean), "
                   "left and right hemisphere side by side.")


def _centroid_figure(atlas: Atlas, df: pd.DataFrame) -> str | None:
    import matplotlib.pyplot as plt

    ref = [s for s in dict.fromkeys(df["space"]) if s != "native"]
    if not ref:
        return None
    space = ref[0]
    d = df[(df["space"] == space)].dropna(subset=["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"])
    if d.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    colours = _stats_colours(atlas, d["area"])
    for key, g in d.groupby("area", sort=False):
        colour = _hex_rgb(colours.get(str(key), "#808080"))
        c = g[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].to_numpy(dtype=float)
        m = c.mean(axis=0)
        for ax, (i, j) in zip(axes, ((0, 1), (1, 2)), strict=True):
            for p in c:
                ax.plot([m[i], p[i]], [m[j], p[j]], color=colour, lw=0.6, alpha=0.6)
            ax.scatter(c[:, i], c[:, j], s=12, color=colour, alpha=0.8)
            ax.scatter([m[i]], [m[j]], s=70, marker="X", color=colour, edgecolor="k",
                       linewidth=0.6, zorder=3)
        axes[0].annotate(str(key), (m[0], m[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, (a, b) in zip(axes, (("x", "y"), ("y", "z")), strict=True):
        ax.set_xlabel(f"{a} (mm)")
        ax.set_ylabel(f"{b} (mm)")
        ax.set_aspect("equal", adjustable="datalim")
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_title("axial projection")
    axes[1].set_title("sagittal projection")
    return _figure("var-centroids", _png(fig),
                   f"Individual area centroids (dots) around the group centroid (×) in {space}.")


def _dice_figure(df: pd.DataFrame) -> str | None:
    import matplotlib.pyplot as plt

    d = df.dropna(subset=["dice"])
    if d.empty:
        return None
    brains = sorted(set(d["brain_a"]) | set(d["brain_b"]))
    idx = {b: i for i, b in enumerate(brains)}
    mat = np.full((len(brains), len(brains)), np.nan)
    mean = d.groupby(["brain_a", "brain_b"])["dice"].mean()
    for (a, b), v in mean.items():
        mat[idx[a], idx[b]] = mat[idx[b], idx[a]] = v
    np.fill_diagonal(mat, 1.0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(brains) + 1.5, 0.55 * len(brains) + 1.5))
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(brains)), brains, rotation=45, ha="right")
    ax.set_yticks(range(len(brains)), brains)
    for i in range(len(brains)):
        for j in range(len(brains)):
            if np.isfinite(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="w" if mat[i, j] < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="Dice (mean over areas)")
    ax.set_title("Inter-brain overlap")
    return _figure("var-dice", _png(fig),
                   "Pairwise Dice overlap of the brains' areas in the Dice space, averaged over "
                   "areas (1 on the diagonal).")


def _cv_figure(atlas: Atlas, df: pd.DataFrame) -> str | None:
    import matplotlib.pyplot as plt

    d = df.dropna(subset=["dice"])
    if d.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = _stats_colours(atlas, d["area"])
    for key, g in d.groupby("area", sort=False):
        colour = _hex_rgb(colours.get(str(key), "#808080"))
        curve = g.groupby("threshold")["dice"].mean()
        ax.plot(curve.index, curve.to_numpy(), color=colour, lw=1, alpha=0.8, label=str(key))
    allc = d.groupby("threshold")["dice"].mean()
    ax.plot(allc.index, allc.to_numpy(), color="k", lw=2.5, label="mean")
    best = float(allc.idxmax())
    ax.axvline(best, color="k", ls=":", lw=1)
    ax.set_xlabel("probability threshold")
    ax.set_ylabel("Dice with the left-out brain")
    ax.set_ylim(0, 1)
    ax.set_title(f"Leave-one-brain-out cross-validation (best mean at p ≥ {best:g})")
    ax.spines[["top", "right"]].set_visible(False)
    if d["area"].nunique() <= 12:
        ax.legend(frameon=False, fontsize=7, ncol=2)
    return _figure("var-cv", _png(fig),
                   "Each brain's area against the map of the other brains thresholded at p ≥ t, "
                   "averaged over left-out brains (thin: per area; thick: mean).")


def _variability_section(atlas: Atlas) -> str:
    stats = _read_stats(atlas)
    if not stats:
        return ""
    parts = ['<section id="variability"><h2>Variability</h2>']
    makers: list[tuple[str, Callable[[], str | None]]] = []
    ba = stats.get("brain_area")
    if ba is not None and not ba.empty:
        makers += [("volumes", lambda: _volumes_figure(atlas, ba)),
                   ("centroids", lambda: _centroid_figure(atlas, ba))]
    dp = stats.get("dice_pairwise")
    if dp is not None and not dp.empty:
        makers.append(("dice", lambda: _dice_figure(dp)))
    cv = stats.get("loo_cv")
    if cv is not None and not cv.empty:
        makers.append(("cv", lambda: _cv_figure(atlas, cv)))
    for _, make in makers:
        fig = make()
        if fig:
            parts.append(fig)
    summ = stats.get("area_summary")
    if summ is not None and not summ.empty:
        cols = [c for c in ("area", "space", "n_brains", "volume_mean_mm3", "volume_sd_mm3", "cv",
                            "centroid_spread_mm", "pmap_weighted_volume_mm3", "dice_mean",
                            "loo_best_threshold", "loo_best_dice") if c in summ.columns]
        rows = [[_fmt(v) if not isinstance(v, str) else _esc(v) for v in rec]
                for rec in summ[cols].itertuples(index=False)]
        parts.append("<h3>Summary per area</h3>" + _table(cols, rows, "num"))
    asym = stats.get("asymmetry")
    if asym is not None and not asym.empty:
        rows = [[_fmt(v) if not isinstance(v, str) else _esc(v) for v in rec]
                for rec in asym.itertuples(index=False)]
        parts.append("<h3>Hemispheric asymmetry</h3>" + _table(list(asym.columns), rows, "num"))
    parts.append("<p class='muted'>Tables: <code>stats/*.csv</code> in the atlas directory.</p>")
    parts.append("</section>")
    return "".join(parts)


# -- quality control ---------------------------------------------------------------------------
def _caption(png: Path, root: Path) -> str:
    for cand in (png.with_suffix(".json"), png.with_name(png.stem + ".caption.json")):
        if cand.is_file():
            try:
                doc = json.loads(cand.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(doc, dict):
                for k in ("caption", "title", "description"):
                    if isinstance(doc.get(k), str) and doc[k].strip():
                        return doc[k].strip()
    return str(png.relative_to(root))


def _qa_section(atlas: Atlas) -> str:
    root = atlas.path / "brains"
    if not root.is_dir():
        return ""
    pngs = sorted(p for p in root.glob("*/**/*.png") if p.is_file())
    if not pngs:
        return ""
    parts = ['<section id="qa"><h2>Quality control</h2>']
    by_brain: dict[str, list[Path]] = {}
    for p in pngs:
        by_brain.setdefault(p.relative_to(root).parts[0], []).append(p)
    shown = 0
    for brain, files in by_brain.items():
        parts.append(f"<h3>{_esc(brain)}</h3><div class='gallery'>")
        for p in files:
            if shown >= MAX_QA_IMAGES:
                break
            uri = "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")
            rel = p.relative_to(atlas.path).as_posix()
            parts.append(_figure("qa-" + rel.replace("/", "-"), uri, _caption(p, atlas.path)))
            shown += 1
        parts.append("</div>")
    if len(pngs) > shown:
        parts.append(f"<p class='muted'>{len(pngs) - shown} more QA images under "
                     "<code>brains/</code> are not embedded.</p>")
    parts.append("</section>")
    return "".join(parts)


# -- page --------------------------------------------------------------------------------------
_CSS = """
:root{--fg:#1d2129;--muted:#6b7280;--line:#e5e7eb;--accent:#2563eb;--bg:#fafafa}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg)}
header{background:#111827;color:#f9fafb;padding:1.2em 2em}
header h1{margin:0;font-size:1.6em}header p{margin:.2em 0 0;color:#cbd5e1}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid var(--line);padding:.5em 2em;z-index:2}
nav a{margin-right:1.2em;color:var(--accent);text-decoration:none;font-weight:500}
main{max-width:1280px;margin:0 auto;padding:0 2em 4em}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:.5em 1.5em 1.2em;
margin-top:1.5em}
h2{border-bottom:2px solid var(--accent);padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:13.5px}
th,td{border-bottom:1px solid var(--line);padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f3f4f6}
table.num td{font-variant-numeric:tabular-nums}
table.stages td:nth-child(-n+4){white-space:nowrap}
.scroll{overflow-x:auto;max-width:100%}
table.regions td:first-child{white-space:nowrap}
table.regions td:nth-child(n+5){text-align:right;font-variant-numeric:tabular-nums}
.fig{margin:1em 0}.fig img{max-width:100%;border-radius:4px;display:block}
figcaption{color:var(--muted);font-size:13px;margin-top:.3em}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:1em}
.sw{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;
border:1px solid #0003;vertical-align:-1px}
.legend{columns:3;list-style:none;padding:0;font-size:13px}
.muted{color:var(--muted)}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1.2em}
dl.facts dt{color:var(--muted)}dl.facts dd{margin:0}
.status{padding:1px 7px;border-radius:9px;font-size:12px;background:#e5e7eb}
.status.done{background:#dcfce7}.status.cached{background:#dbeafe}.status.pending{background:#fef3c7}
.status.skipped{background:#f3f4f6}.status.failed{background:#fee2e2}
pre{background:#f3f4f6;padding:.8em;border-radius:6px;overflow:auto;max-height:30em;font-size:12px}
code{font-size:12.5px}
"""


def write_report(atlas_dir: str | Path | Atlas, out: str | Path | None = None) -> Path:
    """Write the self-contained HTML report of an atlas.

    Parameters
    ----------
    atlas_dir
        Atlas directory (or an opened :class:`~atlasbuilder.Atlas`) with maps.
    out
        Output file (default ``<atlas>/report.html``), written atomically.

    Returns
    -------
    Path
        The report file.

    Raises
    ------
    AtlasDirectoryError
        Not an atlas directory, or one without maps.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    atlas = atlas_dir if isinstance(atlas_dir, Atlas) else load_atlas(atlas_dir)
    atlas.space_maps()  # no maps: a clear error before any work
    target = Path(out) if out is not None else atlas.path / "report.html"
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with plt.rc_context({"font.size": 9, "figure.max_open_warning": 0}):
        volumes = _volumes(atlas)
        timings["volumes"] = time.perf_counter() - t0
        sections = [_overview(atlas), _maps_section(atlas, volumes, timings),
                    _hierarchy_section(atlas, volumes)]
        t1 = time.perf_counter()
        sections.append(_variability_section(atlas))
        timings["variability"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        sections.append(_qa_section(atlas))
        timings["qa"] = time.perf_counter() - t1
    from . import __version__

    nav = [("overview", "Overview"), ("maps", "Maps"), ("regions", "Regions")]
    if sections[3]:
        nav.append(("variability", "Variability"))
    if sections[4]:
        nav.append(("qa", "Quality control"))
    title = f"{atlas.name} {atlas.version}".strip()
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_esc(title)} — atlas report</title><link rel='icon' href='data:,'>"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>{_esc(title)}</h1><p>Probabilistic cytoarchitectonic atlas · "
        f"{len(atlas.spaces)} space(s): {_esc(', '.join(atlas.spaces))} · report written "
        f"{_esc(time.strftime('%Y-%m-%d %H:%M'))} by atlasbuilder {_esc(__version__)}</p></header>"
        "<nav>" + "".join(f"<a href='#{a}'>{_esc(t)}</a>" for a, t in nav) + "</nav>"
        "<main>" + "".join(sections)
        + f"<p class='muted'>Generated in {time.perf_counter() - t0:.1f} s.</p></main></body></html>\n"
    )
    atomic_write_text(target, page)
    log.info("report %s written in %.1f s (%s)", target, time.perf_counter() - t0,
             ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return target
