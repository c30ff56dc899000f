"""Synthetic cell-body-stained (Merker/Nissl-like) histological sections.

A section is rendered from two label images at the section's pixel size: tissue classes
(:data:`BACKGROUND`, :data:`CSF`, :data:`GREY_MATTER`, :data:`WHITE_MATTER`) and cortical areas.
Inside grey matter every pixel gets a normalised cortical depth (0 at the pial surface, 1 at the
white matter); each area's :class:`LaminarProfile` says how densely cells are packed at that depth
(six layers, an optional cell-sparse stria), how large they are and how they cluster. Cells are
drawn as a random point process of small blobs, so areas differ by laminar pattern and texture,
not by brightness: every built-in profile is normalised to the same mean and the same laminar
contrast of its expected depth profile.

Conventions
-----------
* **Stain**: dark cell bodies on a bright background, as Merker- and Nissl-stained sections are
  usually shown. Rendering is linear in optical density: ``intensity = background * (1 - OD)``,
  with neuropil and cell bodies adding OD. Images are ``uint8`` (255 = white).
* **Scale**: the phantom is coarse. "Cells" are blobs of 0.08-0.2 mm (a few real cells' worth),
  so a cell-like texture is visible at the demo pixel size of 0.2 mm. Laminae scale with the local
  cortical thickness; the thinnest layer (and hOc1's stria) is 10 % of the depth, so at the demo's
  0.2 mm pixels a 6-7 mm thick cortex (a thick-cortex phantom, 2-3x real; :func:`ribbon_phantom`
  uses 7 mm) puts every layer at about 3 px. The alternative is 0.1 mm pixels with a realistic
  3 mm cortex (4x the pixels).
* **Coordinates**: 2-D arrays are indexed ``(row, col)``; points are ``(row, col)`` in pixels
  (multiply by the pixel size for mm). :class:`SectionTransform` writes down both directions.

Everything random takes a seed or a :class:`numpy.random.Generator`; the same inputs and seed
give byte-identical images.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeAlias

import numpy as np
from scipy import ndimage

from atlasbuilder.errors import InputError

__all__ = [
    "BACKGROUND",
    "BUILTIN_AREAS",
    "CSF",
    "GREY_MATTER",
    "WHITE_MATTER",
    "LaminarProfile",
    "SectionTransform",
    "Stria",
    "apply_artefacts",
    "contact_sheet",
    "cortical_depth",
    "profiles_for",
    "render_section",
    "ribbon_phantom",
    "section_defects",
    "smooth_labels",
]

#: Tissue classes of the 2-D tissue image.
BACKGROUND, CSF, GREY_MATTER, WHITE_MATTER = 0, 1, 2, 3

LAYERS = ("I", "II", "III", "IV", "V", "VI")

# Appearance of the stain (fractions of full scale / optical densities). Chosen by eye against
# Merker-stained BigBrain sections: bright slide, light-grey white matter, grey cortex with dark
# granular bands.
_BACKGROUND_LEVEL = 0.94
_GM_NEUROPIL_OD = 0.12
_WM_NEUROPIL_OD = 0.06
_WM_GLIA_OD = 0.02
_CELL_MEAN_OD = 0.28  # every normalised profile: mean expected cell OD over the cortical depth
_LAMINAR_CONTRAST = 0.22  # ... and standard deviation of it over depth (was 0.15: too faint)
_CELL_PEAK_OD = 0.12  # a single cell's central optical density before pixel averaging
_CELL_AMPLITUDE_SHAPE = 4.0  # gamma shape of cell-to-cell stain variation (mean 1)
# Cells are rendered in three size classes (Gaussian sigma in mm); a layer's cell size is a mix.
_SIZE_CLASSES_MM = (0.07, 0.11, 0.16)
_LAYER_EDGE = 0.012  # width (normalised depth) of the smooth step between layers
_CLUSTER_MM = 0.25  # correlation length of cell clusters
_COLUMN_MM = (0.7, 0.12)  # along, across the radial direction: length and width of cell columns
_DEPTH_BINS = 512

#: A random generator or anything :func:`numpy.random.default_rng` accepts as a seed.
Seed: TypeAlias = np.random.Generator | int | Sequence[int]


def _cell_mass(sigma_mm: float | np.ndarray) -> np.ndarray:
    """Integrated OD (OD * mm^2) of one cell blob of Gaussian radius ``sigma_mm``."""
    return _CELL_PEAK_OD * 2 * np.pi * np.asarray(sigma_mm, dtype=float) ** 2


@dataclass(frozen=True)
class Stria:
    """A thin cell-sparse band inside the cortex (e.g. the stria of Gennari in hOc1 layer IVb).

    Parameters
    ----------
    depth : float
        Normalised cortical depth of the band's centre (0 pial, 1 white matter).
    width : float
        Width of the band in normalised depth.
    factor : float
        Cell density inside the band relative to the layer it cuts through (0 = empty).
    """

    depth: float
    width: float
    factor: float = 0.15

    def __post_init__(self) -> None:
        if not (0 < self.depth < 1 and 0 < self.width < 0.5 and 0 <= self.factor <= 1):
            raise InputError(f"Stria needs 0 < depth < 1, 0 < width < 0.5 and 0 <= factor <= 1; "
                             f"got depth={self.depth}, width={self.width}, factor={self.factor}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True)
class LaminarProfile:
    """The cytoarchitecture of one area: six layers from pia (I) to white matter (VI).

    Parameters
    ----------
    key : str
        The area key (e.g. ``"hOc1"``).
    thickness : tuple of 6 float
        Relative thickness of layers I..VI; they sum to 1 (fractions of the cortical depth).
    density : tuple of 6 float
        Cell-body packing density per layer: the expected optical density that cell bodies add
        (roughly the stained area fraction). Large cells at the same density are fewer and darker.
    cell_size_mm : tuple of 6 float
        Gaussian radius of a cell blob per layer, in mm (phantom scale, 0.08-0.2).
    stria : Stria or None
        An optional cell-sparse band.
    clustering : float
        Strength (0..1) of the isotropic clumping of cells (log-normal density modulation).
    columns : float
        Strength (0..1) of the radial columnar arrangement of cells.
    cortex_thickness : float
        Typical cortical thickness of the area relative to generic cortex (hOc1 is thin): a hint
        for the population model; rendering uses the thickness found in the tissue image.
    density_gain : float
        Overall cell density of the area relative to the common mean that every section is
        calibrated to (1 for every built-in profile, so areas cannot be told apart by
        brightness). Other values make an area lighter or darker: a diagnostic
        (``benchmarks/bench_phantom_noise.py --brightness``), not the demo.

    Examples
    --------
    >>> p = profiles_for(["hOc1"])["hOc1"]
    >>> round(float(p.cell_od(np.linspace(0, 1, 2001)).mean()), 3)
    0.28
    """

    key: str
    thickness: tuple[float, ...]
    density: tuple[float, ...]
    cell_size_mm: tuple[float, ...]
    stria: Stria | None = None
    clustering: float = 0.3
    columns: float = 0.2
    cortex_thickness: float = 1.0
    density_gain: float = 1.0

    def __post_init__(self) -> None:
        for name in ("thickness", "density", "cell_size_mm"):
            values = getattr(self, name)
            if len(values) != len(LAYERS):
                raise InputError(f"LaminarProfile {self.key!r}: {name} needs {len(LAYERS)} values "
                                 f"(layers I..VI), got {len(values)}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if min(self.thickness) <= 0 or abs(sum(self.thickness) - 1) > 1e-6:
            raise InputError(f"LaminarProfile {self.key!r}: layer thicknesses must be positive and "
                             f"sum to 1, got {self.thickness}")
        if min(self.density) < 0:
            raise InputError(f"LaminarProfile {self.key!r}: densities must be >= 0, got {self.density}")
        if min(self.cell_size_mm) <= 0:
            raise InputError(f"LaminarProfile {self.key!r}: cell sizes must be > 0 mm, "
                             f"got {self.cell_size_mm}")
        if not (0 <= self.clustering <= 1 and 0 <= self.columns <= 1 and self.cortex_thickness > 0):
            raise InputError(f"LaminarProfile {self.key!r}: clustering and columns must be in [0, 1] "
                             f"and cortex_thickness > 0")
        if not self.density_gain > 0:
            raise InputError(f"LaminarProfile {self.key!r}: density_gain must be > 0, "
                             f"got {self.density_gain}")

    @property
    def boundaries(self) -> np.ndarray:
        """Normalised depths of the layer borders: 0, I/II, II/III, ..., V/VI, 1 (7 values)."""
        return np.concatenate([[0.0], np.cumsum(self.thickness)])

    def layer_weights(self, depth: np.ndarray) -> np.ndarray:
        """Soft membership of each depth in layers I..VI, shape ``depth.shape + (6,)``, sums to 1."""
        d = np.asarray(depth, dtype=float)[..., None]
        inner = self.boundaries[1:-1]
        # telescoping sigmoids: step up at each inner border; outermost layers are open-ended
        steps = _sigmoid((d - inner) / _LAYER_EDGE)
        lo = np.concatenate([np.ones_like(d), steps], axis=-1)
        hi = np.concatenate([steps, np.zeros_like(d)], axis=-1)
        return lo - hi

    def stria_factor(self, depth: np.ndarray) -> np.ndarray:
        """Multiplicative density factor of the stria at each depth (1 outside it)."""
        d = np.asarray(depth, dtype=float)
        if self.stria is None:
            return np.ones_like(d)
        s = self.stria
        band = (_sigmoid((d - (s.depth - s.width / 2)) / (_LAYER_EDGE * 0.7))
                - _sigmoid((d - (s.depth + s.width / 2)) / (_LAYER_EDGE * 0.7)))
        return 1.0 - (1.0 - s.factor) * band

    def cell_od(self, depth: np.ndarray) -> np.ndarray:
        """Expected optical density added by cell bodies at each normalised depth."""
        w = self.layer_weights(depth)
        return (w @ np.asarray(self.density)) * self.stria_factor(depth)

    def cell_size(self, depth: np.ndarray) -> np.ndarray:
        """Cell blob radius (mm) at each normalised depth."""
        return self.layer_weights(depth) @ np.asarray(self.cell_size_mm)

    def normalised(self, mean_od: float = _CELL_MEAN_OD, contrast: float = _LAMINAR_CONTRAST,
                   ) -> LaminarProfile:
        """This profile with densities rescaled to a given depth-averaged mean and contrast.

        The laminar pattern (which layers are dense or sparse, and where) is kept: layer densities
        are mapped affinely until the expected cell OD over a uniform depth grid has mean
        ``mean_od`` and standard deviation ``contrast``. Equal means make areas indistinguishable
        by brightness; equal contrasts keep them from being told apart by how much they vary.

        Raises
        ------
        InputError
            If the profile has no depth variation to rescale, or the target needs negative
            densities.
        """
        grid = np.linspace(0.0, 1.0, 2001)
        density = np.asarray(self.density, dtype=float)
        prof = self
        for _ in range(50):
            od = prof.cell_od(grid)
            mu, sd = float(od.mean()), float(od.std())
            if sd <= 1e-9:
                raise InputError(f"LaminarProfile {self.key!r}: a flat density profile cannot be "
                                 f"normalised to a laminar contrast of {contrast}")
            if abs(mu - mean_od) < 1e-7 * mean_od and abs(sd - contrast) < 1e-7 * max(contrast, 1e-3):
                return prof
            b = contrast / sd
            density = np.maximum(mean_od - b * mu + b * density, 0.02 * mean_od)
            prof = replace(prof, density=tuple(density))
        od = prof.cell_od(grid)
        if abs(od.mean() - mean_od) > 1e-3 * mean_od or abs(od.std() - contrast) > 2e-2 * contrast:
            raise InputError(f"LaminarProfile {self.key!r}: cannot reach mean {mean_od} and contrast "
                             f"{contrast} with non-negative densities (got {od.mean():.4f}, "
                             f"{od.std():.4f})")
        return prof


# The visual areas of the demo, in the spirit of their Julich-Brain descriptions (Amunts 2000,
# Rottschy 2007, Malikovic 2007), exaggerated so each signature shows at phantom scale: every
# area's layer densities and thicknesses lie twice as far from generic cortex as a first, truer
# set did (hOc1's thin layers III and V held at 10 % of the depth), which left the areas too alike
# to be told apart in the 0.2 mm, cell-noisy sections (issue 3 asks that each signature be
# recognisable by eye; ``benchmarks/bench_histology_texture.py`` measures how learnable they are).
# Columns: thickness, density (relative, normalised later), cell size (mm).
_BUILTIN: dict[str, dict] = {
    # generic isocortex: dark II and IV, large pyramids in V, moderately columnar
    "cortex": dict(thickness=(0.10, 0.10, 0.30, 0.10, 0.18, 0.22),
                   density=(0.10, 0.90, 0.50, 0.80, 0.40, 0.60),
                   cell_size_mm=(0.08, 0.09, 0.15, 0.08, 0.19, 0.13),
                   clustering=0.30, columns=0.20, cortex_thickness=1.0),
    # primary visual cortex: koniocortex, thin; very thick dense granular IV split by the stria of
    # Gennari (IVb) into IVa and a very dense IVc; pale V, dense VI; small cells, strong columns
    "hOc1": dict(thickness=(0.10, 0.10, 0.10, 0.44, 0.10, 0.16),
                 density=(0.06, 0.60, 0.50, 1.20, 0.10, 1.00),
                 cell_size_mm=(0.08, 0.08, 0.10, 0.08, 0.13, 0.10),
                 stria=Stria(depth=0.50, width=0.10, factor=0.10),
                 clustering=0.15, columns=0.50, cortex_thickness=0.85),
    # V2: broad dense II, large pyramids in deep III, distinct but thinner IV, no stria
    "hOc2": dict(thickness=(0.10, 0.16, 0.28, 0.18, 0.10, 0.18),
                 density=(0.10, 1.10, 0.40, 0.90, 0.30, 0.70),
                 cell_size_mm=(0.08, 0.09, 0.17, 0.09, 0.15, 0.12),
                 clustering=0.30, columns=0.35, cortex_thickness=0.9),
    # ventral occipital areas: hOc3v with a dense, large-celled V over a paler VI, clumped cells
    "hOc3v": dict(thickness=(0.12, 0.10, 0.22, 0.12, 0.26, 0.18),
                  density=(0.10, 0.70, 0.50, 0.60, 1.10, 0.20),
                  cell_size_mm=(0.08, 0.10, 0.15, 0.09, 0.18, 0.13),
                  clustering=0.55, columns=0.15, cortex_thickness=0.95),
    # hOc4v: dense III merging into a weak IV, columnar
    "hOc4v": dict(thickness=(0.14, 0.16, 0.20, 0.14, 0.18, 0.18),
                  density=(0.10, 0.50, 1.00, 0.40, 0.40, 0.90),
                  cell_size_mm=(0.08, 0.10, 0.14, 0.10, 0.16, 0.13),
                  clustering=0.35, columns=0.45, cortex_thickness=1.0),
    # hOc5 (V5/MT): large pyramids in deep III and V, very dense broad VI
    "hOc5": dict(thickness=(0.10, 0.10, 0.22, 0.10, 0.22, 0.26),
                 density=(0.10, 0.50, 0.30, 0.50, 0.70, 1.30),
                 cell_size_mm=(0.08, 0.10, 0.18, 0.09, 0.20, 0.12),
                 clustering=0.45, columns=0.25, cortex_thickness=1.05),
}

#: Area keys with hand-made profiles (``"cortex"`` is cortex outside any mapped area).
BUILTIN_AREAS: tuple[str, ...] = tuple(_BUILTIN)


def _procedural_profile(key: str, seed: int) -> LaminarProfile:
    """A plausible, distinct profile for an area without a hand-made one (stable per key+seed).

    A drawn profile whose pattern cannot be stretched to the common laminar contrast with
    non-negative densities (about 1 in 100, e.g. one dense layer in a flat profile) is drawn again
    from the same stream, so the result is still a function of key and seed.
    """
    rng = np.random.default_rng([zlib.crc32(key.encode("utf-8")), seed])
    base = np.asarray(_BUILTIN["cortex"]["thickness"])
    for _ in range(100):
        thickness = 0.1 + 0.4 * rng.dirichlet(base * 12)
        thickness /= thickness.sum()
        density = rng.uniform(0.3, 1.0, 6)
        density[0] = 0.1  # layer I is cell-sparse everywhere
        sizes = rng.uniform(0.08, 0.2, 6)
        sizes[0] = 0.08
        stria = None
        if rng.random() < 0.1:
            b = np.concatenate([[0.0], np.cumsum(thickness)])
            stria = Stria(depth=float(rng.uniform(b[2] + 0.05, b[5] - 0.05)), width=0.1, factor=0.15)
        profile = LaminarProfile(key=key, thickness=tuple(thickness), density=tuple(density),
                                 cell_size_mm=tuple(sizes), stria=stria,
                                 clustering=float(rng.uniform(0.1, 0.6)),
                                 columns=float(rng.uniform(0, 0.5)),
                                 cortex_thickness=float(rng.uniform(0.85, 1.15)))
        try:
            profile.normalised()
        except InputError:
            continue
        return profile
    raise InputError(f"no laminar profile for area {key!r} reaches the common contrast "
                     f"(seed {seed})")  # pragma: no cover - about 1e-200


def profiles_for(area_keys: Sequence[str], seed: int = 0) -> dict[str, LaminarProfile]:
    """Normalised laminar profiles for the given area keys (plus ``"cortex"``).

    Built-in keys (:data:`BUILTIN_AREAS`) get their hand-made profiles; any other key gets a
    procedurally generated one, stable for a given key and ``seed``. All are normalised to the
    same mean cell density and laminar contrast (:meth:`LaminarProfile.normalised`), so any area
    set renders with equal mean intensities. ``"cortex"`` is always included: it paints grey
    matter outside any mapped area.

    Parameters
    ----------
    area_keys : sequence of str
        Area keys, e.g. ``["hOc1", "hOc2", "FG1"]``.
    seed : int
        Seed for the procedural profiles.

    Returns
    -------
    dict of str to LaminarProfile

    Examples
    --------
    >>> sorted(profiles_for(["hOc1", "FG1"]))
    ['FG1', 'cortex', 'hOc1']
    """
    out: dict[str, LaminarProfile] = {}
    for key in [*area_keys, "cortex"]:
        if key in out:
            continue
        raw = (LaminarProfile(key=key, **_BUILTIN[key]) if key in _BUILTIN
               else _procedural_profile(key, seed))
        out[key] = raw.normalised()
    return out


# --------------------------------------------------------------------------------------------
# geometry: label smoothing and cortical depth


def _check_labels(tissue2d: np.ndarray, area2d: np.ndarray | None = None) -> None:
    if tissue2d.ndim != 2:
        raise InputError(f"tissue image must be 2-D, got shape {tissue2d.shape}")
    if tissue2d.size and (tissue2d.min() < 0 or tissue2d.max() > WHITE_MATTER):
        raise InputError(f"tissue image must hold classes 0..3 (background, CSF, grey, white matter); "
                         f"found values {tissue2d.min()}..{tissue2d.max()}")
    if area2d is not None and area2d.shape != tissue2d.shape:
        raise InputError(f"area image shape {area2d.shape} differs from tissue image shape "
                         f"{tissue2d.shape}")


def _check_pixel_size(pixel_size_mm: float) -> float:
    if not (np.isfinite(pixel_size_mm) and pixel_size_mm > 0):
        raise InputError(f"pixel_size_mm must be a positive number, got {pixel_size_mm!r}")
    return float(pixel_size_mm)


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return (slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
            slice(max(cols[0] - margin, 0), cols[-1] + margin + 1))


def _smooth_argmax(labels: np.ndarray, values: Sequence[int], sigma_px: float,
                   mask: np.ndarray | None = None, rest: int | None = None) -> np.ndarray:
    """Argmax over ``values`` of Gaussian-smoothed indicators (optionally within ``mask``).

    With ``rest``, the indicators of ``values`` and ``rest`` partition the image, so the smoothed
    indicator of ``rest`` is one minus the others' (one full-image filter saved). Pixels no
    indicator reaches get ``rest`` (or 0).
    """
    margin = math.ceil(4 * sigma_px) + 1
    best = np.zeros(labels.shape, dtype=np.float32)
    total = np.zeros(labels.shape, dtype=np.float32) if rest is not None else None
    out = np.full(labels.shape, 0 if rest is None else rest, dtype=labels.dtype)
    for v in values:
        ind = labels == v
        if mask is not None:
            ind &= mask
        box = _bbox(ind, margin)
        s = ndimage.gaussian_filter(ind[box].astype(np.float32), sigma_px, truncate=4.0)
        better = s > best[box]
        best[box] = np.where(better, s, best[box])
        out[box] = np.where(better, v, out[box])
        if total is not None:
            total[box] += s
    if total is not None:
        out[1 - total > best] = rest
    return out


def smooth_labels(tissue2d: np.ndarray, area2d: np.ndarray, pixel_size_mm: float, *,
                  label_voxel_mm: float | None = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth blocky label images resampled from a coarse volume into a smooth cortical ribbon.

    Each class's indicator is Gaussian-smoothed (sigma 0.6 source voxels) and every pixel takes
    the class with the largest smoothed value; areas are smoothed the same way within grey
    matter. :func:`render_section` calls this, so these are the annotations that match the image.

    Parameters
    ----------
    tissue2d : ndarray of int, 2-D
        Tissue classes (0 background, 1 CSF, 2 grey matter, 3 white matter).
    area2d : ndarray of int, 2-D
        Area labels (0 = no area); only their values in grey matter are used.
    pixel_size_mm : float
        Pixel size of both images.
    label_voxel_mm : float or None
        Voxel size of the volume the labels were resampled from; ``None`` returns the labels
        unchanged except that areas are cleared outside grey matter.

    Returns
    -------
    tissue, area : ndarray
        Smoothed tissue classes; area labels inside the smoothed grey matter, 0 elsewhere.
    """
    tissue2d = np.asarray(tissue2d)
    area2d = np.asarray(area2d)
    _check_labels(tissue2d, area2d)
    px = _check_pixel_size(pixel_size_mm)
    if label_voxel_mm is None or label_voxel_mm <= px:
        tissue = tissue2d.copy()
        gm = tissue == GREY_MATTER
        return tissue, np.where(gm, area2d, 0).astype(area2d.dtype)
    sigma = 0.6 * label_voxel_mm / px
    tissue = _smooth_argmax(tissue2d, [CSF, GREY_MATTER, WHITE_MATTER], sigma, rest=BACKGROUND)
    gm_in = tissue2d == GREY_MATTER
    gm = tissue == GREY_MATTER
    area_values = [int(v) for v in np.unique(area2d[gm_in])]
    area = _smooth_argmax(area2d, area_values, sigma, mask=gm_in)
    area[~gm] = 0
    return tissue, area


def cortical_depth(tissue2d: np.ndarray, pixel_size_mm: float) -> np.ndarray:
    """Normalised cortical depth of every grey-matter pixel.

    ``depth = a / (a + b)`` where ``a`` and ``b`` are the Euclidean distances (in mm) from the
    pixel to the outer grey-matter border (background or CSF) and to the white matter, each
    measured to the pixel edge. So depth is near 0 next to the pial surface and near 1 next to the
    white matter.

    Parameters
    ----------
    tissue2d : ndarray of int, 2-D
        Tissue classes (0 background, 1 CSF, 2 grey matter, 3 white matter).
    pixel_size_mm : float
        Pixel size in mm.

    Returns
    -------
    ndarray of float32
        Depth in [0, 1] in grey matter, NaN elsewhere. Without any white matter in the image,
        depth is the distance to the pial border relative to the largest such distance (a
        tangentially cut cortex); without any pial border, relative to the white matter.

    Examples
    --------
    >>> t = np.array([[0, 2, 2, 2, 2, 3]])
    >>> np.round(cortical_depth(t, 0.1), 3)
    array([[  nan, 0.125, 0.375, 0.625, 0.875,   nan]], dtype=float32)
    """
    tissue2d = np.asarray(tissue2d)
    _check_labels(tissue2d)
    px = _check_pixel_size(pixel_size_mm)
    gm = tissue2d == GREY_MATTER
    wm = tissue2d == WHITE_MATTER
    outside = ~(gm | wm)
    depth = np.full(tissue2d.shape, np.nan, dtype=np.float32)
    if not gm.any():
        return depth
    half = px / 2
    a = b = None
    if outside.any():
        a = ndimage.distance_transform_edt(~outside, sampling=px)[gm] - half
    if wm.any():
        b = ndimage.distance_transform_edt(~wm, sampling=px)[gm] - half
    if a is not None and b is not None:
        d = a / np.maximum(a + b, 1e-9)
    elif a is not None:
        d = a / max(float(a.max()), 1e-9)
    elif b is not None:
        d = 1 - b / max(float(b.max()), 1e-9)
    else:
        d = np.full(int(gm.sum()), 0.5)
    depth[gm] = np.clip(d, 0.0, 1.0)
    return depth


# --------------------------------------------------------------------------------------------
# smooth random fields (cubic B-splines on a coarse control grid)


def _bspline3(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def _n_controls(length: int, spacing_px: float) -> int:
    return int(np.floor(max(length - 1, 0) / spacing_px)) + 4


def _bspline_weights(x: np.ndarray, n_controls: int, spacing_px: float) -> np.ndarray:
    """Weights (len(x), n_controls) of a uniform cubic B-spline; control k sits at (k-1)*spacing."""
    u = np.asarray(x, dtype=float)[:, None] / spacing_px
    k = np.arange(n_controls)[None, :]
    return _bspline3(u - (k - 1))


def _smooth_field(shape: tuple[int, int], coefficients: np.ndarray, spacing_px: float) -> np.ndarray:
    wr = _bspline_weights(np.arange(shape[0]), coefficients.shape[-2], spacing_px)
    wc = _bspline_weights(np.arange(shape[1]), coefficients.shape[-1], spacing_px)
    return wr @ coefficients @ wc.T


def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    """The 1-D kernel :func:`scipy.ndimage.gaussian_filter` uses for ``sigma`` and ``truncate``."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=float)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _unit_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]) -> np.ndarray:
    """Gaussian-smoothed white noise with unit variance (exactly, from the discrete kernels)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    sm = ndimage.gaussian_filter(white, sigma, truncate=3.0)
    var = np.prod([np.sum(_gaussian_kernel(s, 3.0) ** 2) for s in sigma])
    return sm / np.float32(np.sqrt(var))


# --------------------------------------------------------------------------------------------
# rendering


def _size_class_weights(size_mm: np.ndarray) -> np.ndarray:
    """Mix of the size classes (last axis) standing in for cells of ``size_mm``: hat functions."""
    classes = np.asarray(_SIZE_CLASSES_MM)
    s = np.asarray(size_mm, dtype=float)
    return np.stack([np.interp(s, classes, np.eye(len(classes))[j]) for j in range(len(classes))], axis=-1)


def _area_tables(profile: LaminarProfile) -> np.ndarray:
    """Per depth bin, the expected cell OD carried by each size class: (_DEPTH_BINS, n_classes)."""
    d = (np.arange(_DEPTH_BINS) + 0.5) / _DEPTH_BINS
    return profile.cell_od(d)[:, None] * _size_class_weights(profile.cell_size(d))


def render_section(tissue2d: np.ndarray, area2d: np.ndarray, profiles: Mapping[str, LaminarProfile],
                   area_keys_by_label: Mapping[int, str], pixel_size_mm: float,
                   rng: Seed, *, label_voxel_mm: float | None = 1.0,
                   blend_mm: float = 0.5, inhomogeneity: float = 0.01,
                   noise: float = 0.01) -> np.ndarray:
    """Render a cell-body-stained section (dark cells on a bright slide) from label images.

    Parameters
    ----------
    tissue2d : ndarray of int, 2-D
        Tissue classes (0 background, 1 CSF, 2 grey matter, 3 white matter) at the section's pixel
        size, typically nearest-neighbour resampled from a coarse volume.
    area2d : ndarray of int, 2-D
        Area labels, same shape; only grey matter is read. Labels missing from
        ``area_keys_by_label`` (and 0) are painted with the ``"cortex"`` profile.
    profiles : mapping of str to LaminarProfile
        Profiles by area key, e.g. from :func:`profiles_for`; must contain ``"cortex"`` and every
        key in ``area_keys_by_label``.
    area_keys_by_label : mapping of int to str
        Area key of each label value.
    pixel_size_mm : float
        Pixel size in mm (the demo uses 0.2).
    rng : numpy.random.Generator, int or sequence of int
        Random generator or seed; the same seed gives a byte-identical image.
    label_voxel_mm : float or None
        Voxel size of the volume the labels come from; boundaries are smoothed at that scale
        (:func:`smooth_labels` gives the smoothed labels, i.e. the matching annotations).
        ``None`` uses the labels as they are.
    blend_mm : float
        Width over which profiles blend across area borders (no sharp steps at borders).
    inhomogeneity : float
        Strength of the low-frequency stain inhomogeneity (std of a relative OD modulation).
    noise : float
        Standard deviation of pixel noise, as a fraction of full scale.

    Returns
    -------
    ndarray of uint8
        The image, same shape as the labels; 255 is white.

    Raises
    ------
    InputError
        On malformed labels, a non-positive pixel size or missing profiles.

    Examples
    --------
    >>> tissue, area, keys = ribbon_phantom(pixel_size_mm=0.4, size_mm=(40, 32))
    >>> img = render_section(tissue, area, profiles_for(list(keys.values())), keys, 0.4, rng=0)
    >>> img.dtype, img.shape == tissue.shape
    (dtype('uint8'), True)
    """
    px = _check_pixel_size(pixel_size_mm)
    missing = sorted({"cortex", *area_keys_by_label.values()} - set(profiles))
    if missing:
        raise InputError(f"render_section: no laminar profile for area keys {missing}; "
                         f"profiles_for(keys) makes one for any key")
    rng = np.random.default_rng(rng)
    tissue, area = smooth_labels(tissue2d, area2d, px, label_voxel_mm=label_voxel_mm)
    shape = tissue.shape
    tissue_mask = (tissue == GREY_MATTER) | (tissue == WHITE_MATTER)
    image = np.full(shape, _BACKGROUND_LEVEL, dtype=np.float32)
    rows, cols = _bbox(tissue_mask, math.ceil(3 * _SIZE_CLASSES_MM[-1] / px) + 2)
    crop = (rows, cols)
    t = tissue[crop]
    a = area[crop]
    cshape = t.shape
    gm = t == GREY_MATTER
    wm = t == WHITE_MATTER
    if gm.any() or wm.any():
        depth = cortical_depth(t, px)
        od = _render_od(t, a, depth, gm, wm, profiles, area_keys_by_label, px, rng, blend_mm)
        if inhomogeneity:
            spacing = 30.0 / px
            coef = rng.standard_normal((_n_controls(cshape[0], spacing), _n_controls(cshape[1], spacing)))
            od *= (1 + 2 * inhomogeneity * _smooth_field(cshape, coef, spacing)).astype(np.float32)
        image[crop] = _BACKGROUND_LEVEL * (1 - od)
    if noise:
        image += np.float32(noise) * rng.standard_normal(shape, dtype=np.float32)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _render_od(t: np.ndarray, a: np.ndarray, depth: np.ndarray, gm: np.ndarray, wm: np.ndarray,
               profiles: Mapping[str, LaminarProfile], keys: Mapping[int, str], px: float,
               rng: np.random.Generator, blend_mm: float) -> np.ndarray:
    """Optical density of tissue (neuropil + cells) on a crop of the section."""
    shape = t.shape
    gidx = np.flatnonzero(gm)
    dbin = np.minimum((depth.ravel()[gidx] * _DEPTH_BINS).astype(np.intp), _DEPTH_BINS - 1)
    n_classes = len(_SIZE_CLASSES_MM)
    # per grey-matter pixel: expected cell OD per size class, clustering and column strength,
    # blended between areas by smoothed area indicators
    class_od = np.zeros((gidx.size, n_classes), dtype=np.float32)
    clus = np.zeros(gidx.size, dtype=np.float32)
    cols = np.zeros(gidx.size, dtype=np.float32)
    wsum = np.zeros(gidx.size, dtype=np.float32)
    sigma_blend = max(blend_mm / 2.5 / px, 0.3)
    margin = math.ceil(3 * sigma_blend) + 1
    area_gm = a.ravel()[gidx]
    for label in np.unique(area_gm):
        key = keys.get(int(label), "cortex")
        prof = profiles[key]
        ind = (a == label) & gm
        box = _bbox(ind, margin)
        sm = np.zeros(shape, dtype=np.float32)
        sm[box] = ndimage.gaussian_filter(ind[box].astype(np.float32), sigma_blend, truncate=3.0)
        w = sm.ravel()[gidx]
        near = w > 1e-4
        table = _area_tables(prof).astype(np.float32)
        # calibrate the stain per section: the profile's mean is equal for every area over a
        # uniform depth, but a folded, obliquely cut cortex samples depths unevenly, so scale
        # this area's cells to the common mean over the depths it actually shows here
        own = dbin[area_gm == label]
        expected = float(table[own].sum(axis=1).mean()) if own.size else 0.0
        if expected > 0:
            table *= np.float32(np.clip(_CELL_MEAN_OD / expected, 0.6, 1.6))
        if prof.density_gain != 1.0:
            table *= np.float32(prof.density_gain)
        class_od[near] += w[near, None] * table[dbin[near]]
        clus[near] += w[near] * prof.clustering
        cols[near] += w[near] * prof.columns
        wsum[near] += w[near]
    wsum = np.maximum(wsum, 1e-6)
    class_od /= wsum[:, None]
    clus /= wsum
    cols /= wsum

    # texture: log-normal, mean-preserving modulation of cell density by an isotropic cluster
    # field and a column field elongated along the local radial direction (gradient of the
    # distance to the pial border)
    c_sig = _CLUSTER_MM / px
    g_clu = _unit_noise(rng, shape, (c_sig, c_sig)).ravel()[gidx]
    along, across = _COLUMN_MM[0] / px, _COLUMN_MM[1] / px
    n_rows = _unit_noise(rng, shape, (along, across)).ravel()[gidx]  # elongated along rows
    n_cols = _unit_noise(rng, shape, (across, along)).ravel()[gidx]  # elongated along cols
    dp = np.where(gm, np.nan_to_num(depth, nan=0.0), np.where(wm, 1.0, 0.0))
    gr, gc = np.gradient(ndimage.gaussian_filter(dp.astype(np.float32), 1.0))
    gr, gc = gr.ravel()[gidx], gc.ravel()[gidx]
    norm = np.maximum(gr**2 + gc**2, 1e-12)
    cr, cc = gr**2 / norm, gc**2 / norm
    # where the depth is locally flat (no radial direction) both weights vanish: no columns there
    g_col = (cr * n_rows + cc * n_cols) / np.maximum(np.sqrt(cr**2 + cc**2), 1e-6)
    s_clu, s_col = 0.4 * clus, 0.4 * cols
    modulation = np.exp(s_clu * g_clu + s_col * g_col - 0.5 * (s_clu**2 + s_col**2))

    # cells: Poisson counts per pixel, gamma-distributed stain per cell, Gaussian blobs per class
    pix_area = px * px
    widx = np.flatnonzero(wm)
    od = np.zeros(shape, dtype=np.float32)
    for c, sigma_mm in enumerate(_SIZE_CLASSES_MM):
        mass = float(_cell_mass(sigma_mm))
        lam = class_od[:, c] * modulation * (pix_area / mass)
        idx = gidx
        if c == 0:  # sparse small glial cells in white matter
            lam = np.concatenate([lam, np.full(widx.size, _WM_GLIA_OD * pix_area / mass)])
            idx = np.concatenate([gidx, widx])
        counts = rng.poisson(lam)
        nz = np.flatnonzero(counts)
        stain = rng.gamma(_CELL_AMPLITUDE_SHAPE * counts[nz], 1 / _CELL_AMPLITUDE_SHAPE)
        impulses = np.zeros(shape, dtype=np.float32)
        impulses.ravel()[idx[nz]] = stain * (mass / pix_area)
        od += ndimage.gaussian_filter(impulses, sigma_mm / px, truncate=3.0)
    neuropil = np.where(gm, _GM_NEUROPIL_OD, np.where(wm, _WM_NEUROPIL_OD, 0.0)).astype(np.float32)
    od += ndimage.gaussian_filter(neuropil, 0.6)
    return od


# --------------------------------------------------------------------------------------------
# artefacts


@dataclass(frozen=True, eq=False)
class SectionTransform:
    """The true geometric misplacement of one section (and its stain gain).

    Points are ``(row, col)`` in pixels; multiply by ``pixel_size_mm`` for mm. The artefacted
    image ``J`` samples the clean image ``I`` as ``J(q) = I(inverse(q))``; tissue at clean
    position ``p`` appears at ``forward(p)`` (points move opposite to the sampling map).

    ``inverse(q) = R^-1 (q - c - shift) + c + v(q)`` with ``R`` the rotation by ``rotation_deg``
    about the image centre ``c`` and ``v`` a smooth displacement (cubic B-spline on a control grid
    of ``spacing_px``, coefficients ``control_px``, shape ``(2, n_rows, n_cols)``).
    """

    shape: tuple[int, int]
    pixel_size_mm: float
    rotation_deg: float
    shift_px: tuple[float, float]
    spacing_px: float
    control_px: np.ndarray = field(repr=False)
    stain_gain: float = 1.0

    @property
    def center(self) -> np.ndarray:
        return (np.asarray(self.shape, dtype=float) - 1) / 2

    def _rot(self) -> np.ndarray:
        th = np.deg2rad(self.rotation_deg)
        return np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """Nonlinear part ``v`` (pixels) at artefacted-image points ``(n, 2)``."""
        p = np.atleast_2d(np.asarray(points, dtype=float))
        wr = _bspline_weights(p[:, 0], self.control_px.shape[1], self.spacing_px)
        wc = _bspline_weights(p[:, 1], self.control_px.shape[2], self.spacing_px)
        return np.stack([np.einsum("ni,ij,nj->n", wr, self.control_px[k], wc) for k in range(2)], axis=1)

    def inverse(self, points: np.ndarray) -> np.ndarray:
        """Map artefacted-image points ``(n, 2)`` back to the clean section (exact)."""
        q = np.atleast_2d(np.asarray(points, dtype=float))
        c = self.center
        return (q - c - np.asarray(self.shift_px)) @ self._rot() + c + self.displacement(q)

    def forward(self, points: np.ndarray, *, tol: float = 1e-6, max_iter: int = 100) -> np.ndarray:
        """Map clean-section points ``(n, 2)`` to where they appear in the artefacted image.

        Solved by fixed-point iteration of :meth:`inverse` (the distortion is small and smooth).
        """
        p = np.atleast_2d(np.asarray(points, dtype=float))
        c = self.center
        rot, shift = self._rot(), np.asarray(self.shift_px)
        q = (p - c) @ rot.T + c + shift
        for _ in range(max_iter):
            q_new = (p - self.displacement(q) - c) @ rot.T + c + shift
            done = np.max(np.abs(q_new - q), initial=0.0) < tol
            q = q_new
            if done:
                break
        return q

    def sampling_grid(self) -> np.ndarray:
        """Clean-section coordinates sampled by every artefacted pixel, shape ``(2, H, W)``."""
        h, w = self.shape
        rr, cc = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
        c = self.center
        rot = self._rot()
        q0, q1 = rr - c[0] - self.shift_px[0], cc - c[1] - self.shift_px[1]
        # R^-1 = R^T: row vector q @ R
        p0 = q0 * rot[0, 0] + q1 * rot[1, 0] + c[0]
        p1 = q0 * rot[0, 1] + q1 * rot[1, 1] + c[1]
        p0 += _smooth_field(self.shape, self.control_px[0], self.spacing_px)
        p1 += _smooth_field(self.shape, self.control_px[1], self.spacing_px)
        return np.stack([p0, p1])


def _tear_mask(tissue: np.ndarray, px: float, rng: np.random.Generator, width_mm: float) -> np.ndarray:
    """A thin curved gap through the tissue: a wavy line across it, ``width_mm`` wide."""
    pts = np.argwhere(tissue)
    mask = np.zeros(tissue.shape, dtype=bool)
    if pts.size == 0:
        return mask
    start = pts[rng.integers(len(pts))].astype(float)
    theta = rng.uniform(0, np.pi)
    direction = np.array([np.cos(theta), np.sin(theta)])
    normal = np.array([-direction[1], direction[0]])
    length = rng.uniform(20, 40) / px
    s = np.linspace(-length / 2, length / 2, int(4 * length) + 2)
    wave = rng.uniform(1, 3) / px * np.sin(2 * np.pi * s / length * rng.uniform(0.5, 1.5)
                                             + rng.uniform(0, 2 * np.pi))
    line = start + s[:, None] * direction + wave[:, None] * normal
    ij = np.rint(line).astype(int)
    ok = np.all((ij >= 0) & (ij < tissue.shape), axis=1)
    mask[ij[ok, 0], ij[ok, 1]] = True
    if not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=px) <= width_mm / 2


def apply_artefacts(image: np.ndarray, labels: np.ndarray | Sequence[np.ndarray], pixel_size_mm: float,
                    rng: Seed, *, position: float = 0.5, shift_mm: float = 2.0,
                    rotation_deg: float = 3.0, distortion_mm: float = 0.3,
                    distortion_spacing_mm: float = 15.0, drift: float = 0.2, noise: float = 0.02,
                    tear: bool = False, tear_width_mm: float = 0.8,
                    background: float | None = None,
                    ) -> tuple[np.ndarray, tuple[np.ndarray, ...], SectionTransform]:
    """Misplace, distort, restain and add noise to a section; labels move with the image.

    Parameters
    ----------
    image : ndarray of uint8, 2-D
        A clean section from :func:`render_section`.
    labels : ndarray or sequence of ndarray
        Label images on the same grid (tissue, areas, ...); warped nearest-neighbour, 0 outside.
    pixel_size_mm : float
        Pixel size in mm.
    rng : numpy.random.Generator, int or sequence of int
        Random generator or seed.
    position : float
        The section's position in its stack, 0 (first) .. 1 (last); drives the staining drift.
    shift_mm, rotation_deg : float
        Standard deviations of the random rigid misplacement (per axis; rotation about the image
        centre).
    distortion_mm, distortion_spacing_mm : float
        Standard deviation of the nonlinear displacement's control points and their spacing.
    drift : float
        Stain strength changes linearly across the stack from ``1 - drift/2`` to ``1 + drift/2``
        (a multiplicative gain on the optical density; the slide background is unchanged).
    noise : float
        Standard deviation of added pixel noise, as a fraction of full scale.
    tear : bool
        Cut a thin curved gap of background through the tissue (labels become 0 there).
    tear_width_mm : float
        Width of the tear.
    background : float or None
        Slide intensity (0..255) used for the stain gain and to fill uncovered pixels; default
        the renderer's background level.

    Returns
    -------
    image : ndarray of uint8
    labels : tuple of ndarray
        The warped labels, in the order given.
    transform : SectionTransform
        The true misplacement: ``transform.forward`` maps clean-section points to this image.

    Examples
    --------
    >>> img = np.full((50, 60), 240, np.uint8); lab = np.zeros((50, 60), np.int16)
    >>> out, (lab2,), tf = apply_artefacts(img, lab, 0.2, rng=0)
    >>> out.shape, lab2.dtype
    ((50, 60), dtype('int16'))
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise InputError(f"apply_artefacts: image must be 2-D, got shape {image.shape}")
    label_list = [np.asarray(labels)] if isinstance(labels, np.ndarray) else [np.asarray(x) for x in labels]
    for lab in label_list:
        if lab.shape != image.shape:
            raise InputError(f"apply_artefacts: label shape {lab.shape} differs from image shape "
                             f"{image.shape}")
    px = _check_pixel_size(pixel_size_mm)
    if not 0 <= position <= 1:
        raise InputError(f"apply_artefacts: position must be in [0, 1], got {position}")
    rng = np.random.default_rng(rng)
    bg = _BACKGROUND_LEVEL * 255 if background is None else float(background)
    shape = (int(image.shape[0]), int(image.shape[1]))

    spacing = distortion_spacing_mm / px
    n_r, n_c = _n_controls(shape[0], spacing), _n_controls(shape[1], spacing)
    shift = rng.normal(0.0, shift_mm, 2) / px
    rotation = float(rng.normal(0.0, rotation_deg))
    control = rng.normal(0.0, distortion_mm / px, (2, n_r, n_c))
    gain = 1.0 + drift * (position - 0.5)
    tf = SectionTransform(shape=shape, pixel_size_mm=px, rotation_deg=rotation,
                          shift_px=(float(shift[0]), float(shift[1])), spacing_px=spacing,
                          control_px=control, stain_gain=gain)

    grid = tf.sampling_grid()
    warped = ndimage.map_coordinates(image.astype(np.float32), grid, order=1, mode="constant", cval=bg)
    # nearest neighbour by rounding once for all label images (cheaper than map_coordinates)
    near = np.rint(grid).astype(np.intp)
    inside = (near[0] >= 0) & (near[0] < shape[0]) & (near[1] >= 0) & (near[1] < shape[1])
    src = near[0][inside], near[1][inside]
    out_labels = []
    for lab in label_list:
        moved = np.zeros(shape, dtype=lab.dtype)
        moved[inside] = lab[src]
        out_labels.append(moved)
    warped = bg - (bg - warped) * np.float32(gain)
    if tear:
        tissue = np.zeros(shape, dtype=bool)
        for lab in out_labels:
            tissue |= lab > 0
        gap = _tear_mask(tissue, px, rng, tear_width_mm)
        warped[gap] = bg
        for lab in out_labels:
            lab[gap] = 0
    if noise:
        warped += np.float32(noise * 255) * rng.standard_normal(shape, dtype=np.float32)
    out = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
    return out, tuple(out_labels), tf


def section_defects(n_sections: int, rng: Seed, *, missing: float = 0.05,
                    torn: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Choose which sections of a stack are missing and which are torn.

    Parameters
    ----------
    n_sections : int
        Sections in the stack.
    rng : numpy.random.Generator, int or sequence of int
        Random generator or seed.
    missing, torn : float
        Fractions of sections lost and torn (rounded; torn sections are never missing ones).

    Returns
    -------
    missing, torn : ndarray of bool, shape (n_sections,)
    """
    if n_sections < 0 or not (0 <= missing <= 1 and 0 <= torn <= 1 and missing + torn <= 1):
        raise InputError(f"section_defects: need n_sections >= 0 and fractions in [0, 1] summing to "
                         f"<= 1, got {n_sections}, missing={missing}, torn={torn}")
    rng = np.random.default_rng(rng)
    order = rng.permutation(n_sections)
    n_miss, n_torn = round(missing * n_sections), round(torn * n_sections)
    miss = np.zeros(n_sections, dtype=bool)
    tor = np.zeros(n_sections, dtype=bool)
    miss[order[:n_miss]] = True
    tor[order[n_miss:n_miss + n_torn]] = True
    return miss, tor


# --------------------------------------------------------------------------------------------
# a phantom for tests, benchmarks and examples


def ribbon_phantom(pixel_size_mm: float = 0.2, *, size_mm: tuple[float, float] = (100.0, 80.0),
                   cortex_mm: float = 7.0, label_voxel_mm: float | None = 1.0,
                   area_keys: Sequence[str] = ("hOc1", "hOc2", "hOc3v", "hOc4v", "hOc5", "cortex"),
                   n_folds: int = 8, sulcus_depth_mm: float = 12.0,
                   ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """A folded cortical ribbon around a white-matter core, split into angular area sectors.

    The outer surface is an ellipse with narrow sulci cut into it; grey matter is everything
    within ``cortex_mm`` (scaled by each area's :attr:`LaminarProfile.cortex_thickness`) of the
    outside, white matter the rest. Like the population model's output, labels are made on a
    ``label_voxel_mm`` grid and nearest-neighbour upsampled to the pixel size (blocky).

    Parameters
    ----------
    pixel_size_mm : float
        Pixel size of the returned images.
    size_mm : (float, float)
        Field of view (rows, cols) in mm.
    cortex_mm : float
        Cortical thickness of generic cortex.
    label_voxel_mm : float or None
        Grid the labels are made on; ``None`` makes them directly at the pixel size.
    area_keys : sequence of str
        One equal angular sector per key; the key ``"cortex"`` gets area label 0 (unmapped
        cortex), the others labels 1, 2, ...
    n_folds : int
        Number of sulci around the ribbon.
    sulcus_depth_mm : float
        Depth of the sulci.

    Returns
    -------
    tissue, area : ndarray of int16
        Tissue classes and area labels.
    keys : dict of int to str
        Area key of each non-zero area label.
    """
    px = _check_pixel_size(pixel_size_mm)
    grid_mm = px if label_voxel_mm is None else float(label_voxel_mm)
    shape_px = (round(size_mm[0] / px), round(size_mm[1] / px))
    n = (math.ceil(size_mm[0] / grid_mm), math.ceil(size_mm[1] / grid_mm))
    r = (np.arange(n[0]) + 0.5) * grid_mm - size_mm[0] / 2
    c = (np.arange(n[1]) + 0.5) * grid_mm - size_mm[1] / 2
    rr, cc = np.meshgrid(r, c, indexing="ij")
    theta = np.arctan2(rr, cc)
    a_r, a_c = 0.42 * size_mm[0], 0.42 * size_mm[1]
    ellipse = 1 / np.sqrt((np.sin(theta) / a_r) ** 2 + (np.cos(theta) / a_c) ** 2)
    # narrow sulci, broad gyri: a sharply peaked function of the fold phase
    phase = n_folds * theta + 0.3
    sulci = ((1 + np.cos(phase)) / 2) ** 40
    brain = np.hypot(rr, cc) < ellipse - sulcus_depth_mm * sulci
    profiles = {k: _BUILTIN[k]["cortex_thickness"] if k in _BUILTIN else 1.0 for k in area_keys}
    sector = np.floor((theta + np.pi) / (2 * np.pi) * len(area_keys)).astype(int) % len(area_keys)
    thick = cortex_mm * np.asarray([profiles[k] for k in area_keys])[sector]
    depth_mm = ndimage.distance_transform_edt(brain, sampling=grid_mm)
    tissue = np.where(brain, np.where(depth_mm > thick, WHITE_MATTER, GREY_MATTER), BACKGROUND)
    labels = {}
    next_label = 1
    for k in area_keys:
        if k != "cortex":
            labels[k] = next_label
            next_label += 1
    sector_label = np.asarray([labels.get(k, 0) for k in area_keys])[sector]
    area = np.where(tissue == GREY_MATTER, sector_label, 0)
    if label_voxel_mm is not None:
        # nearest-neighbour upsampling from the coarse grid to the pixel grid
        ri = np.minimum(((np.arange(shape_px[0]) + 0.5) * px / grid_mm).astype(int), n[0] - 1)
        ci = np.minimum(((np.arange(shape_px[1]) + 0.5) * px / grid_mm).astype(int), n[1] - 1)
        tissue, area = tissue[np.ix_(ri, ci)], area[np.ix_(ri, ci)]
    keys = {v: k for k, v in labels.items()}
    return tissue.astype(np.int16), area.astype(np.int16), keys


# --------------------------------------------------------------------------------------------
# looking at it


def contact_sheet(images: Sequence[np.ndarray], labels: Sequence[np.ndarray] | None = None,
                  path: str | os.PathLike[str] | None = None, *, ncols: int | None = None,
                  titles: Sequence[str] | None = None, tile_px: int = 600) -> np.ndarray:
    """Tile sections side by side with their annotation contours; optionally write a PNG.

    Parameters
    ----------
    images : sequence of 2-D ndarray
        Grey-level sections (uint8 or float).
    labels : sequence of 2-D ndarray or None
        Label image per section; the outline of each non-zero label is drawn in colour.
    path : path-like or None
        Where to write the PNG (written atomically).
    ncols : int or None
        Tiles per row (default: up to 4).
    titles : sequence of str or None
        A title per tile.
    tile_px : int
        Approximate width of one tile in the PNG, in pixels.

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
        The rendered sheet.
    """
    # the Agg canvas directly: no pyplot, no global backend switch
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(images) == 0:
        raise InputError("contact_sheet: no images given")
    if labels is not None and len(labels) != len(images):
        raise InputError(f"contact_sheet: {len(labels)} label images for {len(images)} images")
    n = len(images)
    ncols = min(n, 4) if ncols is None else max(1, ncols)
    nrows = math.ceil(n / ncols)
    h0, w0 = images[0].shape[:2]
    dpi = 100
    tile_w = tile_px / dpi
    tile_h = tile_w * h0 / w0
    fig = Figure(figsize=(tile_w * ncols, (tile_h + (0.3 if titles else 0)) * nrows), dpi=dpi)
    cmap = matplotlib.colormaps["tab10"]
    for i, img in enumerate(images):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(img, cmap="gray", vmin=0, vmax=255 if img.dtype == np.uint8 else None,
                  interpolation="nearest")
        if labels is not None:
            lab = np.asarray(labels[i])
            for j, v in enumerate(v for v in np.unique(lab) if v != 0):
                ax.contour(lab == v, levels=[0.5], colors=[cmap(j % 10)], linewidths=0.7)
        if titles is not None and i < len(titles):
            ax.set_title(titles[i], fontsize=9)
        ax.set_axis_off()
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=0.995 - (0.03 if titles else 0),
                        wspace=0.02, hspace=0.08 if titles else 0.02)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    sheet = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=dpi, format="png")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return sheet
