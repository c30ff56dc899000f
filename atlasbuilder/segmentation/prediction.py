"""Sliding-window prediction over sections of any size.

The engine knows nothing of the model: a *predictor* is any callable (an ``nn.Module`` included)
that maps a ``(B, C, h, w)`` float32 tensor of raw section values to ``(B, K, h, w)`` scores
(logits or probabilities). Windows lie on the same grid as MONAI's ``sliding_window_inference``
(step ``int(roi * (1 - overlap))``, the last window shifted back inside the image); their outputs are
weighted by an importance map (Gaussian with ``sigma = sigma_scale * roi``, weights clamped below at
``max(min, 1e-3)`` exactly as MONAI does, or constant) and normalised by the summed weights, so the
result equals MONAI's up to float rounding.

Memory does not grow with the section: the image is processed in column bands (``band_width``
pixels wide; windows that straddle a band boundary are computed for both bands, so blending is
unchanged) and, within a band, tile-row by tile-row. Only the accumulators of the rows still open
(one window high) live in memory; finished rows are handed on (to the caller's array, or to the
output store) and forgotten. :func:`predict_file` reads the TIFF region by region (tiled/striped
TIFFs through tifffile's zarr interface, uncompressed ones through a short-lived memory map) and
writes the label image and the per-class probabilities into a chunked zarr store, one chunk-row at
a time, under a temporary name that is renamed only when complete.

Padding. A section smaller than the window along an axis is padded to the window size (split
evenly, the extra pixel after, as MONAI does) with ``padding_mode``: ``"reflect"`` (default;
mirrored without repeating the edge, repeated for tiny sections), ``"edge"``, ``"symmetric"`` or
``"constant"`` (with ``cval``; MONAI's default). Sections at least one window large are never padded:
the last window is moved inside instead.

Optional predictor protocol, for models that need more than the window itself:

- ``predictor.needs_origins = True``: it is called as ``predictor(x, origins)``, ``origins`` a
  ``(B, 2)`` int64 tensor of the windows' top-left corners ``(row, col)`` in section pixels
  (negative where the section was padded). Flip test-time augmentation then needs
  ``predictor.flips_keep_origins = True``: the origins only say where the window is (the same for
  its flipped pixels), not where each pixel is;
- ``predictor.overview_size = n``: before the first window, ``predictor.prepare_section(overview,
  factor, shape)`` receives the whole section block-averaged by ``factor`` so that its longer side
  is at most ``n`` pixels (``(C, ceil(H / factor), ceil(W / factor))`` float32) and the section's
  ``(H, W)``;
- ``predictor.window_bias(origins, (h, w))``: a ``(B, K, h, w)`` term added to the windows' scores
  after flip test-time augmentation (so it is never flipped), e.g. an atlas prior's
  log-probabilities at the windows' pixels (:mod:`.prior`).

Example
-------
>>> import numpy as np
>>> from atlasbuilder.segmentation.prediction import SlidingWindow, predict_array
>>> image = np.random.default_rng(0).random((1, 70, 45), dtype=np.float32)
>>> out = predict_array(image, lambda x: 2 * x, window=SlidingWindow(roi_size=32, overlap=0.5))
>>> bool(np.abs(out - 2 * image).max() < 1e-5)
True
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import InputError, InvalidImageError, MissingFileError, OutputExistsError
from ..storage import atomic_directory

__all__ = [
    "PREDICTION_FORMAT",
    "Block",
    "SlidingWindow",
    "importance_map",
    "iter_blocks",
    "open_prediction",
    "open_section",
    "predict_array",
    "predict_file",
    "predict_sections",
    "resolve_device",
    "window_starts",
]

PREDICTION_FORMAT = "atlasbuilder-section-prediction/1"
PROBABILITY_SCALE = 100  # probabilities are stored as uint8 percent (DESIGN: "uint8 percent")

_BLOCK_ROWS = 64  # rows per yielded block

_PAD_MODES = ("reflect", "edge", "symmetric", "constant")
_BLEND_MODES = ("gaussian", "constant")

Predictor = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------------------
# settings and geometry


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int | np.integer):
        pair = (int(value), int(value))
    else:
        items = tuple(value)
        if len(items) != 2 or not all(isinstance(v, int | np.integer) for v in items):
            raise InputError(f"{name} must be an int or a pair of ints, got {value!r}")
        pair = (int(items[0]), int(items[1]))
    if min(pair) < 1:
        raise InputError(f"{name} must be positive, got {value!r}")
    return pair


@dataclass(frozen=True)
class SlidingWindow:
    """How a section is cut into windows and how their outputs are blended.

    Parameters
    ----------
    roi_size
        Window size in pixels, ``n`` or ``(rows, cols)``.
    overlap
        Fraction of a window shared with its neighbour, in ``[0, 1)``, one value or per axis.
    mode
        ``"gaussian"`` (MONAI's importance map) or ``"constant"`` (plain average).
    sigma_scale
        Gaussian sigma as a fraction of the window size (MONAI's default 0.125).
    batch_size
        Windows per call of the predictor.
    padding_mode, cval
        How a section smaller than the window is padded (see the module docstring).
    band_width
        Width of the column bands a wide section is processed in; bounds the memory of the
        accumulators (``K * roi_rows * band_width`` floats per open tile-row).
    """

    roi_size: int | tuple[int, int] = 256
    overlap: float | tuple[float, float] = 0.25
    mode: str = "gaussian"
    sigma_scale: float = 0.125
    batch_size: int = 4
    padding_mode: str = "reflect"
    cval: float = 0.0
    band_width: int = 8192
    roi: tuple[int, int] = field(init=False, repr=False, compare=False)
    overlaps: tuple[float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roi", _pair(self.roi_size, "roi_size"))
        ov = self.overlap
        ovs = (float(ov), float(ov)) if isinstance(ov, int | float) else tuple(float(o) for o in ov)
        if len(ovs) != 2 or not all(0.0 <= o < 1.0 for o in ovs):
            raise InputError(f"overlap must be in [0, 1) (one value or a pair), got {ov!r}")
        object.__setattr__(self, "overlaps", (ovs[0], ovs[1]))
        if self.mode not in _BLEND_MODES:
            raise InputError(f"mode must be one of {_BLEND_MODES}, got {self.mode!r}")
        if not self.sigma_scale > 0:
            raise InputError(f"sigma_scale must be positive, got {self.sigma_scale!r}")
        if int(self.batch_size) < 1:
            raise InputError(f"batch_size must be at least 1, got {self.batch_size!r}")
        if self.padding_mode not in _PAD_MODES:
            raise InputError(f"padding_mode must be one of {_PAD_MODES}, got {self.padding_mode!r}")
        if int(self.band_width) < self.roi[1]:
            raise InputError(f"band_width ({self.band_width}) must be at least the window width "
                             f"({self.roi[1]})")

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable settings (for provenance)."""
        d = asdict(self)
        d.pop("roi")
        d.pop("overlaps")
        d["roi_size"], d["overlap"] = list(self.roi), list(self.overlaps)
        return d


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start positions of the windows along one axis of ``size`` (>= ``roi``) pixels.

    Same grid as MONAI: step ``max(int(roi * (1 - overlap)), 1)`` (or ``roi`` when ``size == roi``),
    as few windows as cover the axis, the last one moved back to end at ``size``. Starts are
    strictly increasing.
    """
    if size < roi:
        raise ValueError(f"size {size} is smaller than the window {roi}; pad first")
    if size == roi:
        return [0]
    step = max(int(roi * (1 - overlap)), 1)
    n = 0
    while n * step + roi < size:
        n += 1
    return [min(i * step, size - roi) for i in range(n + 1)]


def importance_map(roi_size: int | Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Weights of one window's pixels, ``(rows, cols)`` float32.

    ``"gaussian"``: ``exp(-d**2 / (2 sigma**2))`` per axis with ``sigma = sigma_scale * size``,
    centred on the window, multiplied, then clamped below at ``max(min, 1e-3)`` — computed with the
    same float32 operations as MONAI's ``compute_importance_map`` so the two agree bit for bit.
    ``"constant"``: ones.
    """
    rows, cols = _pair(roi_size if isinstance(roi_size, int) else tuple(roi_size), "roi_size")
    if mode == "constant":
        return torch.ones((rows, cols), dtype=torch.float32, device=device)
    if mode != "gaussian":
        raise InputError(f"mode must be one of {_BLEND_MODES}, got {mode!r}")
    result = torch.empty(0)
    for i, n in enumerate((rows, cols)):
        sigma = n * sigma_scale
        x = torch.arange(start=-(n - 1) / 2.0, end=(n - 1) / 2.0 + 1, dtype=torch.float, device=device)
        x = torch.exp(x**2 / (-2 * sigma**2))
        result = result.unsqueeze(-1) * x[None] if i > 0 else x
    floor = max(torch.min(result).item(), 1e-3)
    return torch.clamp_(result, min=floor)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a ``torch.device``, checked to exist.

    Raises
    ------
    InputError
        An unknown device, or CUDA asked for where none is available.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {str(device)!r} was requested but no CUDA GPU is available to torch "
                f"{torch.__version__} (built for CUDA: {torch.version.cuda or 'no'}); use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {str(device)!r} does not exist: torch sees "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise InputError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


# --------------------------------------------------------------------------------------------------
# sections: in-memory arrays and TIFF files read region by region


class _Section:
    """A ``(C, H, W)`` image read region by region. ``name`` is used in messages."""

    name: str
    shape: tuple[int, int, int]
    dtype: np.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        """Release files (nothing to do for arrays)."""

    def __enter__(self) -> _Section:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ArraySection(_Section):
    def __init__(self, array: Any, name: str = "array") -> None:
        if not hasattr(array, "shape") or not hasattr(array, "__getitem__"):
            array = np.asarray(array)
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        if array.ndim not in (2, 3):
            raise InvalidImageError(f"{name}: expected a (H, W) or (C, H, W) image, got shape "
                                    f"{tuple(array.shape)}")
        self._array = array
        self._2d = array.ndim == 2
        c, h, w = (1, *array.shape) if self._2d else tuple(array.shape)
        self.name, self.shape, self.dtype = name, (int(c), int(h), int(w)), np.dtype(array.dtype)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self._2d:
            return np.asarray(self._array[y0:y1, x0:x1])[None]
        return np.asarray(self._array[:, y0:y1, x0:x1])


class _TiffSection(_Section):
    """Level 0 of the first series of a TIFF: axes ``YX``, ``YXS``/``YXC`` or ``SYX``/``CYX``."""

    def __init__(self, path: Path) -> None:
        import tifffile

        self.name = str(path)
        if not path.is_file():
            raise MissingFileError(path, "section image")
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as exc:
            raise InvalidImageError(f"{path}: cannot be read as a TIFF ({exc})") from exc
        self._store: Any = None
        try:
            series = self._tif.series[0]
            axes = series.axes
            shape = tuple(int(s) for s in series.shape)
            squeezed = [(a, s) for a, s in zip(axes, shape, strict=True) if s != 1 or a in "YX"]
            axes = "".join(a for a, _ in squeezed)
            if axes not in ("YX", "YXS", "YXC", "SYX", "CYX"):
                raise InvalidImageError(f"{path}: expected a 2-D section (axes YX, YXS or SYX), "
                                        f"found axes {series.axes} with shape {series.shape}")
            self._axes = axes
            self._full_shape = tuple(int(s) for s in series.shape)
            self._squeeze = tuple(i for i, s in enumerate(series.shape) if s == 1
                                  and series.axes[i] not in "YX")
            dims = dict(squeezed)
            self.shape = (dims.get("S", dims.get("C", 1)), dims["Y"], dims["X"])
            self.dtype = np.dtype(series.dtype)
            key = series.keyframe
            # uncompressed, byte-aligned, contiguous data is read through a memory map; anything
            # else (tiles, strips, compression, odd bit depths) through tifffile's zarr store
            plain = key.compression == 1 and key.bitspersample == 8 * self.dtype.itemsize
            self._offset = series.dataoffset if plain else None
            if self._offset is None:
                self._store = series.aszarr(level=0)
                import zarr

                self._zarr = zarr.open_array(self._store, mode="r")
        except InvalidImageError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise InvalidImageError(f"{path}: cannot be read as a section image ({exc})") from exc
        if min(self.shape[1:]) < 1:
            self.close()
            raise InvalidImageError(f"{path}: the section is empty (shape {self.shape[1:]})")

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        index = {"Y": slice(y0, y1), "X": slice(x0, x1), "S": slice(None), "C": slice(None)}
        full_index = []
        ax_iter = iter(self._axes)
        for i in range(len(self._full_shape)):
            full_index.append(0 if i in self._squeeze else index[next(ax_iter)])
        try:
            if self._offset is not None:
                # a fresh map per read: pages touched are released with it, so the resident set
                # stays one region, not the whole file
                mm = np.memmap(self._tif.filehandle.path, dtype=self._tif.byteorder + self.dtype.str[1:],
                               mode="r", offset=self._offset, shape=self._full_shape)
                region = np.array(mm[tuple(full_index)], dtype=self.dtype)
                del mm
            else:
                region = np.asarray(self._zarr[tuple(full_index)])
        except Exception as exc:
            raise InvalidImageError(f"{self.name}: cannot read rows {y0}:{y1}, columns {x0}:{x1} "
                                    f"({exc})") from exc
        if self._axes == "YX":
            return region[None]
        if self._axes in ("YXS", "YXC"):
            return np.moveaxis(region, -1, 0)
        return region

    def close(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
            self._store = None
        self._tif.close()


def open_section(source: Any, name: str | None = None) -> _Section:
    """A section to read region by region: a TIFF path, or an array ``(H, W)`` / ``(C, H, W)``.

    Arrays may be anything sliceable with a ``shape`` (numpy, memmap, zarr). Use as a context
    manager to close files.

    Raises
    ------
    MissingFileError, InvalidImageError
        The file does not exist, is not a readable 2-D TIFF, or the image is empty.
    """
    if isinstance(source, str | os.PathLike):
        return _TiffSection(Path(source))
    section = _ArraySection(source, name or "array")
    if min(section.shape) < 1:
        raise InvalidImageError(f"{section.name}: the section is empty (shape {section.shape})")
    return section


def _scan(section: _Section, factor: int | None, max_bytes: int = 8 << 20) -> tuple[float, float,
                                                                                    np.ndarray | None]:
    """Min, max and (if ``factor``) the block-averaged overview, reading strip by strip."""
    c, h, w = section.shape
    f = factor or 1
    rows = max(f, (max_bytes // max(1, c * w * section.dtype.itemsize)) // f * f)
    lo, hi = math.inf, -math.inf
    overview = np.zeros((c, -(-h // f), -(-w // f)), np.float32) if factor else None
    for y0 in range(0, h, rows):
        strip = section.read(y0, min(h, y0 + rows), 0, w)
        lo, hi = min(lo, float(strip.min())), max(hi, float(strip.max()))
        if overview is not None:
            sh, sw = strip.shape[1:]
            padded = np.zeros((c, -(-sh // f) * f, -(-sw // f) * f), np.float64)
            padded[:, :sh, :sw] = strip
            counts = np.zeros(padded.shape[1:], np.float64)
            counts[:sh, :sw] = 1
            s = padded.reshape(c, padded.shape[1] // f, f, padded.shape[2] // f, f).sum(axis=(2, 4))
            n = counts.reshape(padded.shape[1] // f, f, padded.shape[2] // f, f).sum(axis=(1, 3))
            overview[:, y0 // f:y0 // f + s.shape[1]] = s / n
    return lo, hi, overview


# --------------------------------------------------------------------------------------------------
# the engine


class Block(NamedTuple):
    """A finished region of blended scores: rows ``y0:y1``, columns ``x0:x1`` of the section;
    ``scores`` is ``(K, y1 - y0, x1 - x0)`` float32 on the compute device."""

    y0: int
    y1: int
    x0: int
    x1: int
    scores: torch.Tensor


class _Runner:
    """Calls the predictor on a batch: no grad, autocast on CUDA, optional flip TTA."""

    _FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))

    def __init__(self, predictor: Predictor, device: torch.device, amp: bool, tta: bool,
                 channels_last: bool) -> None:
        self.memory_format = torch.contiguous_format
        if isinstance(predictor, torch.nn.Module):
            predictor.eval().to(device)
            if channels_last:
                # oneDNN (CPU) and cuDNN run convolutions fastest on channels-last tensors; the
                # weights must be converted too (an input alone does not switch the layout)
                predictor.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
                self.memory_format = torch.channels_last
        self.predictor = predictor
        self.device = device
        self.amp = amp and device.type == "cuda"
        self.needs_origins = bool(getattr(predictor, "needs_origins", False))
        if tta and self.needs_origins and not getattr(predictor, "flips_keep_origins", False):
            raise InputError("flip test-time augmentation is not supported for a predictor that uses "
                             "the window position per pixel (needs_origins without "
                             "flips_keep_origins); use tta=False")
        self.flips = self._FLIPS if tta else ((),)
        self.window_bias = getattr(predictor, "window_bias", None)

    def __call__(self, x: torch.Tensor, origins: torch.Tensor) -> torch.Tensor:
        amp = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        total: torch.Tensor | None = None
        x = x.contiguous(memory_format=self.memory_format)
        with torch.no_grad(), amp:
            for dims in self.flips:
                xi = torch.flip(x, dims) if dims else x
                out = self.predictor(xi, origins) if self.needs_origins else self.predictor(xi)
                if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != x.shape[0] \
                        or tuple(out.shape[2:]) != tuple(x.shape[2:]):
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise InputError(f"the predictor must map (B, C, h, w) = {tuple(x.shape)} to "
                                     f"(B, K, h, w) scores; it returned {got}")
                out = out.float()
                if dims:
                    out = torch.flip(out, dims)
                # never in place: a predictor may return its input or a view of it
                total = out if total is None else total + out
        assert total is not None
        total = total.contiguous()
        if len(self.flips) > 1:
            total = total / len(self.flips)
        if self.window_bias is not None:
            bias = self.window_bias(origins, tuple(x.shape[2:]))
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != tuple(total.shape):
                what = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise InputError(f"window_bias must return the scores' shape {tuple(total.shape)}; "
                                 f"it returned {what}")
            total = total + bias.to(device=total.device, dtype=total.dtype)
        return total


def _pad_index(n: int, roi: int, mode: str) -> tuple[int, np.ndarray | None]:
    """Padding before, and the padded->source index map (-1 = constant) when ``n < roi``."""
    if n >= roi:
        return 0, None
    before = (roi - n) // 2
    after = roi - n - before
    idx = np.arange(n)
    if mode == "constant":
        return before, np.pad(idx, (before, after), mode="constant", constant_values=-1)
    return before, np.pad(idx, (before, after), mode=mode)  # type: ignore[call-overload]


def _read_padded(section: _Section, y0: int, y1: int, x0: int, x1: int,
                 maps: tuple[np.ndarray | None, np.ndarray | None], cval: float) -> np.ndarray:
    """Region ``[y0:y1, x0:x1]`` of the padded section, float32 ``(C, h, w)``."""
    my, mx = maps
    if my is None and mx is None:
        return section.read(y0, y1, x0, x1).astype(np.float32, copy=False)
    iy = np.arange(y0, y1) if my is None else my[y0:y1]
    ix = np.arange(x0, x1) if mx is None else mx[x0:x1]
    out = np.full((section.shape[0], len(iy), len(ix)), cval, np.float32)
    vy, vx = np.flatnonzero(iy >= 0), np.flatnonzero(ix >= 0)
    if len(vy) and len(vx):
        sy0, sy1 = int(iy[vy].min()), int(iy[vy].max()) + 1
        sx0, sx1 = int(ix[vx].min()), int(ix[vx].max()) + 1
        src = section.read(sy0, sy1, sx0, sx1).astype(np.float32, copy=False)
        out[:, vy[:, None], vx[None, :]] = src[:, (iy[vy] - sy0)[:, None], (ix[vx] - sx0)[None, :]]
    return out


def _bands(width: int, xs: list[int], roi_w: int, band_width: int) -> list[tuple[int, int, list[int]]]:
    """Column bands ``(c0, c1, window starts touching the band)`` of the padded width."""
    edges = [*range(0, width, band_width), width] if width > band_width else [0, width]
    if len(edges) > 2 and edges[-1] - edges[-2] < roi_w:  # no sliver of a band at the right edge
        edges.pop(-2)
    return [(c0, c1, [x for x in xs if x < c1 and x + roi_w > c0])
            for c0, c1 in itertools.pairwise(edges)]


def iter_blocks(section: _Section, predictor: Predictor, *, window: SlidingWindow | None = None,
                device: str | torch.device = "cpu", amp: bool = True, tta: bool = False,
                channels_last: bool = True, progress: bool = False) -> Iterator[Block]:
    """Blend the predictor's windows over ``section`` and yield finished :class:`Block` s.

    Blocks (at most 64 rows each) come band by band (left to right), top to bottom within a band;
    together they tile the section exactly once. Only the accumulators of the open tile-rows of one
    band are held.
    This is the engine under :func:`predict_array` and :func:`predict_file`.
    """
    win = window or SlidingWindow()
    dev = resolve_device(device)
    run = _Runner(predictor, dev, amp, tta, channels_last)
    _, h, w = section.shape
    (rh, rw), (oy, ox) = win.roi, win.overlaps
    pt, my = _pad_index(h, rh, win.padding_mode)
    pl, mx = _pad_index(w, rw, win.padding_mode)
    hp, wp = max(h, rh), max(w, rw)
    ys = window_starts(hp, rh, oy)
    xs = window_starts(wp, rw, ox)

    overview_size = getattr(predictor, "overview_size", None)
    if overview_size:
        factor = max(1, -(-max(h, w) // int(overview_size)))
        _, _, overview = _scan(section, factor)
        predictor.prepare_section(overview, factor, (h, w))  # type: ignore[attr-defined]

    imp = importance_map(win.roi, win.mode, win.sigma_scale, dev)
    bands = _bands(wp, xs, rw, int(win.band_width))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ys) * sum(len(b[2]) for b in bands), unit="window",
                   desc=Path(section.name).name, leave=False)
    try:
        for c0, c1, bxs in bands:
            yield from _iter_band(section, run, win, imp, ys, bxs, c0, c1, (pt, pl), (h, w), (my, mx),
                                  bar)
    finally:
        if bar is not None:
            bar.close()


def _iter_band(section: _Section, run: _Runner, win: SlidingWindow, imp: torch.Tensor, ys: list[int],
               bxs: list[int], c0: int, c1: int, pad: tuple[int, int], hw: tuple[int, int],
               maps: tuple[np.ndarray | None, np.ndarray | None], bar: Any) -> Iterator[Block]:
    """One column band, top to bottom.

    The accumulators are a ring of ``ring`` rows (as many as the windows of one batch and the rows
    still open can span): a window adds into rows ``y % ring``; a finished tile-row is normalised,
    handed on and zeroed. Nothing is allocated per window and nothing is copied between rows.
    """
    rh, rw = win.roi
    pt, pl = pad
    h, w = hw
    dev = run.device
    bs = int(win.batch_size)
    wx0, wx1 = bxs[0], bxs[-1] + rw
    windows = [(i, x) for i in range(len(ys)) for x in bxs]
    batches = [windows[b:b + bs] for b in range(0, len(windows), bs)]
    ring = max(ys[bt[-1][0]] + rh - ys[bt[0][0]] for bt in batches)
    acc: torch.Tensor | None = None
    wsum = torch.zeros((ring, wx1 - wx0), dtype=torch.float32, device=dev)
    strips: dict[int, torch.Tensor] = {}
    done = [0] * len(ys)
    next_row = 0
    ox0, ox1 = max(c0 - pl, 0), min(c1 - pl, w)  # output columns of this band (section coordinates)
    ax = slice(ox0 + pl - wx0, ox1 + pl - wx0)

    def ring_rows(y: int, n: int) -> list[tuple[slice, slice]]:
        """(ring rows, rows of the n-row piece) for rows y..y+n, split where the ring wraps."""
        r = y % ring
        if r + n <= ring:
            return [(slice(r, r + n), slice(0, n))]
        return [(slice(r, ring), slice(0, ring - r)), (slice(0, r + n - ring), slice(ring - r, n))]

    for batch in batches:
        tiles = []
        for i, x in batch:
            if i not in strips:
                strip = _read_padded(section, ys[i], ys[i] + rh, wx0, wx1, maps, win.cval)
                strips[i] = torch.from_numpy(strip).to(dev)
            tiles.append(strips[i][:, :, x - wx0:x - wx0 + rw])
        origins = torch.tensor([[ys[i] - pt, x - pl] for i, x in batch], dtype=torch.int64, device=dev)
        out = run(torch.stack(tiles), origins)
        if acc is None:
            acc = torch.zeros((out.shape[1], ring, wx1 - wx0), dtype=torch.float32, device=dev)
        for k, (i, x) in enumerate(batch):
            cols = slice(x - wx0, x - wx0 + rw)
            for rr, pr in ring_rows(ys[i], rh):
                acc[:, rr, cols].addcmul_(out[k, :, pr], imp[pr])
                wsum[rr, cols] += imp[pr]
            done[i] += 1
        if bar is not None:
            bar.update(len(batch))
        while next_row < len(ys) and done[next_row] == len(bxs):
            i = next_row
            next_row += 1
            del strips[i]
            fh = ys[i + 1] - ys[i] if i + 1 < len(ys) else rh
            # hand on the finished rows (cropped to the section) in short blocks: small temporaries
            r0, r1 = max(ys[i] - pt, 0), min(ys[i] + fh - pt, h)
            for b0 in range(r0, r1 if ox1 > ox0 else r0, _BLOCK_ROWS):
                b1 = min(b0 + _BLOCK_ROWS, r1)
                pieces = [acc[:, rr, ax] / wsum[rr, ax] for rr, _ in ring_rows(b0 + pt, b1 - b0)]
                yield Block(b0, b1, ox0, ox1, pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1))
            for rr, _ in ring_rows(ys[i], fh):
                acc[:, rr].zero_()
                wsum[rr].zero_()


def predict_array(image: Any, predictor: Predictor, *, window: SlidingWindow | None = None,
                  device: str | torch.device = "cpu", amp: bool = True, tta: bool = False,
                  channels_last: bool = True, progress: bool = False) -> np.ndarray:
    """Blended predictor scores for an in-memory image.

    Parameters
    ----------
    image
        ``(H, W)`` or ``(C, H, W)`` array (numpy, or anything sliceable with a ``shape``); values
        are given to the predictor as float32, unchanged.
    predictor
        Callable mapping ``(B, C, h, w)`` to ``(B, K, h, w)`` (see the module docstring).
    window
        Tiling and blending settings (:class:`SlidingWindow`; defaults: 256 px, overlap 0.25,
        Gaussian).
    device
        ``"cpu"`` or ``"cuda[:N]"``; windows run there (with float16 autocast on CUDA if ``amp``),
        the result comes back to the CPU.
    tta
        Average over the four flips of each window.
    channels_last
        Run an ``nn.Module`` predictor in channels-last memory layout (same results, ~1.4x faster
        convolutions on CPU).
    progress
        Show a bar over windows.

    An ``nn.Module`` predictor is switched to eval mode and moved to ``device`` (and to channels-last
    layout) in place.

    Returns
    -------
    numpy.ndarray
        ``(K, H, W)`` float32.

    Raises
    ------
    InputError
        Bad settings, an unavailable device, or a predictor that returns the wrong shape.
    InvalidImageError
        An image that is not 2-D (+ channels) or is empty.
    """
    section = open_section(image)
    out: np.ndarray | None = None
    for blk in iter_blocks(section, predictor, window=window, device=device, amp=amp, tta=tta,
                           channels_last=channels_last, progress=progress):
        if out is None:
            out = np.empty((blk.scores.shape[0], *section.shape[1:]), np.float32)
        out[:, blk.y0:blk.y1, blk.x0:blk.x1] = blk.scores.cpu().numpy()
    assert out is not None  # the blocks tile the whole (non-empty) image
    return out


# --------------------------------------------------------------------------------------------------
# files


def _output_path(path: Path, out_dir: Path) -> Path:
    stem = re.sub(r"(\.ome)?\.tiff?$", "", path.name, flags=re.IGNORECASE)
    return out_dir / f"{stem}.zarr"


def _read_attrs(path: Path) -> dict[str, Any] | None:
    """The prediction attributes of a complete output, or None if ``path`` is not one."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
        attrs = meta.get("attributes", {}).get("atlasbuilder", {})
    except (OSError, ValueError, AttributeError):
        return None
    return attrs if isinstance(attrs, dict) and attrs.get("format") == PREDICTION_FORMAT else None


class _ChunkRowWriter:
    """Collects finished blocks of one band into chunk-rows and writes each chunk once."""

    def __init__(self, labels: Any, probs: Any, chunk_rows: int, height: int) -> None:
        self.labels, self.probs, self.ch, self.h = labels, probs, chunk_rows, height
        self.key: tuple[int, int] | None = None
        self.row0 = 0
        self.buf_l: np.ndarray | None = None
        self.buf_p: np.ndarray | None = None

    def add(self, y0: int, x0: int, x1: int, lab: np.ndarray, prob: np.ndarray) -> None:
        if self.key != (x0, x1):
            self.flush()
            self.key, self.row0 = (x0, x1), y0 - y0 % self.ch
            self._new_buffers(lab.dtype, prob.shape[0])
        assert self.buf_l is not None and self.buf_p is not None
        n, pos = lab.shape[0], 0
        while pos < n:
            y = y0 + pos
            r_end = min(self.row0 + self.ch, self.h)
            take = min(n - pos, r_end - y)
            self.buf_l[y - self.row0:y - self.row0 + take] = lab[pos:pos + take]
            self.buf_p[:, y - self.row0:y - self.row0 + take] = prob[:, pos:pos + take]
            pos += take
            if y + take == r_end:
                self.flush()
                self.row0 = r_end
                self._new_buffers(lab.dtype, prob.shape[0])

    def _new_buffers(self, dtype: np.dtype, k: int) -> None:
        assert self.key is not None
        rows = min(self.ch, self.h - self.row0)
        width = self.key[1] - self.key[0]
        self.buf_l = np.zeros((rows, width), dtype) if rows > 0 else None
        self.buf_p = np.zeros((k, rows, width), np.uint8) if rows > 0 else None

    def flush(self) -> None:
        if self.key is None or self.buf_l is None or self.buf_p is None:
            return
        r0, r1 = self.row0, self.row0 + self.buf_l.shape[0]
        x0, x1 = self.key
        self.labels[r0:r1, x0:x1] = self.buf_l
        self.probs[:, r0:r1, x0:x1] = self.buf_p
        self.buf_l = self.buf_p = None


def predict_file(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], predictor: Predictor, *,
                 classes: Sequence[str] | None = None, activation: str | None = "softmax",
                 window: SlidingWindow | None = None, device: str | torch.device = "cpu",
                 amp: bool = True, tta: bool = False, channels_last: bool = True, overwrite: bool = False,
                 chunk_size: int = 512, progress: bool = False) -> Path:
    """Predict one section TIFF into ``out_dir/<stem>.zarr``, streaming, atomically.

    The store holds ``labels`` (``(H, W)``, uint8 or uint16 class indices into ``classes``) and
    ``probabilities`` (``(K, H, W)`` uint8 percent), chunked ``chunk_size`` square, and its
    ``atlasbuilder`` attributes record the classes, the source, the settings and versions. It is
    assembled under a temporary name and renamed only when complete; if the complete output already
    exists (same classes) it is kept and the section is skipped, unless ``overwrite``.

    Parameters
    ----------
    path
        Section TIFF (``YX``, ``YXS`` or ``SYX``; tiled, striped or contiguous; any size).
    out_dir
        Directory for the output store (created if needed).
    predictor
        As for :func:`predict_array`.
    classes
        Class names, index = label value (default: ``predictor.classes``).
    activation
        ``"softmax"`` if the predictor returns logits, ``None`` if it returns probabilities.
    window, device, amp, tta, channels_last, progress
        As for :func:`predict_array`.
    overwrite
        Replace an existing output instead of skipping the section.
    chunk_size
        Chunk edge of the output arrays.

    Returns
    -------
    pathlib.Path
        The output store.

    Raises
    ------
    MissingFileError, InvalidImageError
        A missing, unreadable, empty or constant section (the message names the file).
    InputError
        Bad settings, an unavailable device, or a predictor whose number of classes is not
        ``len(classes)``.
    OutputExistsError
        The output path exists but is not a prediction for the same classes (and no ``overwrite``).
    """
    src = Path(path)
    out_dir = Path(out_dir)
    if classes is None:
        classes = getattr(predictor, "classes", None)
        if classes is None:
            raise InputError("classes must be given (the predictor has no 'classes' attribute)")
    classes = [str(c) for c in classes]
    if activation not in ("softmax", None):
        raise InputError(f"activation must be 'softmax' or None, got {activation!r}")
    if int(chunk_size) < 1:
        raise InputError(f"chunk_size must be positive, got {chunk_size!r}")
    win = window or SlidingWindow()
    dev = resolve_device(device)
    final = _output_path(src, out_dir)
    if (final.exists() or final.is_symlink()) and not overwrite:
        attrs = _read_attrs(final)
        if attrs is not None and attrs.get("classes") == classes:
            return final
        found = "another class set " + repr(attrs.get("classes")) if attrs else "not a section prediction"
        raise OutputExistsError(f"{final} exists and is {found}; remove it or use overwrite=True")

    import zarr

    with open_section(src) as section:
        lo, hi, _ = _scan(section, None)
        if not lo < hi:
            raise InvalidImageError(f"{src}: the section is constant (every pixel is {lo:g}); there "
                                    "is no tissue to segment")
        _, h, w = section.shape
        k = len(classes)
        ch = int(chunk_size)
        band = max(ch, int(win.band_width) // ch * ch)  # bands aligned with chunks: each written once
        win = SlidingWindow(**{**win.as_dict(), "band_width": band})
        label_dtype = np.uint8 if k <= 256 else np.uint16
        with atomic_directory(final, overwrite=True) as tmp:
            group = zarr.open_group(tmp, mode="w")
            labels = group.create_array("labels", shape=(h, w), chunks=(min(ch, h), min(ch, w)),
                                        dtype=label_dtype, fill_value=0, dimension_names=("y", "x"))
            probs = group.create_array("probabilities", shape=(k, h, w),
                                       chunks=(1, min(ch, h), min(ch, w)), dtype=np.uint8,
                                       fill_value=0, dimension_names=("class", "y", "x"))
            writer = _ChunkRowWriter(labels, probs, min(ch, h), h)
            for blk in iter_blocks(section, predictor, window=win, device=dev, amp=amp, tta=tta,
                                   channels_last=channels_last, progress=progress):
                if blk.scores.shape[0] != k:
                    raise InputError(f"{src}: the predictor returned {blk.scores.shape[0]} classes, "
                                     f"expected {k} ({', '.join(classes)})")
                for r in range(0, blk.y1 - blk.y0, 64):  # row chunks keep the temporaries small
                    lab, pct = _labels_and_percent(blk.scores[:, r:r + 64], activation)
                    writer.add(blk.y0 + r, blk.x0, blk.x1, lab.astype(label_dtype, copy=False), pct)
            writer.flush()
            group.attrs["atlasbuilder"] = {
                "format": PREDICTION_FORMAT,
                "source": str(src.absolute()),
                "shape": [h, w],
                "classes": classes,
                "probability_scale": PROBABILITY_SCALE,
                "activation": activation,
                "window": win.as_dict(),
                "tta": bool(tta),
                "versions": _versions(),
            }
    return final


def _labels_and_percent(scores: torch.Tensor, activation: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Class index of the maximum (first on ties) and uint8 percent probabilities, on the CPU."""
    p = torch.softmax(scores, 0) if activation == "softmax" else scores.clamp(0, 1)
    # argmax over the leading axis by K vectorised passes: torch's strided argmax is ~20x slower
    best = p[0].clone()
    lab = torch.zeros(best.shape, dtype=torch.int32, device=p.device)
    for c in range(1, p.shape[0]):
        better = p[c] > best
        best = torch.where(better, p[c], best)
        lab.masked_fill_(better, c)
    pct = (p * PROBABILITY_SCALE).round_().to(torch.uint8)
    return lab.cpu().numpy(), pct.cpu().numpy()


def _versions() -> dict[str, str]:
    from ..storage import package_versions

    return package_versions("atlasbuilder", "torch", "numpy", "zarr", "tifffile")


def predict_sections(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                     predictor: Predictor, *, classes: Sequence[str] | None = None,
                     activation: str | None = "softmax", window: SlidingWindow | None = None,
                     device: str | torch.device = "cpu", amp: bool = True, tta: bool = False,
                     channels_last: bool = True, overwrite: bool = False, chunk_size: int = 512,
                     progress: bool = True) -> list[Path]:
    """:func:`predict_file` for each section, with a progress bar in sections/s.

    Sections whose complete output exists are skipped (so a rerun after an interruption resumes).
    Returns the output stores in the order of ``paths``.
    """
    resolve_device(device)  # fail before the first section
    it: Any = paths
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(paths, unit="section", desc="predict")
    return [predict_file(p, out_dir, predictor, classes=classes, activation=activation, window=window,
                         device=device, amp=amp, tta=tta, channels_last=channels_last, overwrite=overwrite,
                         chunk_size=chunk_size)
            for p in it]


def open_prediction(path: str | os.PathLike[str]) -> tuple[Any, Any, dict[str, Any]]:
    """``(labels, probabilities, attrs)`` of a section prediction, the arrays as lazy zarr arrays.

    Probabilities are uint8 percent (``attrs["probability_scale"]``).

    Raises
    ------
    MissingFileError
        No complete prediction at ``path``.
    """
    import zarr

    p = Path(path)
    attrs = _read_attrs(p)
    if attrs is None:
        raise MissingFileError(p, "section prediction")
    group = zarr.open_group(p, mode="r")
    return group["labels"], group["probabilities"], attrs
