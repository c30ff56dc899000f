"""Aggregation over brains: probability maps, maximum probability map, variability statistics.

Inputs are one label volume per brain already in a reference space's grid (region ids of the
hierarchy; 0 = no area; a negative value marks voxels the brain does not cover, e.g. beyond its
sectioned block). Nothing here registers or resamples: every brain must be on the same grid.

Probability maps
    ``p_a(v) = #{brains labelled a at v} / #{brains covering v}`` (hard labels), or the mean of
    the brains' soft probabilities (``settings.soft``). A hemisphere area counts only brains
    that have that hemisphere. ``coverage(v)`` is the number of brains covering ``v``.

Maximum probability map (in the spirit of Eickhoff et al. 2005, 2006)
    1. each voxel takes the area of highest probability;
    2. ties (exactly equal probabilities) go to the tied area with the highest mean probability
       over the voxel's 26 neighbours (voxels beyond the grid count as 0);
    3. remaining ties go to the area that comes first in ``areas`` (a fixed order); neighbourhood
       means within ``1e-6`` of each other count as tied, so that float rounding (maps held as
       float32 or float64, or as stored hundredths) cannot decide between them;
    4. a voxel whose total probability ``sum_a p_a(v)`` is below ``mpm_min_probability`` (or is
       0) gets no area (0);
    5. with ``gap_label``, voxels of the cortex mask left without an area get the gap label.
    The rule is deterministic: no randomness, no dependence on the order of the brains.

Entropy map
    Shannon entropy in bits of the voxel's distribution over the areas and "none":
    ``(p_1, ..., p_n, 1 - sum p)``; where overlapping soft maps sum above 1 the ``p`` are
    renormalised (and "none" is 0).

Statistics (:func:`compute_statistics`) are CSV tables in ``<atlas>/stats/``, described in that
function's docstring.

Example
-------
>>> summary = aggregate_space({"B01": "b01.nii.gz", "B02": "b02.nii.gz"},  # doctest: +SKIP
...                           "MNI152NLin2009cAsym", ["hOc1_left", "hOc1_right"], tree, "atlas")
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import AtlasDirectoryError, GridMismatchError, InputError
from .regions import Region, RegionTree
from .volumes import Grid

if TYPE_CHECKING:
    import xarray as xr

    from .atlas import SpaceMaps
    from .manifest import AggregationSettings

__all__ = [
    "DEFAULT_THRESHOLDS",
    "GAP_KEY",
    "AggregationSummary",
    "StatisticsSummary",
    "aggregate_space",
    "compute_statistics",
    "dice",
    "entropy_map",
    "maximum_probability_map",
    "probability_maps",
]

log = logging.getLogger(__name__)

GAP_KEY = "gap"
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_MEAN_TIE = 1e-6  # neighbourhood means closer than this are tied (MPM rule, step 3)
_OFFSETS_26 = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
                        if (i, j, k) != (0, 0, 0)], dtype=np.int64)

PathLike = str | Path


@dataclass(frozen=True)
class AggregationSummary:
    """What :func:`aggregate_space` wrote for one space."""

    space: str
    brains: tuple[str, ...]
    areas: tuple[str, ...]
    mode: str  # "hard" or "soft"
    maps: SpaceMaps  # for atlas.write_atlas_metadata
    gap_id: int | None
    mpm_voxels: dict[str, int] = field(default_factory=dict)  # area key -> voxels in the MPM
    max_probability: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.space, "brains": list(self.brains), "areas": list(self.areas),
                "mode": self.mode, "gap_id": self.gap_id, "mpm_voxels": dict(self.mpm_voxels),
                "max_probability": dict(self.max_probability)}


# -- reading the brains ------------------------------------------------------------------------
def _read_labels(label_files: Mapping[str, Any], space: str) -> tuple[list[str], np.ndarray, Grid]:
    """Stack of label volumes (brain, x, y, z) as int32, all checked onto one grid."""
    from .volumes import grid_of, read_nifti

    if not label_files:
        raise InputError(f"no label volumes to aggregate in space {space!r}")
    brains = list(label_files)
    stack: np.ndarray | None = None
    grid0: Grid | None = None
    for n, b in enumerate(brains):
        src = label_files[b]
        vol = src if _is_volume(src) else read_nifti(src, space, name="labels")
        da = vol if not hasattr(vol, "data_vars") else vol[next(iter(vol.data_vars))]
        grid = grid_of(da)
        data = np.asarray(da.transpose("x", "y", "z").values)
        if np.issubdtype(data.dtype, np.floating):
            if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
                raise InputError(f"brain {b}: label volume {_name(src)} holds non-integer values "
                                 "(expected region ids)")
        if grid0 is None:
            grid0 = grid
            stack = np.empty((len(brains), *grid.shape), dtype=np.int32)
        elif not _same_grid(grid, grid0):
            raise GridMismatchError(
                f"brain {b}: label volume {_name(src)} is on grid {_grid_text(grid)} but brain "
                f"{brains[0]}'s is on {_grid_text(grid0)}; resample every brain onto the "
                f"{space} grid first")
        assert stack is not None
        stack[n] = data
    assert stack is not None and grid0 is not None
    return brains, stack, grid0


def _is_volume(obj: Any) -> bool:
    return hasattr(obj, "dims") and hasattr(obj, "coords")


def _name(src: Any) -> str:
    return str(src) if not _is_volume(src) else "<volume>"


def _same_grid(a: Grid, b: Grid) -> bool:
    return (a.shape == b.shape and np.allclose(a.origin, b.origin, atol=1e-4)
            and np.allclose(a.spacing, b.spacing, rtol=1e-6))


def _grid_text(g: Grid) -> str:
    return (f"shape {g.shape}, origin {tuple(round(v, 3) for v in g.origin)} mm, "
            f"spacing {tuple(round(v, 4) for v in g.spacing)} mm")


def _read_mask(src: Any, space: str, grid: Grid, what: str) -> np.ndarray:
    from .volumes import grid_of, read_nifti

    if isinstance(src, np.ndarray):
        arr = src
    else:
        vol = src if _is_volume(src) else read_nifti(src, space, name="mask")
        da = vol if not hasattr(vol, "data_vars") else vol[next(iter(vol.data_vars))]
        if not _same_grid(grid_of(da), grid):
            raise GridMismatchError(f"{what} {_name(src)} is on grid {_grid_text(grid_of(da))}, "
                                    f"the brains on {_grid_text(grid)}")
        arr = np.asarray(da.transpose("x", "y", "z").values)
    if arr.shape != grid.shape:
        raise GridMismatchError(f"{what} has shape {arr.shape}; the brains' grid is {grid.shape}")
    return np.asarray(arr) > 0


# -- probability maps ---------------------------------------------------------------------------
def _denominators(stack: np.ndarray, brains: Sequence[str], regions: Sequence[Region],
                  hemispheres: Mapping[str, Sequence[str]] | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Coverage (brains covering each voxel) and, per area, the brains that count for it."""
    covering = stack >= 0
    coverage = covering.sum(axis=0).astype(np.int32)
    cache: dict[str | None, np.ndarray] = {None: coverage}
    per_area = []
    for r in regions:
        h = r.hemisphere if hemispheres is not None else None
        if h not in cache:
            assert hemispheres is not None
            use = [n for n, b in enumerate(brains) if h in hemispheres.get(b, ("left", "right"))]
            cache[h] = covering[use].sum(axis=0).astype(np.int32) if use else np.zeros_like(coverage)
        per_area.append(cache[h])
    return coverage, per_area


def _probability(count: np.ndarray, denom: np.ndarray) -> np.ndarray:
    out = np.zeros(count.shape, dtype=np.float64)
    np.divide(count, denom, out=out, where=denom > 0)
    return out


class _AreaMaps(Sequence[np.ndarray]):
    """Probability maps, one area at a time (float64, exact fractions), kept sparse.

    Each area's non-zero voxels and probabilities are computed once and cached (a few bytes per
    voxel an area covers); indexing returns the dense map, built by one scatter.
    """

    def __init__(self, stack: np.ndarray, ids: Sequence[int], denoms: Sequence[np.ndarray],
                 soft: Sequence[Any] | None = None) -> None:
        self.ids, self.soft = list(ids), soft
        self.denoms = [d.reshape(-1) for d in denoms]
        self.shape = stack.shape[1:]
        self.n_vox = int(np.prod(self.shape))
        self._sparse: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if soft is None:
            # one pass over the brains: sparse (area, voxel) -> count of brains
            pos = {rid: n for n, rid in enumerate(self.ids)}
            lut_ids = np.array(sorted(pos), dtype=np.int64)
            lut_pos = np.array([pos[i] for i in lut_ids], dtype=np.int64)
            codes = []
            for lab in stack.reshape(len(stack), -1):
                v = np.flatnonzero(lab > 0)
                k = np.clip(np.searchsorted(lut_ids, lab[v]), 0, len(lut_ids) - 1)
                hit = lut_ids[k] == lab[v]
                codes.append(lut_pos[k[hit]] * self.n_vox + v[hit])
            self.codes, self.counts = np.unique(np.concatenate(codes), return_counts=True)
            self.bounds = np.searchsorted(self.codes, np.arange(len(self.ids) + 1) * self.n_vox)

    def __len__(self) -> int:
        return len(self.ids)

    def sparse(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat voxel indices and probabilities (> 0) of area ``i``."""
        if i not in self._sparse:
            if self.soft is not None:
                total = self.soft[i]().reshape(-1)
                vox = np.flatnonzero(total)
                num = total[vox]
            else:
                lo, hi = self.bounds[i], self.bounds[i + 1]
                vox = self.codes[lo:hi] - i * self.n_vox
                num = self.counts[lo:hi].astype(np.float64)
            den = self.denoms[i][vox]
            ok = den > 0
            self._sparse[i] = (vox[ok], num[ok] / den[ok])
        return self._sparse[i]

    def __getitem__(self, i: Any) -> Any:
        if not isinstance(i, int | np.integer):
            raise TypeError("area maps are indexed by an integer")
        vox, p = self.sparse(int(i))
        out = np.zeros(self.n_vox, dtype=np.float64)
        out[vox] = p
        return out.reshape(self.shape)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]


class _Encoded(Sequence[np.ndarray]):
    """uint8 percent view of area maps (what the store holds)."""

    def __init__(self, maps: _AreaMaps) -> None:
        self.maps = maps

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i: Any) -> Any:
        vox, p = self.maps.sparse(int(i))
        out = np.zeros(self.maps.n_vox, dtype=np.uint8)
        out[vox] = np.rint(np.clip(p, 0, 1) * 100).astype(np.uint8)
        return out.reshape(self.maps.shape)


def probability_maps(
    label_stack: np.ndarray,
    region_ids: Sequence[int],
    *,
    hemisphere_brains: Sequence[np.ndarray | None] | None = None,
) -> np.ndarray:
    """Probability maps from a stack of hard labels (the plain, in-memory form).

    Parameters
    ----------
    label_stack
        ``(brain, x, y, z)`` integer labels (region ids, 0 none, negative = not covered).
    region_ids
        Areas, in map order.
    hemisphere_brains
        Per area, a boolean mask over brains that count for it (None: all brains).

    Returns
    -------
    ndarray
        ``(area, x, y, z)`` float64: labelled brains / covering (and counting) brains.
    """
    covering = label_stack >= 0
    out = np.zeros((len(region_ids), *label_stack.shape[1:]))
    for i, rid in enumerate(region_ids):
        use = slice(None) if hemisphere_brains is None or hemisphere_brains[i] is None \
            else np.asarray(hemisphere_brains[i], dtype=bool)
        out[i] = _probability((label_stack[use] == rid).sum(axis=0), covering[use].sum(axis=0))
    return out


# -- maximum probability map and entropy --------------------------------------------------------
def maximum_probability_map(
    pmaps: Sequence[np.ndarray] | np.ndarray,
    region_ids: Sequence[int],
    *,
    min_probability: float = 0.2,
    cortex_mask: np.ndarray | None = None,
    gap_id: int | None = None,
) -> np.ndarray:
    """The maximum probability map by the rule in the module docstring.

    Parameters
    ----------
    pmaps
        ``(area, x, y, z)`` probabilities, or a sequence of ``(x, y, z)`` maps read one at a time
        (each is read twice: once for the maximum, once more only where ties need breaking).
    region_ids
        Area ids in the fixed tie order (map order).
    min_probability
        Minimum total probability ``sum_a p_a(v)`` for a voxel to get an area.
    cortex_mask, gap_id
        With both given, cortex voxels left without an area get ``gap_id``.

    Returns
    -------
    ndarray of int32
        Region ids (0: no area).

    Examples
    --------
    >>> p = np.zeros((2, 3, 1, 1)); p[0, :, 0, 0] = [.5, .5, .1]; p[1, :, 0, 0] = [.5, .2, .1]
    >>> maximum_probability_map(p, [7, 9], min_probability=0.3)[:, 0, 0].tolist()
    [7, 7, 0]
    """
    if not 0 <= min_probability <= 1:
        raise InputError(f"mpm_min_probability must be within 0..1, got {min_probability}")
    n = len(pmaps)
    if n != len(region_ids) or n == 0:
        raise InputError(f"{n} maps for {len(region_ids)} region ids")
    first = np.asarray(pmaps[0], dtype=np.float64)
    top = first.copy()
    best = np.zeros(top.shape, dtype=np.int32)
    ties = (top > 0).astype(np.int32)
    total = first.copy()
    for i in range(1, n):
        p = np.asarray(pmaps[i], dtype=np.float64)
        gt = p > top
        eq = (p == top) & (p > 0)
        best[gt] = i
        ties[gt] = 1
        ties[eq] += 1
        np.maximum(top, p, out=top)
        total += p
    tied = np.argwhere(ties > 1)
    if len(tied):
        shape = np.asarray(top.shape)
        nb = tied[:, None, :] + _OFFSETS_26[None]  # (voxel, neighbour, 3)
        ok = np.all((nb >= 0) & (nb < shape), axis=2)
        nbc = np.clip(nb, 0, shape - 1)
        t_top = top[tuple(tied.T)]
        best_nb = np.full(len(tied), -1.0)
        t_best = np.zeros(len(tied), dtype=np.int32)
        for i in range(n):
            p = np.asarray(pmaps[i], dtype=np.float64)
            cand = p[tuple(tied.T)] == t_top
            if not cand.any():
                continue
            vals = np.where(ok, p[nbc[..., 0], nbc[..., 1], nbc[..., 2]], 0.0)
            mean = vals.sum(axis=1) / len(_OFFSETS_26)
            win = cand & (mean > best_nb + _MEAN_TIE)  # an earlier area keeps a tie
            t_best[win] = i
            best_nb[win] = mean[win]
        best[tuple(tied.T)] = t_best
    ids = np.asarray(region_ids, dtype=np.int32)
    keep = (top > 0) & (total >= min_probability - 1e-12)
    mpm = np.where(keep, ids[best], 0).astype(np.int32)
    if cortex_mask is not None and gap_id is not None:
        mpm[(mpm == 0) & np.asarray(cortex_mask, dtype=bool)] = gap_id
    return mpm


def entropy_map(pmaps: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each voxel's distribution over the areas and "none".

    ``H = -sum_a p_a log2 p_a - q log2 q`` with ``q = 1 - sum_a p_a``; where the maps sum
    above 1 they are renormalised to sum to 1 (``q = 0``).

    Examples
    --------
    >>> float(entropy_map(np.array([.5, .5]).reshape(2, 1, 1, 1))[0, 0, 0])
    1.0
    """
    first = np.asarray(pmaps[0], dtype=np.float64)
    s = np.zeros(first.shape)
    t = np.zeros(first.shape)
    for i in range(len(pmaps)):
        p = first if i == 0 else np.asarray(pmaps[i], dtype=np.float64)
        pos = p > 0
        s[pos] -= p[pos] * np.log2(p[pos])
        t += p
    over = t > 1
    h = s.copy()
    h[over] = s[over] / t[over] + np.log2(t[over])
    q = np.clip(1 - t, 0, 1)
    pos = (q > 0) & ~over
    h[pos] -= q[pos] * np.log2(q[pos])
    return np.maximum(h, 0).astype(np.float32)


# -- the stage ---------------------------------------------------------------------------------
def aggregate_space(
    label_files: Mapping[str, Any],
    space: str,
    areas: Sequence[str],
    tree: RegionTree,
    out_dir: PathLike,
    *,
    settings: AggregationSettings | None = None,
    prob_files: Mapping[str, Mapping[str, Any]] | None = None,
    cortex_mask: Any = None,
    hemispheres: Mapping[str, Sequence[str]] | None = None,
) -> AggregationSummary:
    """Aggregate the brains' labels in one space into the atlas store.

    Writes ``<out_dir>/store.zarr/<space>/``: probability maps (uint8 percent, per-area chunks),
    the maximum probability map, coverage and entropy maps and the sparse voxel index (see
    :func:`atlasbuilder.atlas.write_space_maps`); the space's group appears atomically.

    Parameters
    ----------
    label_files
        Brain id -> label volume (NIfTI path or volume) on the space's grid: region ids of
        ``tree`` (0 none, negative = voxel not covered by that brain).
    space
        The reference space (any alias; stored under its canonical name).
    areas
        Leaf region keys to map, in the fixed order used to break MPM ties.
    tree
        The region hierarchy.
    out_dir
        The atlas directory.
    settings
        ``mpm_min_probability``, ``gap_label``, ``soft`` (manifest ``stages.aggregation``);
        defaults if None.
    prob_files
        Soft mode: brain id -> area key -> probability volume (0..1) on the same grid.
    cortex_mask
        Cortex mask on the grid (path, volume or array); required with ``gap_label``.
    hemispheres
        Brain id -> hemispheres it has (manifest ``subjects[i].hemispheres``); a hemisphere
        area counts only the brains that have that hemisphere. Default: both.

    Returns
    -------
    AggregationSummary

    Raises
    ------
    InputError
        Unknown or non-leaf areas, a brain on another grid (named), soft mode without
        probabilities, gap label without a cortex mask.
    """
    from .atlas import write_space_maps
    from .manifest import AggregationSettings
    from .spaces import get_space

    settings = settings or AggregationSettings()
    space = get_space(space).name
    regions = _leaf_regions(tree, areas)
    ids = [r.id for r in regions]
    brains, stack, grid = _read_labels(label_files, space)
    if hemispheres is not None:
        missing = [b for b in brains if b not in hemispheres]
        if missing:
            raise InputError(f"hemispheres not given for brain(s) {missing}")
        for n, b in enumerate(brains):  # a brain's labels of a hemisphere it lacks do not count
            drop = [r.id for r in regions if r.hemisphere is not None
                    and r.hemisphere not in hemispheres[b]]
            bad = np.isin(stack[n], drop) if drop else None
            if bad is not None and bad.any():
                log.warning("brain %s: %d voxels labelled with areas of a hemisphere it does not "
                            "have; ignored", b, int(bad.sum()))
                stack[n][bad] = 0
    known = set(ids)
    present = set(np.unique(stack).tolist()) - {0}
    stray = sorted(v for v in present if v > 0 and v not in known)
    if stray:
        log.warning("%s: label values %s are not among the aggregated areas; counted as none",
                    space, stray[:10])
    coverage, denoms = _denominators(stack, brains, regions, hemispheres)
    soft_readers = None
    if settings.soft:
        soft_readers = _soft_readers(prob_files, brains, regions, space, grid, stack, hemispheres)
    maps = _AreaMaps(stack, ids, denoms, soft_readers)
    cortex = None
    gap_id = None
    if settings.gap_label:
        if cortex_mask is None:
            raise InputError(f"{space}: the gap label (stages.aggregation.gap_label) needs a "
                             "cortex mask on the space's grid")
        cortex = _read_mask(cortex_mask, space, grid, "cortex mask")
        gap_id = _gap_id(tree)
    mpm = maximum_probability_map(maps, ids, min_probability=settings.mpm_min_probability,
                                  cortex_mask=cortex, gap_id=gap_id)
    ent = entropy_map(maps)
    out = Path(out_dir)
    sm = write_space_maps(out / "store.zarr", space, _Encoded(maps), grid, ids, divisor=100.0,
                          mpm=mpm, coverage=coverage, entropy=ent, gap_id=gap_id,
                          attrs={"n_brains": len(brains), "brains": brains,
                                 "mode": "soft" if settings.soft else "hard",
                                 "mpm_min_probability": settings.mpm_min_probability,
                                 "mpm_rule": "max probability; ties by 26-neighbourhood mean, "
                                             "then area order; min total probability"})
    counts = np.bincount(mpm[mpm > 0].ravel(), minlength=max(ids) + 1) if mpm.any() else None
    mpm_vox = {r.key: int(counts[r.id]) if counts is not None and r.id < len(counts) else 0
               for r in regions}
    maxp = {r.key: float(maps.sparse(i)[1].max(initial=0.0)) for i, r in enumerate(regions)}
    return AggregationSummary(space, tuple(brains), tuple(r.key for r in regions),
                              "soft" if settings.soft else "hard", sm, gap_id, mpm_vox, maxp)


def _leaf_regions(tree: RegionTree, areas: Sequence[str]) -> list[Region]:
    if not areas:
        raise InputError("no areas to aggregate")
    regions = [tree.get(a) for a in areas]
    for r in regions:
        if r.children:
            raise InputError(f"area {r.key!r} is not a leaf of the hierarchy; aggregate its "
                             f"leaves {[x.key for x in tree.leaves(r)][:6]}")
    keys = [r.key for r in regions]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise InputError(f"areas listed twice: {dup}")
    return regions


def _gap_id(tree: RegionTree) -> int:
    """The gap's label: a region keyed ``gap`` in the hierarchy, else one above every id."""
    try:
        return tree.get(GAP_KEY).id
    except InputError:
        return max(r.id for r in tree) + 1


def _soft_readers(prob_files: Mapping[str, Mapping[str, Any]] | None, brains: Sequence[str],
                  regions: Sequence[Region], space: str, grid: Grid, stack: np.ndarray,
                  hemispheres: Mapping[str, Sequence[str]] | None) -> list[Any]:
    if not prob_files:
        raise InputError(f"{space}: soft aggregation (stages.aggregation.soft) needs the brains' "
                         "probability volumes")
    for b in brains:
        if b not in prob_files:
            raise InputError(f"{space}: no probability volumes for brain {b}")

    def reader(r: Region) -> Any:
        def read() -> np.ndarray:
            total = np.zeros(grid.shape)
            for n, b in enumerate(brains):
                if hemispheres is not None and r.hemisphere not in hemispheres[b] \
                        and r.hemisphere is not None:
                    continue
                src = prob_files[b].get(r.key)
                if src is None:
                    raise InputError(f"{space}: brain {b} has no probability volume for {r.key}")
                p = _read_prob(src, space, grid, f"brain {b} area {r.key}")
                total += np.where(stack[n] >= 0, p, 0)
            return total
        return read

    return [reader(r) for r in regions]


def _read_prob(src: Any, space: str, grid: Grid, what: str) -> np.ndarray:
    from .volumes import grid_of, read_nifti

    if isinstance(src, np.ndarray):
        arr = np.asarray(src, dtype=np.float64)
    else:
        vol = src if _is_volume(src) else read_nifti(src, space, name="probability")
        da = vol if not hasattr(vol, "data_vars") else vol[next(iter(vol.data_vars))]
        if not _same_grid(grid_of(da), grid):
            raise GridMismatchError(f"{what}: probability volume {_name(src)} is on grid "
                                    f"{_grid_text(grid_of(da))}, the labels on {_grid_text(grid)}")
        arr = np.asarray(da.transpose("x", "y", "z").values, dtype=np.float64)
    if arr.shape != grid.shape:
        raise GridMismatchError(f"{what}: probability volume has shape {arr.shape}, expected {grid.shape}")
    if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
        raise InputError(f"{what}: probabilities must lie within 0..1 "
                         f"(found {arr.min():.3g}..{arr.max():.3g})")
    return np.clip(arr, 0, 1)


# -- statistics ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatisticsSummary:
    """The tables :func:`compute_statistics` wrote (name -> path) and their row counts."""

    tables: dict[str, Path]
    rows: dict[str, int]


def _stored_map_reader(atlas_dir: Path, space: str, grid: Grid) -> Any:
    """``region -> probability map (float64, the whole grid)`` from the space's stored maps."""
    import zarr

    path = atlas_dir / "store.zarr" / space
    try:
        group: Any = zarr.open_group(str(path), mode="r")
        pmaps, ids = group["pmaps"], np.asarray(group["region"][...])
    except Exception as exc:  # no store, no space group or no pmaps in it
        raise AtlasDirectoryError(f"{path}: no probability maps to take the statistics' maps "
                                  f"from ({type(exc).__name__}); aggregate the space first") from None
    if tuple(pmaps.shape[1:]) != tuple(grid.shape):
        raise GridMismatchError(f"{path}: maps of shape {tuple(pmaps.shape[1:])}, labels on "
                                f"{_grid_text(grid)}")
    column = {int(rid): i for i, rid in enumerate(ids)}
    divisor = float(group.attrs["divisor"])

    def read(r: Region) -> np.ndarray:
        if r.id not in column:
            return np.zeros(grid.shape)
        return np.asarray(pmaps[column[r.id]], dtype=np.float64) / divisor

    return read


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks; NaN when both are empty.

    Examples
    --------
    >>> dice(np.array([1, 1, 0], bool), np.array([1, 0, 0], bool))
    0.6666666666666666
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    s = int(a.sum()) + int(b.sum())
    return float("nan") if s == 0 else 2.0 * int((a & b).sum()) / s


def _centroid(mask: np.ndarray, grid: Grid) -> tuple[float, float, float]:
    idx = np.argwhere(mask)
    if not len(idx):
        return (math.nan, math.nan, math.nan)
    c = idx.mean(axis=0) * np.asarray(grid.spacing) + np.asarray(grid.origin)
    return (float(c[0]), float(c[1]), float(c[2]))


def compute_statistics(
    out_dir: PathLike,
    tree: RegionTree,
    areas: Sequence[str],
    space_label_files: Mapping[str, Mapping[str, Any]],
    *,
    native_label_files: Mapping[str, Any] | None = None,
    shrinkage: Mapping[str, float] | None = None,
    dice_space: str | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    maps_from_store: bool = False,
) -> StatisticsSummary:
    """Variability statistics over the brains, written atomically as CSV to ``<out_dir>/stats/``.

    Parameters
    ----------
    out_dir
        The atlas directory.
    tree, areas
        The hierarchy and the leaf area keys.
    space_label_files
        Reference space -> brain id -> label volume on that space's grid (as for
        :func:`aggregate_space`).
    native_label_files
        Brain id -> label volume in the brain's own (``subject:<id>``) space.
    shrinkage
        Brain id -> linear shrinkage factor (manifest ``subjects[i].shrinkage``): native volumes
        are corrected by its cube. Default 1.
    dice_space
        Space of the pairwise Dice and the leave-one-out cross-validation (default: the first of
        ``space_label_files``, normally MNI152NLin2009cAsym).
    thresholds
        Probability thresholds of the leave-one-brain-out cross-validation.
    maps_from_store
        Take the probability map of the probability-weighted volume and of the volumes at
        p >= 0.25 / 0.5 from ``<out_dir>/store.zarr/<space>`` (what :func:`aggregate_space`
        wrote: the mean soft probabilities of a soft build) instead of the fraction of brains
        labelled. The other statistics always come from the labels.

    Returns
    -------
    StatisticsSummary

    Notes
    -----
    Tables (one row per item; empty cells are undefined values):

    ``brain_area.csv``
        brain, area, space (``native`` or a reference space), n_voxels, volume_mm3,
        volume_corrected_mm3 (native: ``volume * shrinkage**3``; reference spaces: the same as
        volume), centroid_x/y/z_mm (in that space's mm; native: the brain's own frame).
    ``area_summary.csv``
        per area and space: n_brains (with the area), volume_mean_mm3, volume_sd_mm3 (n-1),
        cv (sd / mean), group centroid (mean of the brains' centroids), centroid_spread_mm
        (mean distance of the brains' centroids to it) and centroid_spread_max_mm; in reference
        spaces the probability-weighted volume ``sum_v p(v) dV`` and the volumes at p >= 0.25
        and p >= 0.5; in the Dice space the mean/SD of pairwise Dice and the leave-one-out best
        threshold with its mean Dice.
    ``asymmetry.csv``
        per area with left and right leaves and space: n_pairs, left/right mean volume,
        ai_mean, ai_sd with ``AI = (L - R) / ((L + R) / 2)`` per brain, and the paired t-test
        of L against R (``scipy.stats.ttest_rel``: t_statistic, p_value; needs 2 pairs whose
        differences are not all equal, else empty).
    ``dice_pairwise.csv``
        area, brain_a, brain_b, dice (Dice space).
    ``loo_cv.csv``
        area, brain (left out), threshold, dice: the brain's area against the map of the
        other brains thresholded at ``p >= threshold`` (needs at least 2 brains).
    """
    import pandas as pd

    from .storage import atomic_write_text

    if not space_label_files:
        raise InputError("statistics need label volumes in at least one reference space")
    regions = _leaf_regions(tree, areas)
    shrinkage = dict(shrinkage or {})
    for b, s in shrinkage.items():
        if not (isinstance(s, int | float) and 0 < s <= 2):
            raise InputError(f"brain {b}: shrinkage must be a linear factor in (0, 2], got {s!r}")
    spaces = list(space_label_files)
    from .spaces import get_space

    canon = {s: get_space(s).name for s in spaces}
    dspace = canon[spaces[0]] if dice_space is None else get_space(dice_space).name
    if dspace not in canon.values():
        raise InputError(f"dice_space {dspace!r} has no label volumes; spaces: {list(canon.values())}")
    for t in thresholds:
        if not 0 < t <= 1:
            raise InputError(f"thresholds must lie in (0, 1], got {t}")

    brain_rows: list[dict[str, Any]] = []
    summary_rows: list[dict[str, Any]] = []
    asym_rows: list[dict[str, Any]] = []
    dice_rows: list[dict[str, Any]] = []
    loo_rows: list[dict[str, Any]] = []

    volumes: dict[str, dict[tuple[str, str], float]] = {}  # space -> (brain, area) -> volume
    if native_label_files:
        nat: dict[tuple[str, str], float] = {}
        for b, src in native_label_files.items():
            _, st, g = _read_labels({b: src}, f"subject:{b}")
            f = float(shrinkage.get(b, 1.0)) ** 3
            vv = float(np.prod(g.spacing))
            for r in regions:
                m = st[0] == r.id
                n = int(m.sum())
                c = _centroid(m, g)
                nat[(b, r.key)] = n * vv * f
                brain_rows.append({"brain": b, "area": r.key, "space": "native", "n_voxels": n,
                                   "volume_mm3": n * vv, "volume_corrected_mm3": n * vv * f,
                                   "centroid_x_mm": c[0], "centroid_y_mm": c[1],
                                   "centroid_z_mm": c[2]})
        volumes["native"] = nat
        summary_rows += _summaries(brain_rows, "native", regions)

    for sp in spaces:
        cs = canon[sp]
        brains, stack, grid = _read_labels(space_label_files[sp], cs)
        vv = float(np.prod(grid.spacing))
        rows_here: list[dict[str, Any]] = []
        vol: dict[tuple[str, str], float] = {}
        cover_b = stack >= 0
        crops: dict[str, tuple[np.ndarray, np.ndarray, Grid]] = {}
        for r in regions:
            # every per-area computation runs on the bounding box of the area in any brain
            masks, cov, sub = _crop_area(stack == r.id, cover_b, grid)
            crops[r.key] = (masks, cov, sub)
            for n, b in enumerate(brains):
                k = int(masks[n].sum())
                c = _centroid(masks[n], sub)
                vol[(b, r.key)] = k * vv
                rows_here.append({"brain": b, "area": r.key, "space": cs, "n_voxels": k,
                                  "volume_mm3": k * vv, "volume_corrected_mm3": k * vv,
                                  "centroid_x_mm": c[0], "centroid_y_mm": c[1],
                                  "centroid_z_mm": c[2]})
        brain_rows += rows_here
        volumes[cs] = vol
        sums = _summaries(rows_here, cs, regions)
        stored = _stored_map_reader(Path(out_dir), cs, grid) if maps_from_store else None
        for row, r in zip(sums, regions, strict=True):
            masks, cov, _ = crops.pop(r.key)
            p = _probability(masks.sum(axis=0), cov.sum(axis=0)) if stored is None else stored(r)
            row["pmap_weighted_volume_mm3"] = float(p.sum() * vv)
            row["volume_p25_mm3"] = float((p >= 0.25).sum() * vv)
            row["volume_p50_mm3"] = float((p >= 0.5).sum() * vv)
            if cs == dspace:
                d = _pairwise_dice(masks, brains)
                for (a, b), v in d.items():
                    dice_rows.append({"area": r.key, "brain_a": a, "brain_b": b, "dice": v})
                dv = np.array(list(d.values()), dtype=np.float64)
                ok = dv[np.isfinite(dv)]
                row["dice_mean"] = float(ok.mean()) if ok.size else math.nan
                row["dice_sd"] = float(ok.std(ddof=1)) if ok.size > 1 else math.nan
                loo = _leave_one_out(masks, cov, brains, thresholds)
                for (b, t), v in loo.items():
                    loo_rows.append({"area": r.key, "brain": b, "threshold": t, "dice": v})
                best_t, best_d = _best_threshold(loo, thresholds)
                row["loo_best_threshold"] = best_t
                row["loo_best_dice"] = best_d
        summary_rows += sums

    for sname, vol in volumes.items():
        asym_rows += _asymmetry(tree, regions, vol, sname)

    sdir = Path(out_dir) / "stats"
    sdir.mkdir(parents=True, exist_ok=True)
    tables = {
        "brain_area": (brain_rows, ["brain", "area", "space", "n_voxels", "volume_mm3",
                                    "volume_corrected_mm3", "centroid_x_mm", "centroid_y_mm",
                                    "centroid_z_mm"]),
        "area_summary": (summary_rows, _SUMMARY_COLUMNS),
        "asymmetry": (asym_rows, ["area", "space", "n_pairs", "left_mean_mm3", "right_mean_mm3",
                                  "ai_mean", "ai_sd", "t_statistic", "p_value"]),
        "dice_pairwise": (dice_rows, ["area", "brain_a", "brain_b", "dice"]),
        "loo_cv": (loo_rows, ["area", "brain", "threshold", "dice"]),
    }
    paths: dict[str, Path] = {}
    counts: dict[str, int] = {}
    for name, (rows, cols) in tables.items():
        df = pd.DataFrame(rows, columns=cols)
        path = sdir / f"{name}.csv"
        atomic_write_text(path, df.to_csv(index=False, float_format="%.6g"))
        paths[name] = path
        counts[name] = len(df)
    return StatisticsSummary(paths, counts)


def _crop_area(masks: np.ndarray, covering: np.ndarray, grid: Grid
               ) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Masks and coverage cut to the bounding box of the area in any brain, with its grid.

    Thresholded maps with a threshold > 0 and Dice never reach outside that box, so every
    statistic computed on the crop equals the one on the whole grid."""
    union = masks.any(axis=0)
    if not union.any():
        one = (slice(0, 1),) * 3
        sub = Grid((1, 1, 1), grid.origin, grid.spacing)
        return masks[(slice(None), *one)], covering[(slice(None), *one)], sub
    box = []
    for ax in range(3):
        hit = np.flatnonzero(np.any(union, axis=tuple(a for a in range(3) if a != ax)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    origin = tuple(o + s * b.start for o, s, b in zip(grid.origin, grid.spacing, box, strict=True))
    sub = Grid(tuple(b.stop - b.start for b in box), origin, grid.spacing)  # type: ignore[arg-type]
    return masks[(slice(None), *box)], covering[(slice(None), *box)], sub


_SUMMARY_COLUMNS = ["area", "space", "n_brains", "volume_mean_mm3", "volume_sd_mm3", "cv",
                    "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "centroid_spread_mm",
                    "centroid_spread_max_mm", "pmap_weighted_volume_mm3", "volume_p25_mm3",
                    "volume_p50_mm3", "dice_mean", "dice_sd", "loo_best_threshold",
                    "loo_best_dice"]


def _summaries(brain_rows: Sequence[dict[str, Any]], space: str,
               regions: Sequence[Region]) -> list[dict[str, Any]]:
    out = []
    for r in regions:
        rows = [x for x in brain_rows if x["area"] == r.key and x["space"] == space]
        v = np.array([x["volume_corrected_mm3"] for x in rows], dtype=np.float64)
        has = [x for x in rows if x["n_voxels"] > 0]
        cents = np.array([[x["centroid_x_mm"], x["centroid_y_mm"], x["centroid_z_mm"]]
                          for x in has], dtype=np.float64).reshape(-1, 3)
        mean = float(v.mean()) if v.size else math.nan
        sd = float(v.std(ddof=1)) if v.size > 1 else math.nan
        row: dict[str, Any] = {"area": r.key, "space": space, "n_brains": len(has),
                               "volume_mean_mm3": mean, "volume_sd_mm3": sd,
                               "cv": sd / mean if mean > 0 and math.isfinite(sd) else math.nan}
        if len(cents):
            g = cents.mean(axis=0)
            d = np.sqrt(((cents - g) ** 2).sum(axis=1))
            row.update(centroid_x_mm=float(g[0]), centroid_y_mm=float(g[1]),
                       centroid_z_mm=float(g[2]), centroid_spread_mm=float(d.mean()),
                       centroid_spread_max_mm=float(d.max()))
        out.append(row)
    return out


def _pairwise_dice(masks: np.ndarray, brains: Sequence[str]) -> dict[tuple[str, str], float]:
    flat = masks.reshape(len(brains), -1)
    sizes = flat.sum(axis=1)
    out = {}
    for i in range(len(brains)):
        for j in range(i + 1, len(brains)):
            s = int(sizes[i] + sizes[j])
            inter = int(np.count_nonzero(flat[i] & flat[j]))
            out[(brains[i], brains[j])] = math.nan if s == 0 else 2.0 * inter / s
    return out


def _leave_one_out(masks: np.ndarray, covering: np.ndarray, brains: Sequence[str],
                   thresholds: Sequence[float]) -> dict[tuple[str, float], float]:
    out: dict[tuple[str, float], float] = {}
    n = len(brains)
    if n < 2:
        return out
    count = masks.sum(axis=0)
    cover = covering.sum(axis=0)
    for i, b in enumerate(brains):
        others = _probability(count - masks[i], cover - covering[i])
        for t in thresholds:
            out[(b, float(t))] = dice(masks[i], others >= t - 1e-12)
    return out


def _best_threshold(loo: Mapping[tuple[str, float], float],
                    thresholds: Sequence[float]) -> tuple[float, float]:
    best_t, best_d = math.nan, -1.0
    for t in thresholds:
        v = np.array([d for (_, tt), d in loo.items() if tt == float(t)], dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size and v.mean() > best_d + 1e-12:  # ties: the lowest threshold
            best_t, best_d = float(t), float(v.mean())
    return best_t, (best_d if best_d >= 0 else math.nan)


def _asymmetry(tree: RegionTree, regions: Sequence[Region], vol: Mapping[tuple[str, str], float],
               space: str) -> list[dict[str, Any]]:
    from scipy import stats

    by_parent: dict[str, dict[str, str]] = {}
    for r in regions:
        if r.hemisphere in ("left", "right") and r.parent is not None:
            by_parent.setdefault(r.parent, {})[r.hemisphere] = r.key
    brains = sorted({b for b, _ in vol})
    out = []
    for parent, hemi in by_parent.items():
        if set(hemi) != {"left", "right"}:
            continue
        pairs = [(vol[(b, hemi["left"])], vol[(b, hemi["right"])]) for b in brains
                 if (b, hemi["left"]) in vol and (b, hemi["right"]) in vol]
        pairs = [(left, right) for left, right in pairs if left + right > 0]
        row: dict[str, Any] = {"area": parent, "space": space, "n_pairs": len(pairs)}
        if pairs:
            lv = np.array([p[0] for p in pairs])
            rv = np.array([p[1] for p in pairs])
            ai = (lv - rv) / ((lv + rv) / 2)
            row.update(left_mean_mm3=float(lv.mean()), right_mean_mm3=float(rv.mean()),
                       ai_mean=float(ai.mean()),
                       ai_sd=float(ai.std(ddof=1)) if len(ai) > 1 else math.nan)
            if len(pairs) > 1 and np.ptp(lv - rv) > 0:  # a constant difference has no variance
                res = stats.ttest_rel(lv, rv)
                row.update(t_statistic=float(res.statistic), p_value=float(res.pvalue))
        out.append(row)
    return out


def label_volume(data: np.ndarray, grid: Grid, space: str) -> xr.Dataset:
    """Wrap a label array as a volume for :func:`aggregate_space` (tests, pipelines in memory)."""
    from .volumes import from_array

    return from_array(np.asarray(data), grid, space, name="labels")
