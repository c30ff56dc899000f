"""Training data: checked annotated sections, class-balanced patches, augmentation.

Annotations are label images whose raw values are mapped to class names by a *mapping*
(``{raw value: class name}``; a value mapped to ``None`` is "not annotated" and ignored by the loss).
Class index ``i`` is ``classes[i]``; by convention ``classes[0]`` is the background.

Everything here is seeded: the same inputs and seed give the same patches and augmentations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, InvalidImageError
from .networks import resize_matrix

__all__ = [
    "IGNORE",
    "Augmentation",
    "PatchSampler",
    "TrainingSection",
    "augment",
    "check_sections",
    "context_input",
    "grid_window",
    "hemisphere_swap",
    "mirror",
    "overview_canvas",
]

IGNORE = -1  # class index of pixels the loss ignores (not annotated, outside the section)


@dataclass
class TrainingSection:
    """One annotated section: ``image`` ``(C, H, W)`` float32 (raw values), ``target`` ``(H, W)``
    int64 class indices (``IGNORE`` where not annotated), ``name`` for messages, ``values``: the
    section's scalar inputs to the context branch (e.g. its place along the series; may be empty),
    ``bias``: ``(K, Hc, Wc)`` float32 scores added to the network's logits on a grid of
    ``bias_step`` pixels (an atlas prior, :meth:`~.prior.AtlasPrior.section_grid`; None: none)."""

    image: np.ndarray
    target: np.ndarray
    name: str
    values: tuple[float, ...] = ()
    bias: np.ndarray | None = None
    bias_step: int = 1


def class_list(mapping: Mapping[int, str | None], classes: Sequence[str] | None) -> list[str]:
    """The ordered class names: ``classes`` if given (checked to cover the mapping), else the
    mapping's names in order of first appearance."""
    named = [c for c in mapping.values() if c is not None]
    if classes is None:
        return list(dict.fromkeys(named))
    out = [str(c) for c in classes]
    if len(set(out)) != len(out):
        raise InputError(f"class names must be unique, got {out}")
    missing = sorted(set(named) - set(out))
    if missing:
        raise InputError(f"the mapping names classes that are not in the class list {out}: {missing}")
    return out


def check_sections(images: Sequence[np.ndarray], annotations: Sequence[np.ndarray],
                   mapping: Mapping[int, str | None], classes: Sequence[str],
                   names: Sequence[str] | None = None,
                   values: Sequence[Sequence[float]] | None = None) -> list[TrainingSection]:
    """Check annotated sections once, where they enter, and convert them.

    ``values``: per section, its scalar inputs to the context branch (the same number for every
    section, finite), or None for none.

    Raises
    ------
    InputError
        Different numbers of images, annotations, names and values, values that are not finite or
        differ in number, or annotation values not in the mapping (the message names the section
        and the values).
    InvalidImageError
        An image that is not ``(H, W)`` / ``(C, H, W)``, is empty or constant; an annotation whose
        size differs from its section's; channel counts that differ between sections.
    """
    if names is None:
        names = [f"section {i}" for i in range(len(images))]
    if not (len(images) == len(annotations) == len(names)):
        raise InputError(f"got {len(images)} sections, {len(annotations)} annotations and {len(names)} "
                         "names; they must pair up one to one")
    if not images:
        raise InputError("no annotated sections to train on")
    if values is None:
        values = [()] * len(images)
    if len(values) != len(images):
        raise InputError(f"got {len(images)} sections and {len(values)} sets of section values; they "
                         "must pair up one to one")
    checked_values = [tuple(float(v) for v in vs) for vs in values]
    for name, vs in zip(names, checked_values, strict=True):
        if len(vs) != len(checked_values[0]):
            raise InputError(f"{name}: {len(vs)} section values, but the first section has "
                             f"{len(checked_values[0])}")
        if not all(math.isfinite(v) for v in vs):
            raise InputError(f"{name}: section values must be finite, got {list(vs)}")
    index = {c: i for i, c in enumerate(classes)}
    lut_keys = np.array(sorted(mapping), dtype=np.int64)
    lut_vals = np.array([IGNORE if mapping[k] is None else index[mapping[k]]  # type: ignore[index]
                         for k in lut_keys], dtype=np.int64)
    out: list[TrainingSection] = []
    channels = None
    for img, ann, name, vs in zip(images, annotations, names, checked_values, strict=True):
        img = np.asarray(img)
        if img.ndim == 2:
            img = img[None]
        if img.ndim != 3 or min(img.shape) < 1:
            raise InvalidImageError(f"{name}: expected a non-empty (H, W) or (C, H, W) section, got shape "
                                    f"{img.shape}")
        if channels is not None and img.shape[0] != channels:
            raise InvalidImageError(f"{name}: {img.shape[0]} channels, but the first section has {channels}")
        channels = img.shape[0]
        ann = np.asarray(ann)
        if ann.shape != img.shape[1:]:
            raise InvalidImageError(f"{name}: the annotation has shape {ann.shape} but the section is "
                                    f"{img.shape[1]} x {img.shape[2]} px; they must match")
        if not np.issubdtype(ann.dtype, np.integer):
            if not np.all(np.isfinite(ann)) or np.any(ann != np.round(ann)):
                raise InputError(f"{name}: annotation values must be integers, got dtype {ann.dtype}")
        image = img.astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        if not np.isfinite(lo) or not np.isfinite(hi):
            raise InvalidImageError(f"{name}: the section contains NaN or infinite values")
        if lo == hi:
            raise InvalidImageError(f"{name}: the section is constant (every pixel is {lo:g})")
        present = np.unique(ann).astype(np.int64)
        unknown = present[~np.isin(present, lut_keys)]
        if unknown.size:
            raise InputError(f"{name}: annotation values {unknown.tolist()[:10]} are not in the label "
                             f"mapping (known: {lut_keys.tolist()[:20]})")
        target = lut_vals[np.searchsorted(lut_keys, ann.astype(np.int64))]
        out.append(TrainingSection(image, target, str(name), vs))
    return out


# --------------------------------------------------------------------------------------------------
# context overview (shared with the model at prediction time)


def overview_factor(shape: tuple[int, int], size: int) -> int:
    """Block-averaging factor that brings the section's longer side to at most ``size`` px (the
    same rule the prediction engine uses for ``overview_size``)."""
    return max(1, -(-max(shape) // int(size)))


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """``(C, H, W)`` averaged over ``factor`` x ``factor`` blocks (partial blocks at the edges)."""
    c, h, w = image.shape
    hh, ww = -(-h // factor) * factor, -(-w // factor) * factor
    padded = np.zeros((c, hh, ww), np.float64)
    padded[:, :h, :w] = image
    counts = np.zeros((hh, ww))
    counts[:h, :w] = 1
    s = padded.reshape(c, hh // factor, factor, ww // factor, factor).sum(axis=(2, 4))
    n = counts.reshape(hh // factor, factor, ww // factor, factor).sum(axis=(1, 3))
    return (s / n).astype(np.float32)


def overview_canvas(overview: np.ndarray, size: int, values: Sequence[float] = ()) -> np.ndarray:
    """``(C + V + 1, size, size)``: the (normalised) overview at the top left, one constant plane
    per section value (e.g. the section's place along the brain's series), and its footprint."""
    c, h, w = overview.shape
    v = len(values)
    canvas = np.zeros((c + v + 1, size, size), np.float32)
    canvas[:c, :h, :w] = overview[:, :size, :size]
    for i, value in enumerate(values):
        canvas[c + i] = float(value)
    canvas[c + v, :h, :w] = 1
    return canvas


def context_input(canvas: torch.Tensor, factor: int, origins: torch.Tensor,
                  window: tuple[int, int]) -> torch.Tensor:
    """``(B, C + 2, s, s)``: the section's canvas and, per window, a mask of its footprint.

    ``origins`` ``(B, 2)`` are the windows' top-left corners in section pixels.
    """
    b = origins.shape[0]
    s = canvas.shape[-1]
    grid = (torch.arange(s, device=canvas.device, dtype=torch.float32) + 0.5) * factor
    y0 = origins[:, 0:1].to(torch.float32)
    x0 = origins[:, 1:2].to(torch.float32)
    rows = ((grid[None] >= y0) & (grid[None] < y0 + window[0])).float()  # (B, s)
    cols = ((grid[None] >= x0) & (grid[None] < x0 + window[1])).float()
    mask = rows[:, :, None] * cols[:, None, :]
    return torch.cat([canvas[None].expand(b, -1, -1, -1), mask[:, None]], 1)


def grid_window(grid: torch.Tensor, step: int, r0: int, c0: int, h: int, w: int) -> torch.Tensor:
    """Bilinear values of ``grid`` ``(K, Hc, Wc)`` at the pixels of the window ``[r0:r0+h, c0:c0+w]``
    of a section whose pixel ``(i * step + (step - 1) / 2, j * step + (step - 1) / 2)`` is grid
    point ``(i, j)``; beyond the grid's first and last points the edge values hold.

    Separable: the grid points the window touches, weighted along rows then columns by two small
    interpolation matrices (two matrix products: a training step and a section's windows ask for
    thousands of these). The matrices are made in numpy (a hat function of the distance to each
    grid point: 150 us a 128-pixel window against 235 us with torch's small-tensor operations).
    """

    def axis(start: int, n: int, size: int) -> tuple[torch.Tensor, int, int]:
        u = (np.arange(start, start + n, dtype=np.float64) - (step - 1) / 2) / step
        np.clip(u, 0, size - 1, out=u)
        lo, hi = int(u[0]), min(int(u[-1]) + 1, size - 1) + 1  # u rises with the pixel
        m = 1 - np.abs(u[:, None] - np.arange(lo, hi)[None, :])  # (1 - f) at floor(u), f above it
        np.maximum(m, 0, out=m)
        return torch.from_numpy(m).to(dtype=grid.dtype, device=grid.device), lo, hi

    mr, r_lo, r_hi = axis(r0, h, grid.shape[1])
    mc, c_lo, c_hi = axis(c0, w, grid.shape[2])
    return mr @ grid[:, r_lo:r_hi, c_lo:c_hi] @ mc.T


# --------------------------------------------------------------------------------------------------
# patches


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices reflected into ``[0, n)`` (mirror without repeating the edge; any distance)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


class PatchSampler:
    """Class-balanced square patches from annotated sections.

    Each patch: a class drawn uniformly from the classes present, a section that contains it, a
    pixel of that class, the patch centred on it with a random shift of up to a quarter patch.
    Pixels outside the section are reflected for the image and ``IGNORE`` for the target.
    """

    def __init__(self, sections: Sequence[TrainingSection], patch_size: int, rng: np.random.Generator,
                 max_pixels_per_class: int = 20000) -> None:
        self.sections = list(sections)
        self.size = int(patch_size)
        self.rng = rng
        self.where: dict[int, list[tuple[int, np.ndarray]]] = {}
        for s, sec in enumerate(self.sections):
            flat = sec.target.ravel()
            for c in np.unique(flat):
                if c == IGNORE:
                    continue
                idx = np.flatnonzero(flat == c)
                if idx.size > max_pixels_per_class:
                    idx = np.sort(rng.choice(idx, max_pixels_per_class, replace=False))
                self.where.setdefault(int(c), []).append((s, idx))
        if not self.where:
            raise InputError("the annotations contain no annotated pixels (all are ignored)")
        self.classes = sorted(self.where)

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``n`` patches: images ``(n, C, P, P)`` float32, targets ``(n, P, P)`` int64, the section
        index of each and the top-left corners ``(n, 2)`` in section pixels."""
        p = self.size
        c0 = self.sections[0].image.shape[0]
        images = np.empty((n, c0, p, p), np.float32)
        targets = np.empty((n, p, p), np.int64)
        which = np.empty(n, np.int64)
        origins = np.empty((n, 2), np.int64)
        for k in range(n):
            cls = self.classes[self.rng.integers(len(self.classes))]
            s, idx = self.where[cls][self.rng.integers(len(self.where[cls]))]
            sec = self.sections[s]
            h, w = sec.target.shape
            y, x = divmod(int(idx[self.rng.integers(idx.size)]), w)
            jy, jx = self.rng.integers(-(p // 4), p // 4 + 1, size=2)
            y0 = int(np.clip(y + jy - p // 2, min(0, h - p), max(0, h - p)))
            x0 = int(np.clip(x + jx - p // 2, min(0, w - p), max(0, w - p)))
            images[k], targets[k] = self.crop(sec, y0, x0)
            which[k], origins[k] = s, (y0, x0)
        return images, targets, which, origins

    def crop(self, sec: TrainingSection, y0: int, x0: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.size
        h, w = sec.target.shape
        ry, rx = np.arange(y0, y0 + p), np.arange(x0, x0 + p)
        if y0 >= 0 and x0 >= 0 and y0 + p <= h and x0 + p <= w:
            return sec.image[:, y0:y0 + p, x0:x0 + p], sec.target[y0:y0 + p, x0:x0 + p]
        iy, ix = _reflect(ry, h), _reflect(rx, w)
        image = sec.image[:, iy[:, None], ix[None, :]]
        target = sec.target[iy[:, None], ix[None, :]].copy()
        outside = ((ry < 0) | (ry >= h))[:, None] | ((rx < 0) | (rx >= w))[None, :]
        target[outside] = IGNORE
        return image, target


# --------------------------------------------------------------------------------------------------
# augmentation


@dataclass(frozen=True)
class Augmentation:
    """Augmentation strengths (0 turns one off).

    ``flips``: random flips and 90-degree rotations; ``rotation_deg``: extra rotation, uniform in
    ``±rotation_deg``; ``scale``: zoom factor in ``1 ± scale``; ``elastic_px`` / ``elastic_grid``:
    amplitude (px, std) and control-grid size of a smooth random displacement; ``contrast``,
    ``brightness``, ``gamma``: intensity changes (factor ``1 ± contrast``, shift ``± brightness``
    std units, gamma in ``exp(± gamma)``); ``noise``: Gaussian noise std (std units);
    ``intensity_channels``: how many leading channels the intensity changes and noise touch (None:
    all; the rest, e.g. position channels, keep their values). ``mirror``: mirror half the patches
    left-right *as whole sections* (:func:`mirror`: the context overview and the window's place in it
    mirrored too, left and right areas swapped), a brain seen in a mirror; training applies it, not
    :func:`augment`, and only to classes with a left/right pair (``X_left`` and ``X_right``).

    The defaults suit short few-shot runs: on ribbon phantoms (300 steps of 8 patches, learning rate
    3e-3), adding rotation 15 deg, scale 0.1, elastic 2 px and gamma 0.3 halved the area Dice
    (0.33 -> 0.15); turn them on for longer training or more varied data.
    """

    flips: bool = True
    rotation_deg: float = 0.0
    scale: float = 0.0
    elastic_px: float = 0.0
    elastic_grid: int = 4
    contrast: float = 0.2
    brightness: float = 0.2
    gamma: float = 0.0
    noise: float = 0.03
    intensity_channels: int | None = None
    mirror: bool = False


def hemisphere_swap(classes: Sequence[str]) -> list[int]:
    """The class permutation that mirrors a brain: ``X_left`` and ``X_right`` (both present) trade
    places; every other class keeps its index."""
    index = {c: i for i, c in enumerate(classes)}
    perm = list(range(len(classes)))
    for c, i in index.items():
        for a, b in (("_left", "_right"), ("_right", "_left")):
            if c.endswith(a) and c[: -len(a)] + b in index:
                perm[i] = index[c[: -len(a)] + b]
    return perm


def mirror(x: torch.Tensor, y: torch.Tensor, context: torch.Tensor | None, which: torch.Tensor,
           swap: Sequence[int], *, widths: Sequence[int] = (), bias_channels: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mirror the patches ``which`` (a ``(B,)`` bool mask) left-right as if cut from the mirrored
    section of a mirrored brain.

    ``x`` ``(B, C, P, P)``: pixels flipped; its last ``bias_channels`` channels are per-class scores
    (an atlas prior), which also trade places by ``swap`` (:func:`hemisphere_swap`). ``y``
    ``(B, P, P)`` class indices: flipped and mapped by ``swap`` (``IGNORE`` stays). ``context``
    ``(B, Cc, s, s)``: the section overview sits in the first ``widths[i]`` columns of patch ``i``'s
    canvas, and those columns (overview, footprint and window mask alike) are flipped, so the window
    lies where the patch lies in the mirrored section (to within one overview pixel when the
    section's width is not a multiple of the overview's block). Unlike :func:`augment`'s flips this
    keeps position and content consistent: a left area seen in the mirror is a right area.
    """
    if not bool(which.any()):
        return x, y, context
    perm = torch.as_tensor(list(swap), dtype=torch.long)
    idx = torch.nonzero(which).flatten()
    x, y = x.clone(), y.clone()
    xm = torch.flip(x[idx], (3,))
    if bias_channels:
        c = x.shape[1] - bias_channels
        xm = torch.cat([xm[:, :c], xm[:, c:][:, perm]], 1)
    x[idx] = xm
    ym = torch.flip(y[idx], (2,))
    y[idx] = torch.where(ym >= 0, perm[ym.clamp_min(0)], ym)
    if context is not None:
        context = context.clone()
        for i in idx.tolist():
            w = int(widths[i]) if len(widths) else context.shape[-1]
            context[i, :, :, :w] = torch.flip(context[i, :, :, :w], (2,))
    return x, y, context


def _uniform(g: torch.Generator, n: int, half_width: float) -> torch.Tensor:
    return (torch.rand(n, generator=g) * 2 - 1) * half_width


def augment(x: torch.Tensor, y: torch.Tensor, context: torch.Tensor | None, aug: Augmentation,
            g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Augment a batch: ``x`` ``(B, C, P, P)`` normalised images, ``y`` ``(B, P, P)`` class indices.

    ``context`` (``(B, Cc, s, s)`` or None) is returned unchanged, on purpose: the patch's content
    may be turned and mirrored (texture does not depend on orientation), but the section overview
    and the window's true place in it must not be, or mirrored brains would teach the network that
    every area also lies where its mirror image does.
    """
    b = x.shape[0]
    if aug.flips:
        k = torch.randint(0, 4, (b,), generator=g).tolist()
        f = torch.randint(0, 2, (b,), generator=g).tolist()
        xs, ys = [], []
        for i in range(b):
            xi, yi = torch.rot90(x[i], k[i], (1, 2)), torch.rot90(y[i], k[i], (0, 1))
            if f[i]:
                xi, yi = torch.flip(xi, (2,)), torch.flip(yi, (1,))
            xs.append(xi)
            ys.append(yi)
        x, y = torch.stack(xs), torch.stack(ys)
    if aug.rotation_deg or aug.scale or aug.elastic_px:
        angle = _uniform(g, b, math.radians(aug.rotation_deg))
        zoom = 1 + _uniform(g, b, aug.scale)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], 1),
                             torch.stack([sin, cos, torch.zeros(b)], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        if aug.elastic_px:
            n = max(2, int(aug.elastic_grid))
            disp = torch.randn(b, 2, n, n, generator=g) * (2 * aug.elastic_px / x.shape[-1])
            # bicubic, as two products with interpolate's own weights (0.1 ms, not 2 ms, a step)
            mh = resize_matrix(n, x.shape[-2], "bicubic", True)
            mw = resize_matrix(n, x.shape[-1], "bicubic", True)
            disp = mh @ disp @ mw.T
            grid = grid + disp.permute(0, 2, 3, 1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        yf = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="reflection",
                           align_corners=False)
        y = yf[:, 0].round().long()
    fixed = None
    if aug.intensity_channels is not None and aug.intensity_channels < x.shape[1]:
        x, fixed = x[:, :aug.intensity_channels], x[:, aug.intensity_channels:]
    if aug.contrast or aug.brightness or aug.gamma:
        dims = (1, 2, 3)
        gamma = torch.exp(_uniform(g, b, aug.gamma)).view(b, 1, 1, 1)
        if aug.gamma:  # (0: every gamma is 1, and the pixels stay as they are)
            lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
            span = (hi - lo).clamp_min(1e-6)
            x = ((x - lo) / span).clamp(0, 1) ** gamma * span + lo
        mean = x.mean(dims, keepdim=True)
        contrast = (1 + _uniform(g, b, aug.contrast)).view(b, 1, 1, 1)
        x = (x - mean) * contrast + mean + _uniform(g, b, aug.brightness).view(b, 1, 1, 1)
    if aug.noise:
        x = x + torch.randn(x.shape, generator=g) * aug.noise
    if fixed is not None:
        x = torch.cat([x, fixed], 1)
    return x.contiguous(), y.contiguous(), context
