"""The built atlas: one self-describing directory, opened lazily, queried by coordinate.

Layout of an atlas directory::

    atlas.json        what this is: name, version, format, spaces, map order, encodings
    regions.json      the region hierarchy (see atlasbuilder.regions)
    spaces.json       the spaces and their template files
    provenance.json   inputs (with SHA-256), parameters, package versions, timings
    stats/            variability statistics tables (CSV; see atlasbuilder.aggregation)
    store.zarr/       one group per space:
        <space>/pmaps   (region, x, y, z) probability maps, chunked per area and 32^3 voxels;
                        uint8 percent or float
        <space>/mpm     (x, y, z) maximum probability map: region id, 0 = no region
        <space>/coverage, entropy   (x, y, z) brains per voxel, uncertainty in bits (built atlases)
        <space>/index/{start,count,column,value}   sparse voxel -> (map column, value) index
        <space>/region, x, y, z   coordinates (region ids; voxel centres in RAS mm)

Point queries read the sparse index (a few bytes per non-zero voxel and area), never the dense
maps; region maps read only their area's chunks. Stores written before the index existed are
answered by a chunked dense read.

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
import os
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
INDEX_CHUNK = 1 << 20  # entries per chunk of the sparse index
DEFAULT_MIN_PROBABILITY = 0.05
MAX_SIGMA_MM = 50.0  # a larger positional uncertainty is a mistake, not a query


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
    pmaps: np.ndarray | Sequence[np.ndarray],
    grid: Grid,
    region_ids: Sequence[int],
    *,
    divisor: float,
    mpm: np.ndarray | None = None,
    coverage: np.ndarray | None = None,
    entropy: np.ndarray | None = None,
    gap_id: int | None = None,
    attrs: dict[str, Any] | None = None,
) -> SpaceMaps:
    """Write one space's probability maps (already encoded), MPM, extra maps and sparse index.

    Parameters
    ----------
    store
        The zarr directory (``<atlas>/store.zarr``); created if missing. The space's group is
        assembled under a temporary name and renamed into place, so a reader never sees half a
        space (an existing group of that space is replaced).
    space
        Canonical space name (the group name).
    pmaps
        ``(region, x, y, z)`` array, or a sequence of ``(x, y, z)`` arrays (one per region, read
        one at a time: an atlas with hundreds of areas never has to sit in memory at once), in
        the storage dtype: uint8 percent with ``divisor=100`` or float with ``divisor=1``.
    grid
        The maps' grid.
    region_ids
        Region id of each map, in map order.
    divisor
        ``probability = stored value / divisor``.
    mpm
        Maximum probability map (region ids, 0 none); computed by :func:`simple_mpm` if omitted.
    coverage, entropy
        Optional ``(x, y, z)`` maps: brains contributing per voxel, uncertainty (bits).
    gap_id
        Label value of the "gap" (cortex no mapped area covers) in ``mpm``, if any.
    attrs
        Further attributes recorded on the space's group (number of brains, rule parameters).

    Returns
    -------
    SpaceMaps
        The storage description (goes into ``atlas.json`` via :func:`write_atlas_metadata`).

    Raises
    ------
    InputError
        Shapes or the number of region ids do not match.

    Notes
    -----
    Besides ``pmaps`` (chunked per area and 32³ voxels) the group holds a sparse voxel index
    ``index/{start,count,column,value}``: for the voxel with flat (C-order) index ``v`` its
    non-zero entries are ``column[start[v]:start[v] + count[v]]`` (map columns) with their
    stored values, sorted by value (descending; ties in map order). Point queries read only the
    index, never the dense maps.
    """
    import shutil
    import tempfile

    import zarr

    n_reg = len(pmaps)
    if isinstance(pmaps, np.ndarray) and (pmaps.ndim != 4 or pmaps.shape[1:] != grid.shape):
        raise InputError(f"pmaps shape {pmaps.shape} does not match (region, {grid.shape})")
    if len(region_ids) != n_reg:
        raise InputError(f"{len(region_ids)} region ids for {n_reg} maps")
    if n_reg == 0:
        raise InputError(f"no maps to write for space {space!r}")
    if n_reg > np.iinfo(np.uint16).max:
        raise InputError(f"{n_reg} maps: at most 65535 regions per space")
    first = np.asarray(pmaps[0])
    dtype = first.dtype
    store = Path(store)
    root = zarr.open_group(str(store), mode="a")  # the root group must exist
    del root
    tmp = Path(tempfile.mkdtemp(prefix=f".{space}.", suffix=".partial", dir=store))
    try:
        grp = zarr.open_group(str(tmp), mode="w")
        cs = tuple(min(CHUNK, n) for n in grid.shape)
        arr = grp.create_array("pmaps", shape=(n_reg, *grid.shape), dtype=dtype, chunks=(1, *cs),
                               dimension_names=("region", "x", "y", "z"), fill_value=0)
        flats, cols, vals = [], [], []
        for i in range(n_reg):
            m = first if i == 0 else np.asarray(pmaps[i])
            if m.shape != grid.shape or m.dtype != dtype:
                raise InputError(f"map {i} (region id {region_ids[i]}) has shape {m.shape} and "
                                 f"dtype {m.dtype}; expected {grid.shape} and {dtype}")
            nz = np.flatnonzero(m)
            if nz.size:  # write only the chunks the area touches; the rest stays fill (0)
                xyz = np.unravel_index(nz, grid.shape)
                lo = [int(a.min()) // c * c for a, c in zip(xyz, cs, strict=True)]
                hi = [min(-(-(int(a.max()) + 1) // c) * c, n)
                      for a, c, n in zip(xyz, cs, grid.shape, strict=True)]
                arr[i, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            flats.append(nz)
            cols.append(np.full(nz.size, i, dtype=np.uint16))
            vals.append(m.reshape(-1)[nz])
        _write_index(grp, grid, np.concatenate(flats), np.concatenate(cols), np.concatenate(vals))
        del flats, cols, vals
        if mpm is None:
            mpm = simple_mpm(pmaps, region_ids)
        _write_volume(grp, "mpm", np.asarray(mpm).astype(np.int32), grid)
        if coverage is not None:
            _write_volume(grp, "coverage", np.asarray(coverage).astype(np.uint16), grid)
        if entropy is not None:
            _write_volume(grp, "entropy", np.asarray(entropy).astype(np.float32), grid)
        for ax, values in grid.coords().items():
            c = grp.create_array(ax, shape=values.shape, dtype="float64", dimension_names=(ax,))
            c[...] = values
        r = grp.create_array("region", shape=(n_reg,), dtype="int32", dimension_names=("region",))
        r[...] = np.asarray(region_ids, dtype=np.int32)
        grp.attrs.update({"space": space, "divisor": divisor, "dtype": str(dtype),
                          "gap_id": gap_id, "index": True, **(attrs or {})})
        target = store / space
        old = None
        if target.exists():
            old = store / f".{space}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SpaceMaps(space, grid, tuple(int(i) for i in region_ids), str(dtype), float(divisor))


def _write_volume(grp: Any, name: str, data: np.ndarray, grid: Grid) -> None:
    if data.shape != grid.shape:
        raise InputError(f"{name} has shape {data.shape}; expected {grid.shape}")
    a = grp.create_array(name, shape=grid.shape, dtype=data.dtype,
                         chunks=tuple(min(CHUNK, n) for n in grid.shape),
                         dimension_names=("x", "y", "z"), fill_value=0)
    a[...] = data


def _write_index(grp: Any, grid: Grid, flat: np.ndarray, col: np.ndarray, val: np.ndarray) -> None:
    """The sparse voxel -> (map column, stored value) index (see :func:`write_space_maps`)."""
    order = np.lexsort((col, -val.astype(np.float64), flat))
    flat, col, val = flat[order], col[order], val[order]
    n_vox = int(np.prod(grid.shape))
    count = np.bincount(flat, minlength=n_vox)
    start = np.cumsum(count) - count
    start_dtype = np.uint32 if len(flat) < 2**32 else np.uint64
    count_dtype = np.uint8 if count.max(initial=0) < 256 else np.uint16
    g = grp.create_group("index")
    cs = tuple(min(CHUNK, n) for n in grid.shape)
    for name, data in (("start", start.astype(start_dtype)), ("count", count.astype(count_dtype))):
        a = g.create_array(name, shape=grid.shape, dtype=data.dtype, chunks=cs,
                           dimension_names=("x", "y", "z"), fill_value=0)
        a[...] = data.reshape(grid.shape)
    n = max(len(flat), 1)
    for name, data in (("column", col), ("value", val)):
        a = g.create_array(name, shape=(len(flat),), dtype=data.dtype,
                           chunks=(min(INDEX_CHUNK, n),), dimension_names=("entry",), fill_value=0)
        if len(flat):
            a[...] = data


def simple_mpm(pmaps: np.ndarray | Sequence[np.ndarray], region_ids: Sequence[int]) -> np.ndarray:
    """Maximum probability map: the id of the most probable region; 0 where all are zero.

    Ties go to the region that comes first in map order (deterministic). This is the rule for
    imported atlases; built atlases use the neighbourhood tie-break of the aggregation stage
    (:func:`atlasbuilder.aggregation.maximum_probability_map`).
    """
    ids = np.asarray(region_ids, dtype=np.int32)
    top = np.array(pmaps[0], copy=True)
    best = np.zeros(top.shape, dtype=np.int32)
    # a running maximum (one pass per region) is much faster than argmax over a leading axis
    for r in range(1, len(pmaps)):
        m = np.asarray(pmaps[r])
        better = m > top  # strict: ties keep the earlier region
        best[better] = r
        np.maximum(top, m, out=top)
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


@dataclass(frozen=True)
class PointRegions:
    """Regions at a batch of points in flat arrays (see :meth:`Atlas.regions_at`)."""

    space: str
    points: np.ndarray  # (n, 3) mm
    inside: np.ndarray  # (n,) bool
    offsets: np.ndarray  # (n + 1,) point n's entries are offsets[n]:offsets[n + 1]
    region_id: np.ndarray  # (m,) region ids
    probability: np.ndarray  # (m,) float64

    def __len__(self) -> int:
        return len(self.points)

    def at(self, n: int) -> list[tuple[int, float]]:
        """(region id, probability) pairs of point ``n``."""
        lo, hi = int(self.offsets[n]), int(self.offsets[n + 1])
        return list(zip(self.region_id[lo:hi].tolist(), self.probability[lo:hi].tolist(), strict=True))


@dataclass(frozen=True)
class _Index:
    """The sparse voxel index of one space, in memory (see :func:`write_space_maps`)."""

    start: np.ndarray  # flat voxel -> first entry
    count: np.ndarray  # flat voxel -> number of entries
    column: np.ndarray  # entry -> map column
    value: np.ndarray  # entry -> stored value


@dataclass(frozen=True)
class _Level:
    """Map columns folded onto the regions of one hierarchy level."""

    regions: tuple[Region, ...]
    of_column: np.ndarray  # map column -> level position (-1: not below any region of the level)
    ids: np.ndarray  # sorted region ids seen in the MPM (map regions and the gap label)
    id_pos: np.ndarray  # level position of each of ``ids`` (-1: none)


class Atlas:
    """A built or imported atlas directory, opened lazily (maps are read when queried).

    Use :func:`load_atlas` to open one. Point queries read the sparse voxel index of a space
    (loaded once, a few bytes per non-zero voxel) rather than the dense maps; region maps read
    only the chunks of the areas they need.
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
        self._index_cache: dict[str, _Index | None] = {}
        self._mpm_cache: dict[str, np.ndarray] = {}
        self._level_cache: dict[tuple[str, str | None], _Level] = {}

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
        if space in self._spaces:
            return self._spaces[space]
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

    def _has(self, space: str, name: str) -> bool:
        try:
            self._zarr_root[f"{space}/{name}"]
        except KeyError:
            return False
        return True

    def _index(self, sm: SpaceMaps) -> _Index | None:
        """The space's sparse index, read once; None for stores written before it existed."""
        if sm.space not in self._index_cache:
            if not self._has(sm.space, "index/start"):
                self._index_cache[sm.space] = None
            else:
                self._index_cache[sm.space] = _Index(
                    *(np.asarray(self._array(sm.space, f"index/{n}")[...]).reshape(-1)
                      for n in ("start", "count", "column", "value")))
        return self._index_cache[sm.space]

    def _mpm_data(self, sm: SpaceMaps) -> np.ndarray:
        if sm.space not in self._mpm_cache:
            self._mpm_cache[sm.space] = np.asarray(self._array(sm.space, "mpm")[...])
        return self._mpm_cache[sm.space]

    def gap_id(self, space: str | None = None) -> int | None:
        """The MPM label of the "gap" (cortex no mapped area covers) in a space, if any."""
        sm = self.space_maps(space)
        g = self._zarr_root[sm.space].attrs.get("gap_id")
        return None if g is None else int(g)

    def maps(self, space: str | None = None) -> xr.Dataset:
        """The stored maps of a space as a lazy :class:`xarray.Dataset` (nothing read yet).

        ``pmaps`` holds the stored (encoded) values; divide by ``attrs["divisor"]`` for
        probabilities, or use :meth:`probability_map`. Built atlases also hold ``coverage``
        (brains contributing per voxel) and ``entropy`` (bits).
        """
        import xarray as xr

        sm = self.space_maps(space)
        ds = xr.open_zarr(self.path / "store.zarr", group=sm.space, consolidated=False,
                          chunks=None)
        ds.attrs["space"] = sm.space
        return ds

    # -- levels -------------------------------------------------------------------------------
    def _level(self, sm: SpaceMaps, level: str | None) -> _Level:
        """Fold the map columns onto the regions of ``level`` (None: the maps themselves).

        A map region belongs to its ancestor (or itself) at ``level``; a leaf that stops above
        ``level`` (no subdivision that deep) stands for itself.
        """
        key = (sm.space, level)
        if key in self._level_cache:
            return self._level_cache[key]
        map_regs = [self.regions.get(i) for i in sm.region_ids]
        if level is None:
            regs = map_regs
            of_col = np.arange(len(map_regs))
        else:
            levels = list(self.regions.levels)
            if level not in levels:
                raise InputError(f"unknown level {level!r}; the hierarchy's levels are {levels}")
            depth = levels.index(level)
            owners: list[Region | None] = []
            for r in map_regs:
                chain = [r, *self.regions.ancestors(r)]
                hit = next((a for a in chain if a.level == level), None)
                if hit is None and r.level in levels and levels.index(r.level) < depth:
                    hit = r
                owners.append(hit)
            order = {r.key: n for n, r in enumerate(self.regions)}
            uniq = sorted({o.key: o for o in owners if o is not None}.values(),
                          key=lambda r: order[r.key])
            pos = {r.key: n for n, r in enumerate(uniq)}
            regs = uniq
            of_col = np.array([-1 if o is None else pos[o.key] for o in owners], dtype=np.int64)
        mpm_ids = np.array(sorted(set(sm.region_ids)), dtype=np.int64)
        col_of_id = {rid: c for c, rid in enumerate(sm.region_ids)}
        id_pos = np.array([of_col[col_of_id[int(i)]] for i in mpm_ids], dtype=np.int64)
        out = _Level(tuple(regs), np.asarray(of_col, dtype=np.int64), mpm_ids, id_pos)
        self._level_cache[key] = out
        return out

    def _label_positions(self, lv: _Level, labels: np.ndarray) -> np.ndarray:
        """Level position of MPM labels (-1 for 0, the gap or regions outside the level)."""
        if lv.ids.size == 0:
            return np.full(labels.shape, -1, dtype=np.int64)
        k = np.clip(np.searchsorted(lv.ids, labels), 0, lv.ids.size - 1)
        return np.where(lv.ids[k] == labels, lv.id_pos[k], -1)

    # -- region maps ---------------------------------------------------------------------------
    def _region_columns(self, sm: SpaceMaps, region: int | str | Region) -> tuple[Region, list[int]]:
        from .errors import UnknownRegionError

        r = self.regions.get(region)
        leaf_ids = {x.id for x in self.regions.leaves(r)} | {r.id}
        cols = [c for c, rid in enumerate(sm.region_ids) if rid in leaf_ids]
        if not cols:
            raise UnknownRegionError(
                f"region {r.key!r} has no map in space {sm.space!r} (neither of its own nor "
                "through its leaves)",
                [self.regions.get(i).key for i in sm.region_ids][:5],
            )
        return r, cols

    def probability_map(self, region: int | str | Region, space: str | None = None) -> xr.DataArray:
        """A region's probability map (float32, 0..1), read on demand.

        A parent region (any level) merges its children: its probability is the sum of its
        leaf areas' probabilities, clipped to 1.

        Raises
        ------
        UnknownRegionError
            No such region (with suggestions), or neither it nor its leaves have a map.
        """
        from .volumes import from_array

        sm = self.space_maps(space)
        r, cols = self._region_columns(sm, region)
        arr = self._array(sm.space, "pmaps")
        data = np.zeros(sm.grid.shape, dtype=np.float32)
        for c in cols:
            data += np.asarray(arr[c], dtype=np.float32) / np.float32(sm.divisor)
        if len(cols) > 1:
            np.minimum(data, 1, out=data)
        ds = from_array(data, sm.grid, sm.space, name=r.key, source=str(self.path))
        return ds[r.key]

    def mpm(self, space: str | None = None, *, level: str | None = None) -> xr.DataArray:
        """The maximum probability map (region ids; 0 = no region), optionally read at a level.

        At a ``level`` each voxel's MPM area is replaced by its region at that level (so the
        map shows lobes, groups, areas, ...); labels outside the level become 0.
        """
        from .volumes import from_array

        sm = self.space_maps(space)
        data = self._mpm_data(sm)
        if level is not None:
            lv = self._level(sm, level)
            ids = np.array([r.id for r in lv.regions] + [0], dtype=np.int32)
            data = ids[self._label_positions(lv, data.astype(np.int64))]
        return from_array(np.array(data, dtype=np.int32), sm.grid, sm.space, name="mpm",
                          source=str(self.path))["mpm"]

    def region_mask(self, region: int | str | Region, space: str | None = None, *,
                    threshold: float | None = None) -> xr.DataArray:
        """Boolean mask of a region (any level: parents merge their children).

        ``threshold=None`` takes the region's voxels of the maximum probability map; a number
        takes the voxels where the region's probability (:meth:`probability_map`) is at least
        ``threshold``.
        """
        from .volumes import from_array

        sm = self.space_maps(space)
        r, cols = self._region_columns(sm, region)
        if threshold is None:
            ids = np.array([sm.region_ids[c] for c in cols])
            mask = np.isin(self._mpm_data(sm), ids)
        else:
            if not 0 < threshold <= 1:
                raise InputError(f"threshold must be within (0, 1], got {threshold}")
            mask = self.probability_map(r, sm.space).values >= np.float32(threshold)
        return from_array(mask, sm.grid, sm.space, name=r.key, source=str(self.path))[r.key]

    def region_info(self, region: int | str | Region, space: str | None = None, *,
                    threshold: float | None = None) -> dict[str, Any]:
        """Volume, centroid and bounding box of a region's mask (see :meth:`region_mask`).

        Returns
        -------
        dict
            ``key``, ``name``, ``space``, ``n_voxels``, ``volume_mm3``, ``centroid_mm`` (a voxel
            centre inside the region: the centre of mass when its voxel belongs to the region,
            otherwise the region voxel nearest to it; None for an empty mask) and ``bbox_mm``
            (``[[xmin, ymin, zmin], [xmax, ymax, zmax]]``, voxel centres; None when empty).
        """
        sm = self.space_maps(space)
        mask = self.region_mask(region, sm.space, threshold=threshold)
        r = self.regions.get(region)
        vox = np.argwhere(mask.values)
        info: dict[str, Any] = {"key": r.key, "name": r.name, "space": sm.space,
                                "n_voxels": len(vox),
                                "volume_mm3": float(len(vox) * np.prod(sm.grid.spacing)),
                                "centroid_mm": None, "bbox_mm": None}
        if len(vox):
            mm = vox * np.asarray(sm.grid.spacing) + np.asarray(sm.grid.origin)
            info["centroid_mm"] = inside_centroid(mm).tolist()
            info["bbox_mm"] = [mm.min(axis=0).tolist(), mm.max(axis=0).tolist()]
        return info

    # -- point queries ---------------------------------------------------------------------------
    def _entries(self, sm: SpaceMaps, pts: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Non-zero (point row, map column, stored value) triples at the points' nearest voxels,
        per point sorted by value (descending; ties in map order), and the ``inside`` flags."""
        idx, inside = sm.grid.nearest_voxel(pts)
        ix = self._index(sm)
        if ix is None:  # a store without index: dense chunked read
            values, inside = self._lookup(sm, pts)
            rows, cols = np.nonzero(values)
            vals = values[rows, cols]
            order = np.lexsort((cols, -vals.astype(np.float64), rows))
            return inside, rows[order], cols[order], vals[order]
        _, ny, nz = sm.grid.shape
        flat = (idx[:, 0] * ny + idx[:, 1]) * nz + idx[:, 2]
        cnt = ix.count[flat].astype(np.int64)
        cnt[~inside] = 0
        total = int(cnt.sum())
        rows = np.repeat(np.arange(len(pts)), cnt)
        first = np.cumsum(cnt) - cnt
        e = np.arange(total, dtype=np.int64) - np.repeat(first, cnt)
        e += np.repeat(ix.start[flat].astype(np.int64), cnt)
        return inside, rows, ix.column[e].astype(np.int64), ix.value[e]

    def _level_entries(self, sm: SpaceMaps, pts: np.ndarray, level: str | None
                       ) -> tuple[_Level, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`_entries` but with probabilities (float64) folded onto ``level``."""
        lv = self._level(sm, level)
        inside, rows, cols, vals = self._entries(sm, pts)
        probs = vals.astype(np.float64) / sm.divisor
        if level is None:
            return lv, inside, rows, cols, probs
        pos = lv.of_column[cols]
        keep = pos >= 0
        rows, pos, probs = rows[keep], pos[keep], probs[keep]
        n_lv = max(len(lv.regions), 1)
        key = rows * n_lv + pos
        uniq, inv = np.unique(key, return_inverse=True)
        summed = np.minimum(np.bincount(inv, weights=probs).astype(np.float64), 1.0)
        rows, pos = uniq // n_lv, uniq % n_lv
        order = np.lexsort((pos, -summed, rows))
        return lv, inside, rows[order], pos[order], summed[order]

    def probabilities_at(
        self,
        points_mm: Any,
        space: str | None = None,
        *,
        level: str | None = None,
        sigma_mm: float | None = None,
    ) -> xr.DataArray:
        """Probability of every mapped region at each point (nearest voxel, bounds checked).

        Parameters
        ----------
        points_mm
            ``(n, 3)`` or ``(3,)`` coordinates, RAS mm, in ``space``.
        space
            Space of the points (default: the atlas's primary space).
        level
            Hierarchy level to answer at (``"area"``, ``"lobe"``, ...): a region's probability
            is the sum of its leaf areas' probabilities, clipped to 1. Default: the mapped areas.
        sigma_mm
            Positional uncertainty: answer the Gaussian-weighted expected probability instead
            (see :meth:`gaussian_at`).

        Returns
        -------
        xarray.DataArray
            dims ``("point", "region")``, float64 probabilities (exactly ``stored value /
            divisor`` for mapped areas); coords ``region`` (ids), ``key``, ``inside`` (per
            point). Rows of points outside the volume are NaN and ``inside`` is False.

        Raises
        ------
        InputError
            Points are not numeric, not of shape (n, 3) or not finite; unknown level; bad sigma.
        """
        import xarray as xr

        if sigma_mm is not None:
            return self.gaussian_at(points_mm, sigma_mm, space, level=level)["probability"]
        sm = self.space_maps(space)
        pts = _as_points(points_mm)
        lv, inside, rows, cols, probs = self._level_entries(sm, pts, level)
        out = np.zeros((len(pts), len(lv.regions)), dtype=np.float64)
        out[rows, cols] = probs
        out[~inside] = np.nan
        return xr.DataArray(
            out, dims=("point", "region"),
            coords={"region": [r.id for r in lv.regions], "key": ("region", [r.key for r in lv.regions]),
                    "inside": ("point", inside), "x": ("point", pts[:, 0]),
                    "y": ("point", pts[:, 1]), "z": ("point", pts[:, 2])},
            attrs={"space": sm.space, "level": level or "map"},
        )

    def labels_at(self, points_mm: Any, space: str | None = None, *,
                  level: str | None = None) -> np.ndarray:
        """The maximum probability map's label at each point (region ids; 0 none or outside).

        At a ``level`` the label is the MPM area's region at that level.
        """
        sm = self.space_maps(space)
        pts = _as_points(points_mm)
        idx, inside = sm.grid.nearest_voxel(pts)
        lab = self._mpm_data(sm)[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.int64)
        lab[~inside] = 0
        if level is not None:
            lv = self._level(sm, level)
            ids = np.array([r.id for r in lv.regions] + [0], dtype=np.int64)
            lab = ids[self._label_positions(lv, lab)]
        return lab

    def gaussian_at(
        self,
        points_mm: Any,
        sigma_mm: float,
        space: str | None = None,
        *,
        level: str | None = None,
    ) -> xr.Dataset:
        """Region probabilities for points known only up to an isotropic Gaussian uncertainty.

        Each point is a 3-D Gaussian of standard deviation ``sigma_mm`` (truncated at 3 sigma,
        a sphere, and renormalised; voxel centres carry the weights, so the answer is the
        voxel-sampled integral). For every region it answers

        * ``probability``: the expected probability, ``sum_v w_v p(v)`` (for a parent, ``p`` is
          the clipped sum of its leaves at each voxel);
        * ``mass_inside``: the fraction of the point's Gaussian mass inside the region, i.e. on
          voxels that the maximum probability map (read at ``level``) assigns to it;

        and per point ``volume_fraction``, the Gaussian mass inside the atlas volume (mass
        beyond it counts as probability 0). A sigma much smaller than the voxels degrades to
        the exact lookup (the nearest voxel carries all the weight).

        Raises
        ------
        InputError
            ``sigma_mm`` is not a number in (0, 50] mm, or bad points / level.
        """
        import xarray as xr

        sigma = _check_sigma(sigma_mm)
        sm = self.space_maps(space)
        pts = _as_points(points_mm)
        lv = self._level(sm, level)
        n_lv = len(lv.regions)
        prob = np.zeros((len(pts), n_lv))
        mass = np.zeros((len(pts), n_lv))
        vol_frac = np.zeros(len(pts))
        for n, p in enumerate(pts):
            prob[n], mass[n], vol_frac[n] = self._gaussian_point(sm, lv, p, sigma)
        inside = vol_frac > 0
        prob[~inside] = np.nan
        mass[~inside] = np.nan
        coords = {"region": [r.id for r in lv.regions], "key": ("region", [r.key for r in lv.regions]),
                  "inside": ("point", inside), "x": ("point", pts[:, 0]),
                  "y": ("point", pts[:, 1]), "z": ("point", pts[:, 2])}
        attrs = {"space": sm.space, "level": level or "map", "sigma_mm": sigma}
        return xr.Dataset({"probability": (("point", "region"), prob, attrs),
                           "mass_inside": (("point", "region"), mass, attrs),
                           "volume_fraction": (("point",), vol_frac)},
                          coords=coords, attrs=attrs)

    def _gaussian_point(self, sm: SpaceMaps, lv: _Level, p: np.ndarray, sigma: float
                        ) -> tuple[np.ndarray, np.ndarray, float]:
        grid = sm.grid
        origin, spacing, shape = np.asarray(grid.origin), np.asarray(grid.spacing), np.asarray(grid.shape)
        radius = 3.0 * sigma
        lo = np.ceil((p - radius - origin) / spacing).astype(np.int64)
        hi = np.floor((p + radius - origin) / spacing).astype(np.int64)
        axes = [np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)]
        ii, jj, kk = np.meshgrid(*axes, indexing="ij")
        vox = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
        d2 = (((vox * spacing + origin) - p) ** 2).sum(axis=1)
        w = np.where(d2 <= radius**2, np.exp(-0.5 * d2 / sigma**2), 0.0)
        if w.sum() <= 0:  # sigma far below the voxel size: the nearest voxel takes all
            vox = np.floor((p - origin) / spacing + 0.5).astype(np.int64)[None]
            w = np.ones(1)
        w = w / w.sum()
        ok = np.all((vox >= 0) & (vox < shape), axis=1) & (w > 0)
        vox, w = vox[ok], w[ok]
        n_lv = len(lv.regions)
        if not len(vox):
            return np.zeros(n_lv), np.zeros(n_lv), 0.0
        centres = vox * spacing + origin
        _, rows, cols, vals = self._entries(sm, centres)
        probs = vals.astype(np.float64) / sm.divisor
        pos = lv.of_column[cols]
        keep = pos >= 0
        rows, pos, probs = rows[keep], pos[keep], probs[keep]
        per_voxel = np.bincount(rows * n_lv + pos, weights=probs, minlength=len(vox) * n_lv
                                ).astype(np.float64).reshape(len(vox), n_lv)
        np.minimum(per_voxel, 1.0, out=per_voxel)
        expected = w @ per_voxel
        lab = self._mpm_data(sm)[vox[:, 0], vox[:, 1], vox[:, 2]].astype(np.int64)
        lpos = self._label_positions(lv, lab)
        m = lpos >= 0
        mass = np.bincount(lpos[m], weights=w[m], minlength=n_lv).astype(np.float64)
        return expected, mass, float(w.sum())

    def _lookup(self, sm: SpaceMaps, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored values at the points' nearest voxels, read chunk by chunk (stores without
        the sparse index)."""
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
        self, points_mm: Any, space: str | None, min_probability: float, level: str | None = None,
    ) -> tuple[SpaceMaps, _Level, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per point, the (level) columns at or above ``min_probability`` and their
        probabilities, sorted by probability (descending; ties in order), as a CSR structure
        (``bounds``: point n's entries are ``bounds[n]:bounds[n + 1]``). Vectorised."""
        if not 0 <= min_probability <= 1:
            raise InputError(f"min_probability must be within 0..1, got {min_probability}")
        sm = self.space_maps(space)
        pts = _as_points(points_mm)
        lv, inside, rows, cols, probs = self._level_entries(sm, pts, level)
        if min_probability > 0:
            keep = probs >= min_probability
            rows, cols, probs = rows[keep], cols[keep], probs[keep]
        bounds = np.searchsorted(rows, np.arange(len(pts) + 1))
        return sm, lv, pts, inside, bounds, cols, probs

    def regions_at(
        self,
        points_mm: Any,
        space: str | None = None,
        *,
        min_probability: float = 0.0,
        level: str | None = None,
    ) -> PointRegions:
        """Every region with a non-zero probability (at least ``min_probability``) at each point,
        as flat arrays: the fast batch form of :meth:`query` (no per-point Python objects).

        Returns
        -------
        PointRegions
            ``offsets`` (n + 1): point n's regions are ``region_id[offsets[n]:offsets[n + 1]]``
            with ``probability[...]`` (sorted, descending; ties in map order); ``inside`` per
            point (outside points have no regions).
        """
        sm, lv, pts, inside, bounds, cols, probs = self._hits(points_mm, space, min_probability,
                                                              level)
        ids = np.array([r.id for r in lv.regions], dtype=np.int64)
        return PointRegions(sm.space, pts, inside, bounds, ids[cols], probs)

    def query(
        self,
        points_mm: Any,
        space: str | None = None,
        *,
        min_probability: float = DEFAULT_MIN_PROBABILITY,
        level: str | None = None,
        sigma_mm: float | None = None,
    ) -> list[dict[str, Any]]:
        """Regions at each point as plain dicts (what ``atlasbuilder query --json`` prints).

        Each answer is ``{"space", "point", "regions": [{"id", "key", "name", "probability"}]}``
        with regions sorted by probability (descending; ties by map order) and those below
        ``min_probability`` (or zero) left out; a point outside the volume has ``"regions": []``
        and ``"outside": true``. With ``level`` the regions are those of that hierarchy level.
        With ``sigma_mm`` each region also has ``"mass_inside"`` (see :meth:`gaussian_at`), a
        region is listed when either number reaches ``min_probability``, and the answer has
        ``"sigma_mm"`` and ``"volume_fraction"``.

        Raises
        ------
        InputError
            Bad points, a threshold outside 0..1, an unknown level or a bad sigma.
        """
        if sigma_mm is not None:
            return self._query_gaussian(points_mm, space, min_probability, level, sigma_mm)
        sm, lv, pts, inside, bounds, cols_a, probs_a = self._hits(points_mm, space,
                                                                  min_probability, level)
        rid = [r.id for r in lv.regions]
        rkey = [r.key for r in lv.regions]
        rname = [r.name for r in lv.regions]
        cols, probs, bl = cols_a.tolist(), probs_a.tolist(), bounds.tolist()
        ins = inside.tolist()
        out: list[dict[str, Any]] = []
        for n, pt in enumerate(pts.tolist()):
            ans: dict[str, Any] = {"space": sm.space, "point": pt}
            if level is not None:
                ans["level"] = level
            if ins[n]:
                lo, hi = bl[n], bl[n + 1]
                ans["regions"] = [{"id": rid[c], "key": rkey[c], "name": rname[c], "probability": p}
                                  for c, p in zip(cols[lo:hi], probs[lo:hi], strict=True)]
            else:
                ans["regions"] = []
                ans["outside"] = True
            out.append(ans)
        return out

    def _query_gaussian(self, points_mm: Any, space: str | None, min_probability: float,
                        level: str | None, sigma_mm: float) -> list[dict[str, Any]]:
        if not 0 <= min_probability <= 1:
            raise InputError(f"min_probability must be within 0..1, got {min_probability}")
        ds = self.gaussian_at(points_mm, sigma_mm, space, level=level)
        sm = self.space_maps(ds.attrs["space"])
        lv = self._level(sm, level)
        prob, mass = ds["probability"].values, ds["mass_inside"].values
        out: list[dict[str, Any]] = []
        for n in range(prob.shape[0]):
            ans: dict[str, Any] = {"space": sm.space,
                                   "point": [float(ds.x[n]), float(ds.y[n]), float(ds.z[n])],
                                   "sigma_mm": float(ds.attrs["sigma_mm"])}
            if level is not None:
                ans["level"] = level
            if not bool(ds["inside"][n]):
                ans.update(regions=[], outside=True, volume_fraction=0.0)
                out.append(ans)
                continue
            ans["volume_fraction"] = float(ds["volume_fraction"][n])
            p, m = prob[n], mass[n]
            sel = np.flatnonzero(((p >= min_probability) | (m >= min_probability)) & ((p > 0) | (m > 0)))
            sel = sel[np.lexsort((sel, -m[sel], -p[sel]))]
            ans["regions"] = [{"id": lv.regions[c].id, "key": lv.regions[c].key,
                               "name": lv.regions[c].name, "probability": float(p[c]),
                               "mass_inside": float(m[c])} for c in sel.tolist()]
            out.append(ans)
        return out

    def query_json_lines(
        self,
        points_mm: Any,
        space: str | None = None,
        *,
        min_probability: float = DEFAULT_MIN_PROBABILITY,
        level: str | None = None,
        sigma_mm: float | None = None,
    ) -> str:
        """:meth:`query` serialised as JSON Lines (one object per point), built without the
        intermediate dicts so that 10^5 points print in a fraction of a second."""
        if sigma_mm is not None:
            return "".join(json.dumps(a) + "\n" for a in self.query(
                points_mm, space, min_probability=min_probability, level=level,
                sigma_mm=sigma_mm))
        sm, lv, pts, inside, bounds, cols_a, probs_a = self._hits(points_mm, space,
                                                                  min_probability, level)
        cols, probs, bl = cols_a.tolist(), probs_a.tolist(), bounds.tolist()
        frag = [json.dumps({"id": r.id, "key": r.key, "name": r.name})[:-1] + ', "probability": '
                for r in lv.regions]
        head = '{"space": ' + json.dumps(sm.space) + ', "point": ['
        lvl = "" if level is None else ', "level": ' + json.dumps(level)
        lines = []
        for n, (x, y, z) in enumerate(pts.tolist()):
            if inside[n]:
                lo, hi = bl[n], bl[n + 1]
                regions = ", ".join(frag[c] + repr(p) + "}"
                                    for c, p in zip(cols[lo:hi], probs[lo:hi], strict=True))
                lines.append(f"{head}{x!r}, {y!r}, {z!r}]{lvl}, \"regions\": [{regions}]}}\n")
            else:
                lines.append(f"{head}{x!r}, {y!r}, {z!r}]{lvl}, \"regions\": [], \"outside\": true}}\n")
        return "".join(lines)

    # -- scales: through the transform graph -----------------------------------------------------
    def locate(
        self,
        points_mm: Any,
        space: str | None = None,
        *,
        to: str | Sequence[str] | None = None,
        graph: Any = None,
        reconstruction: Any = None,
    ) -> list[dict[str, Any]]:
        """Follow points from one space into others: coordinates, MPM area, and for BigBrain the
        reference brain's section and pixel there.

        Parameters
        ----------
        points_mm
            ``(n, 3)`` or ``(3,)`` RAS mm coordinates in ``space``.
        space
            Space of the points (default: the atlas's primary space).
        to
            Target space(s) (default: every other space of the atlas with maps, and BigBrain).
        graph
            Object with ``map_points(points (n, 3), source_space, target_space) -> (n, 3)``
            (default: ``atlasbuilder.registration.TransformGraph.from_directory(atlas dir)``).
        reconstruction
            Object with ``section_at(points_mm) -> (number, row, col)`` for the reference
            brain (default: ``atlasbuilder.reconstruction.load_reconstruction`` of
            ``<atlas>/brains/BigBrain/reconstruction``).

        Returns
        -------
        list of dict
            Per point ``{"space", "point", "area", "targets": {space: {"point", "area",
            "inside"[, "section"]}}}``; ``area`` is ``{"id", "key", "name"}`` of the MPM label
            (None where unlabelled or the space has no maps). For BigBrain, ``section`` is
            ``{"number", "row", "col"}`` or ``{"unavailable": reason}`` when the atlas holds no
            reconstruction of the reference brain.

        Raises
        ------
        AtlasDirectoryError
            The atlas has no transform graph (registration stage not run).
        UnknownSpaceError, InputError
            Unknown spaces, bad points.
        """
        from .spaces import get_space as _get

        pts = _as_points(points_mm)
        src = self.space_maps(space).space if space is None else _get(space).name
        if to is None:
            targets = [s for s in dict.fromkeys([*self.spaces, *self._reference_spaces()])
                       if s != src]
        else:
            targets = [_get(t).name for t in ([to] if isinstance(to, str) else to)]
        if graph is None:
            graph = self._transform_graph()
        results: list[dict[str, Any]] = [
            {"space": src, "point": p.tolist(), "area": None, "targets": {}} for p in pts]
        for n, a in enumerate(self._areas_at(pts, src)):
            results[n]["area"] = a
        for t in targets:
            mapped = np.asarray(graph.map_points(pts, src, t), dtype=np.float64)
            if mapped.shape != pts.shape:
                raise AtlasDirectoryError(f"{self.path}: the transform graph returned "
                                          f"{mapped.shape} points for {pts.shape}")
            areas = self._areas_at(mapped, t)
            inside = self._inside(mapped, t)
            section: list[dict[str, Any]] | None = None
            if t == "BigBrain":
                section = self._sections_at(mapped, reconstruction)
            for n in range(len(pts)):
                entry: dict[str, Any] = {"point": mapped[n].tolist(), "area": areas[n],
                                         "inside": inside[n]}
                if section is not None:
                    entry["section"] = section[n]
                results[n]["targets"][t] = entry
        return results

    def _reference_spaces(self) -> list[str]:
        p = self.path / "spaces.json"
        if not p.is_file():
            return []
        return [str(d["name"]) for d in json.loads(p.read_text(encoding="utf-8"))
                if not str(d["name"]).startswith("subject:")]

    def _transform_graph(self) -> Any:
        from .registration import TransformGraph

        try:
            return TransformGraph.from_directory(self.path)
        except FileNotFoundError as exc:
            raise AtlasDirectoryError(
                f"{self.path}: no transforms to map points between spaces (the registration "
                f"stage has not run): {exc}") from None

    def _areas_at(self, pts: np.ndarray, space: str) -> list[dict[str, Any] | None]:
        if space not in self._spaces:
            return [None] * len(pts)
        labels = self.labels_at(pts, space)
        gap = self.gap_id(space)
        out: list[dict[str, Any] | None] = []
        for lab in labels.tolist():
            if lab == 0:
                out.append(None)
            elif gap is not None and lab == gap:
                out.append({"id": lab, "key": "gap", "name": "Gap (cortex no mapped area covers)"})
            else:
                r = self.regions.get(lab)
                out.append({"id": r.id, "key": r.key, "name": r.name})
        return out

    def _inside(self, pts: np.ndarray, space: str) -> list[bool | None]:
        if space not in self._spaces:
            return [None] * len(pts)
        return [bool(v) for v in self._spaces[space].grid.nearest_voxel(pts)[1]]

    def _sections_at(self, pts: np.ndarray, reconstruction: Any) -> list[dict[str, Any]]:
        """Section number and pixel of the reference brain at BigBrain points (or why not)."""
        if reconstruction is None:
            rdir = self.path / "brains" / "BigBrain" / "reconstruction"
            if not (rdir / "reconstruction.json").is_file():
                why = f"the atlas holds no reconstruction of the reference brain ({rdir} is missing)"
                return [{"unavailable": why}] * len(pts)
            from .reconstruction import load_reconstruction

            reconstruction = load_reconstruction(rdir)
        res = reconstruction.section_at(pts)
        if isinstance(res, np.ndarray) and res.ndim == 2 and res.shape[1] == 3:
            number, row, col = res.T  # (n, 3) rows of (number, row, col)
        else:
            number, row, col = res
        out: list[dict[str, Any]] = []
        for nb, r, c in zip(np.asarray(number, dtype=np.float64).tolist(),
                            np.asarray(row, dtype=np.float64).tolist(),
                            np.asarray(col, dtype=np.float64).tolist(), strict=True):
            if not np.isfinite(nb) or nb < 0:
                out.append({"unavailable": "the point lies outside the reference brain's sections"})
            else:
                out.append({"number": int(nb), "row": float(r), "col": float(c)})
        return out

    # -- statistics ------------------------------------------------------------------------------
    def statistics(self, region: int | str | Region | None = None) -> dict[str, Any]:
        """The variability statistics tables (``<atlas>/stats/*.csv``) as pandas DataFrames.

        ``region`` keeps the rows of that region and of its leaf areas (any level).

        Raises
        ------
        AtlasDirectoryError
            The atlas has no statistics (the aggregation stage has not run).
        UnknownRegionError
            No such region (with suggestions).
        """
        import pandas as pd

        sdir = self.path / "stats"
        files = sorted(sdir.glob("*.csv")) if sdir.is_dir() else []
        if not files:
            raise AtlasDirectoryError(
                f"{self.path}: no statistics tables in stats/ (the aggregation stage has not run)")
        keys: set[str] | None = None
        if region is not None:
            r = self.regions.get(region)
            keys = {r.key, *(x.key for x in self.regions.descendants(r))}
        out: dict[str, Any] = {}
        for f in files:
            df = pd.read_csv(f, dtype={"brain": str, "brain_a": str, "brain_b": str, "area": str})
            if keys is not None and "area" in df.columns:
                df = df[df["area"].isin(keys)].reset_index(drop=True)
            out[f.stem] = df
        return out


def format_located(answers: Sequence[dict[str, Any]]) -> str:
    """Plain-text form of :meth:`Atlas.locate` answers (what ``atlasbuilder query --to`` prints)."""
    def area(a: dict[str, Any] | None) -> str:
        return "no area" if a is None else f"{a['name']} [{a['key']}]"

    lines = []
    for a in answers:
        x, y, z = a["point"]
        lines.append(f"{a['space']} ({x:g}, {y:g}, {z:g}): {area(a['area'])}")
        for t, e in a["targets"].items():
            tx, ty, tz = e["point"]
            where = "" if e["inside"] is not False else " (outside the maps)"
            lab = "" if e["inside"] is None else f": {area(e['area'])}"
            lines.append(f"  -> {t} ({tx:.2f}, {ty:.2f}, {tz:.2f}){where}{lab}")
            sec = e.get("section")
            if sec is not None:
                if "unavailable" in sec:
                    lines.append(f"     section: {sec['unavailable']}")
                else:
                    lines.append(f"     section {sec['number']}, pixel (row {sec['row']:.1f}, "
                                 f"col {sec['col']:.1f})")
    return "\n".join(lines) + "\n"


def format_statistics(tables: dict[str, Any]) -> str:
    """Plain-text form of :meth:`Atlas.statistics` (what ``atlasbuilder stats`` prints): the
    per-area summary and the asymmetry table (the per-brain tables are in ``stats/*.csv``)."""
    out = []
    for name, title in (("area_summary", "per area"), ("asymmetry", "left/right asymmetry")):
        df = tables.get(name)
        if df is None or not len(df):
            continue
        out.append(f"{title} ({name}.csv):")
        out.append(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        out.append("")
    return "\n".join(out) + ("\n" if out else "")


def inside_centroid(coords_mm: np.ndarray) -> np.ndarray:
    """A centroid guaranteed to lie in a region: the region's voxel centre nearest to its
    centre of mass (which is the centre of mass's own voxel whenever that voxel belongs to the
    region; ties: the first in order). ``coords_mm`` are the region's voxel centres (n, 3).
    """
    c = coords_mm.mean(axis=0)
    d2 = ((coords_mm - c) ** 2).sum(axis=1)
    return np.asarray(coords_mm[int(np.argmin(d2))], dtype=np.float64)


def _check_sigma(sigma_mm: Any) -> float:
    try:
        s = float(sigma_mm)
    except (TypeError, ValueError):
        raise InputError(f"sigma_mm must be a number of mm, got {sigma_mm!r}") from None
    if not np.isfinite(s) or s <= 0:
        raise InputError(f"sigma_mm must be > 0 mm, got {sigma_mm!r}")
    if s > MAX_SIGMA_MM:
        raise InputError(f"sigma_mm = {s:g} mm is absurdly large (at most {MAX_SIGMA_MM:g} mm)")
    return s


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
