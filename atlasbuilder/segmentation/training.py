"""Training: from a brain's annotated sections to a segmentation model (and its checkpoint).

:func:`train` samples class-balanced patches, augments them, trains a :class:`~.networks.UNet`
(cross-entropy + soft Dice, AdamW, one-cycle learning rate), validates on held-out sections with the
sliding-window engine and stops early when the validation Dice stops improving (or at
``max_iterations`` / ``time_limit_s``). It can start from a checkpoint (fine-tuning).

A :class:`SegmentationModel` is what the prediction engine runs: it normalises raw section values,
and, with a context branch, builds the context input from the section overview the engine hands it.

Checkpoints are a plain dict — tensors plus JSON-serialisable metadata (classes, network, input
normalisation, window, training settings and history, versions) — saved with ``torch.save`` and
loaded with ``torch.load(weights_only=True)``: loading never executes pickled code.

Determinism: with the same inputs, seed, device and number of torch threads, training gives the
same weights. The seed is used inside a forked RNG state (the caller's global RNG is untouched) and
deterministic algorithms are switched on for the duration of training only.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, MissingFileError
from ..storage import atomic_write_bytes
from .data import (
    IGNORE,
    Augmentation,
    PatchSampler,
    TrainingSection,
    augment,
    block_mean,
    check_sections,
    class_list,
    context_input,
    grid_window,
    hemisphere_swap,
    mirror,
    overview_canvas,
    overview_factor,
)
from .networks import UNet, input_multiple
from .prediction import SlidingWindow, predict_array, resolve_device

__all__ = [
    "CHECKPOINT_FORMAT",
    "ModelEnsemble",
    "SegmentationModel",
    "TrainingConfig",
    "dice_scores",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]

CHECKPOINT_FORMAT = "atlasbuilder-segmentation-checkpoint/1"


@dataclass(frozen=True)
class TrainingConfig:
    """How to train. Network fields are ignored when fine-tuning (the checkpoint's network is used).

    The defaults are sized for CPUs: on 500 x 400 px ribbon phantoms (0.2 mm; 3 training sections
    and 1 validation section, one thread) they train in ~2.5 min (0.26 s per step) to a mean area
    Dice of 0.69 on unseen sections. At 300 steps: 0.40 with the context branch, 0.34 without;
    learning rate 3e-3 instead of 1e-2: 0.33.

    Parameters
    ----------
    patch_size, batch_size
        Square training patches (also the prediction window) and patches per step.
    max_iterations, time_limit_s
        Stop after this many steps, or once this much wall time has passed.
    learning_rate, weight_decay
        AdamW; the learning rate follows a one-cycle schedule over ``max_iterations``.
    dice_weight
        Weight of the soft Dice loss added to the cross-entropy.
    eval_every, patience, min_delta
        Validate every ``eval_every`` steps; stop after ``patience`` validations without a gain
        of ``min_delta`` in mean Dice. The best weights are kept.
    val_fraction
        Fraction of the annotated sections held out (at least one when there are three or more;
        none below that, then training runs to the iteration or time limit).
    width, depth, norm, dropout
        U-Net shape (see :class:`~.networks.UNet`).
    context, context_size
        Add the context branch (a ``context_size`` px overview of the whole section with the window
        marked).
    input_pool
        The network works on ``input_pool`` x ``input_pool`` block averages (see
        :class:`~.networks.UNet`); ``patch_size`` must be a multiple of ``input_pool * 2**(depth - 1)``.
    input_mode
        ``"average"`` (block means) or ``"unshuffle"`` (blocks as channels; see
        :class:`~.networks.UNet`).
    overlap
        Window overlap when validating (and recommended for prediction).
    augmentation
        Augmentation strengths.
    """

    patch_size: int = 128
    batch_size: int = 8
    max_iterations: int = 600
    time_limit_s: float | None = None
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    dice_weight: float = 0.5
    eval_every: int = 50
    patience: int = 4
    min_delta: float = 1e-3
    val_fraction: float = 0.2
    width: int = 8
    depth: int = 4
    norm: str = "batch"
    dropout: float = 0.0
    context: bool = True
    context_size: int = 64
    input_pool: int = 1
    input_mode: str = "average"
    overlap: float = 0.25
    augmentation: Augmentation = field(default_factory=Augmentation)

    def __post_init__(self) -> None:
        for name in ("patch_size", "batch_size", "max_iterations", "eval_every", "patience", "width",
                     "depth", "context_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        m = input_multiple(self.depth, self.input_pool, self.input_mode)
        if self.patch_size % m:
            raise InputError(f"patch_size ({self.patch_size}) must be a multiple of "
                             f"input_pool * 2**(depth - 1) = {m}")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.learning_rate <= 0:
            raise InputError(f"learning_rate must be positive, got {self.learning_rate!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SegmentationModel(nn.Module):
    """A trained network with everything needed to apply it to raw sections.

    Call it as the prediction engine does: ``model(x)`` or, with a context branch,
    ``model(x, origins)`` after ``model.prepare_section(overview, factor, shape)``. Outputs logits.
    """

    mean: torch.Tensor  # (1, C, 1, 1) buffers: raw input -> network input
    std: torch.Tensor

    def __init__(self, net: UNet, classes: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 *, patch_size: int, overlap: float = 0.25, meta: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.net = net
        self.classes = [str(c) for c in classes]
        if len(self.classes) != net.config["num_classes"]:
            raise InputError(f"{len(self.classes)} class names for a network with "
                             f"{net.config['num_classes']} outputs")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.patch_size = int(patch_size)
        self.overlap = float(overlap)
        self.meta: dict[str, Any] = dict(meta or {})
        self._canvas: torch.Tensor | None = None
        self._factor = 1
        self._values: tuple[float, ...] = ()

    @property
    def context_size(self) -> int | None:
        return int(self.net.config["context_size"]) if self.net.config["context_channels"] else None

    @property
    def needs_origins(self) -> bool:
        return self.context_size is not None

    @property
    def flips_keep_origins(self) -> bool:
        """Flip TTA may flip a window's pixels and keep its origin: the context branch encodes
        where the whole window is (one vector per window), the same for the flipped pixels."""
        return True

    @property
    def overview_size(self) -> int | None:
        return self.context_size

    def window(self, **overrides: Any) -> SlidingWindow:
        """The sliding window this model was trained for (patch-sized, its overlap)."""
        return SlidingWindow(**{"roi_size": self.patch_size, "overlap": self.overlap, **overrides})

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Map raw input with these per-channel statistics onto what the network expects (e.g. a
        new brain's own, from :func:`intensity_statistics`)."""
        self.mean.copy_(torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.std.copy_(torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def section_values(self) -> int:
        """How many scalar inputs per section the context branch takes (e.g. 1: the section's
        place along the brain's series); give them with :meth:`set_section_values`."""
        return int(self.meta.get("section_values", 0))

    def set_section_values(self, values: Sequence[float]) -> None:
        """The scalar inputs of the section predicted next (as many as :attr:`section_values`).

        Raises
        ------
        InputError
            A different number of values, or values that are not finite.
        """
        vs = tuple(float(v) for v in values)
        if len(vs) != self.section_values or not all(np.isfinite(vs)):
            raise InputError(f"this model takes {self.section_values} finite section value(s) (e.g. the "
                             f"section's place along the series), got {list(vs)}")
        self._values = vs

    def prepare_section(self, overview: np.ndarray, factor: int, shape: tuple[int, int]) -> None:
        """Receive the block-averaged section (raw values) before its windows are predicted."""
        size = self.context_size
        if size is None:
            return
        if self.section_values and len(self._values) != self.section_values:
            raise InputError(f"this model takes {self.section_values} section value(s) (e.g. the section's "
                             "place along the series): call set_section_values before predicting")
        ov = (overview - self.mean.view(-1, 1, 1).cpu().numpy()) / self.std.view(-1, 1, 1).cpu().numpy()
        canvas = overview_canvas(ov.astype(np.float32), size, self._values)
        self._canvas = torch.from_numpy(canvas).to(self.mean.device)
        self._factor = int(factor)

    def forward(self, x: torch.Tensor, origins: torch.Tensor | None = None) -> torch.Tensor:
        context = None
        if self.context_size is not None:
            if self._canvas is None or origins is None:
                raise InputError("this model has a context branch: predict through the sliding-window "
                                 "engine (it passes the section overview and the window origins)")
            window = (int(x.shape[-2]), int(x.shape[-1]))
            context = context_input(self._canvas.to(x.device), self._factor, origins, window)
            context = context.to(dtype=x.dtype, memory_format=torch.contiguous_format)
        return self.net(self.normalise(x), context)

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description (what a checkpoint stores besides the weights)."""
        return {
            **self.meta,
            "kind": self.meta.get("kind", "segmentation"),
            "classes": list(self.classes),
            "network": dict(self.net.config),
            "normalisation": {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()},
            "patch_size": self.patch_size,
            "overlap": self.overlap,
        }


class ModelEnsemble(nn.Module):
    """Several models of one class set applied as one: the mean of their scores (logits).

    Networks trained alike from different seeds err in different places; averaging their scores
    (as flip test-time augmentation averages a network's scores over flipped inputs) keeps what
    they agree on. The ensemble is a predictor like a :class:`SegmentationModel`: section values,
    the section overview and the window origins go to every member, and each member normalises
    the raw input with its own statistics.

    Raises
    ------
    InputError
        No members, or members with other classes, other section values or another context size
        (the message names the member by its position).
    """

    def __init__(self, models: Sequence[SegmentationModel]) -> None:
        super().__init__()
        members = list(models)
        if not members:
            raise InputError("a model ensemble needs at least one model")
        first = members[0]
        for i, m in enumerate(members[1:], start=2):
            for what, a, b in (("classes", m.classes, first.classes),
                               ("section values", m.section_values, first.section_values),
                               ("context size", m.context_size, first.context_size)):
                if a != b:
                    raise InputError(f"model {i} of the ensemble has {what} {a}, model 1 {b}: "
                                     "an ensemble's models must be trained alike")
        self.members = nn.ModuleList(members)  # registered: .to(), .eval() reach every member
        self._members = members  # the same modules, typed
        self.classes = list(first.classes)
        self.patch_size = first.patch_size
        self.overlap = first.overlap

    def __len__(self) -> int:
        return len(self.members)

    @property
    def context_size(self) -> int | None:
        return self._members[0].context_size

    @property
    def needs_origins(self) -> bool:
        return self._members[0].needs_origins

    @property
    def flips_keep_origins(self) -> bool:
        return True

    @property
    def overview_size(self) -> int | None:
        return self.context_size

    @property
    def section_values(self) -> int:
        return self._members[0].section_values

    def set_section_values(self, values: Sequence[float]) -> None:
        for m in self._members:
            m.set_section_values(values)

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        for m in self._members:
            m.set_normalisation(mean, std)

    def prepare_section(self, overview: np.ndarray, factor: int, shape: tuple[int, int]) -> None:
        for m in self._members:
            m.prepare_section(overview, factor, shape)

    def window(self, **overrides: Any) -> SlidingWindow:
        return self._members[0].window(**overrides)

    def forward(self, x: torch.Tensor, origins: torch.Tensor | None = None) -> torch.Tensor:
        total: torch.Tensor | None = None
        for m in self._members:
            out = m(x, origins)
            total = out if total is None else total + out
        assert total is not None
        return total / len(self.members)


# --------------------------------------------------------------------------------------------------
# checkpoints


def _versions() -> dict[str, str]:
    from ..storage import package_versions

    return package_versions("atlasbuilder", "torch", "numpy")


def save_checkpoint(model: SegmentationModel, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` atomically: ``{"format", "meta", "state_dict"}``, tensors and
    plain JSON-like values only, so it loads with ``torch.load(path, weights_only=True)``."""
    path = Path(path)
    # through JSON: only plain str/int/float/bool/None/list/dict survive (numpy scalars or
    # TorchVersion would make the file need pickled globals, which weights_only refuses)
    meta = json.loads(json.dumps({**model.metadata(), "versions": _versions()}))
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "meta": meta, "state_dict": state}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(path, "checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unsafe pickle, a truncated file, not a torch file at all
        raise InputError(f"{path}: not a checkpoint that loads safely with weights_only=True "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(f"{path}: not an atlasbuilder segmentation checkpoint (format {found!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    return ckpt


def load_checkpoint(path: str | os.PathLike[str], *, classes: Sequence[str] | None = None,
                    device: str | torch.device = "cpu") -> SegmentationModel:
    """Load a checkpoint written by :func:`save_checkpoint` (never executing pickled code).

    Parameters
    ----------
    path
        The checkpoint file.
    classes
        The class list the caller expects; a checkpoint trained for another is an error.
    device
        Where to put the model.

    Raises
    ------
    MissingFileError
        No such file.
    InputError
        Not a safe atlasbuilder checkpoint, weights that do not fit its network, a different class
        list (the message names the file and both lists), or an unavailable device.
    """
    path = Path(path)
    dev = resolve_device(device)
    ckpt = _read_checkpoint(path)
    meta = ckpt["meta"]
    if meta.get("kind") != "segmentation":
        raise InputError(f"{path}: a {meta.get('kind')!r} checkpoint has no segmentation head; fine-tune "
                         "it with train(..., init=path) first")
    if classes is not None and list(classes) != list(meta["classes"]):
        raise InputError(f"{path}: the checkpoint was trained for classes {meta['classes']}, but "
                         f"{list(classes)} are expected")
    model = _model_from(meta, ckpt["state_dict"], path)
    return model.to(dev).eval()


def _model_from(meta: Mapping[str, Any], state: Mapping[str, torch.Tensor], path: Path,
                classes: Sequence[str] | None = None, skip_head: bool = False) -> SegmentationModel:
    net_cfg = dict(meta["network"])
    if classes is not None:
        net_cfg["num_classes"] = len(classes)
    try:
        net = UNet(**net_cfg)
        if skip_head:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("head.") for k in missing):
                raise RuntimeError(f"missing {missing}, unexpected {unexpected}")
        else:
            net.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: the weights do not fit the network the checkpoint describes ({exc})") \
            from exc
    norm = meta.get("normalisation", {"mean": [0.0], "std": [1.0]})
    return SegmentationModel(net, classes if classes is not None else meta["classes"], norm["mean"],
                             norm["std"], patch_size=meta.get("patch_size", 128),
                             overlap=meta.get("overlap", 0.25),
                             meta={k: v for k, v in meta.items()
                                   if k in ("training", "history", "kind", "section_values", "prior_bias")})


# --------------------------------------------------------------------------------------------------
# training


def dice_scores(pred: np.ndarray, target: np.ndarray, n_classes: int) -> dict[int, float]:
    """Dice of each class present in ``target`` or ``pred`` (pixels with ``IGNORE`` left out)."""
    valid = target != IGNORE
    p, t = pred[valid], target[valid]
    out = {}
    for c in range(n_classes):
        pc, tc = p == c, t == c
        denom = int(pc.sum() + tc.sum())
        if denom:
            out[c] = 2 * float((pc & tc).sum()) / denom
    return out


def _adamw(params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused where this torch supports it for the parameters' device (one kernel for all
    parameters: a step of the default U-Net's optimiser on one CPU thread 2 ms instead of 9-12 ms,
    ``/tmp`` micro-benchmark, about 5 % of a training step); else the per-tensor implementation."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch: no fused kernel for this device
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _fill_uninitialized_memory(value: bool | None = None) -> bool | None:
    """Torch's ``fill_uninitialized_memory`` (``None`` where this torch has no such switch); set it
    to ``value`` if given.

    With deterministic algorithms on, torch fills every new tensor's memory (NaN) by default, so
    that an operation reading memory nobody wrote would still give the same result. Training needs
    none of that: every tensor it makes is written before it is read. Filling was about 600 calls
    and 6 % of a training step's CPU time (``torch.profiler``, default demo cohort model, one
    thread); the weights after 150 steps are bit-identical without it.
    """
    mod = getattr(torch.utils, "deterministic", None)
    old = getattr(mod, "fill_uninitialized_memory", None)
    if old is None:
        return None
    if value is not None:
        mod.fill_uninitialized_memory = value  # type: ignore[union-attr]
    return bool(old)


def _loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """Cross-entropy plus ``dice_weight`` times the soft Dice loss (1 - the mean over the classes
    present of ``(2 * sum(p_c * [t = c]) + 1) / (sum(p_c) + #[t = c] + 1)``), pixels labelled
    ``IGNORE`` left out of both.

    One log-softmax serves both terms, and on the CPU the Dice sums are taken without a one-hot
    target: the probability of each pixel's own class gathered and added up by class, the counts
    the same way. On a training batch of 8 patches of 128 px and 12 classes that is 14-17 ms
    forwards and backwards against 23 ms for ``cross_entropy`` plus a one-hot soft Dice (equal
    within float rounding: gradients 1e-11 apart, ``/tmp`` micro-benchmark on one core). On a GPU
    the own class's probability is taken with a one-hot target, as before: the backward of a
    gather there is not deterministic.
    """
    logp = torch.log_softmax(logits, 1)
    loss = F.nll_loss(logp, target, ignore_index=IGNORE)
    if not dice_weight:
        return loss
    n = logits.shape[1]
    valid = (target != IGNORE).to(logp.dtype)
    t = target.clamp_min(0)
    prob = logp.exp()
    if prob.device.type == "cpu":
        own = prob.gather(1, t[:, None])[:, 0] * valid
    else:  # gather's backward on a CUDA tensor of more than one dimension is not deterministic
        own = (prob * F.one_hot(t, n).permute(0, 3, 1, 2)).sum(1) * valid
    inter = torch.zeros(n, dtype=prob.dtype, device=prob.device).scatter_add(0, t.flatten(), own.flatten())
    count = torch.zeros(n, dtype=prob.dtype, device=prob.device).scatter_add(0, t.flatten(), valid.flatten())
    total = torch.einsum("bchw,bhw->c", prob, valid)
    dice = (2 * inter + 1) / (total + count + 1)
    present = count > 0
    if not bool(present.any()):
        return loss + logits.sum() * 0
    return loss + dice_weight * (1 - dice[present].mean())


def _split(n: int, fraction: float, rng: np.random.Generator,
           validation: Sequence[int] | None) -> tuple[list[int], list[int]]:
    if validation is not None:
        val = sorted({int(i) for i in validation})
        if any(not 0 <= i < n for i in val) or len(val) >= n:
            raise InputError(f"validation must name some, not all, of the {n} sections by index; got "
                             f"{list(validation)}")
    else:
        k = max(1, math.floor(fraction * n)) if n >= 3 and fraction > 0 else 0
        val = sorted(rng.choice(n, k, replace=False).tolist()) if k else []
    return [i for i in range(n) if i not in val], val


def _evaluate(model: SegmentationModel, sections: Sequence[TrainingSection], device: torch.device,
              batch_size: int) -> float:
    """Mean Dice over the non-background classes of the held-out sections (sliding window)."""
    from .prior import prior_predictor

    scores: dict[int, list[float]] = {}
    for sec in sections:
        if model.section_values:
            model.set_section_values(sec.values)
        predictor = prior_predictor(model, sec.bias, sec.bias_step)
        logits = predict_array(sec.image, predictor, window=model.window(batch_size=batch_size),
                               device=device)
        for c, d in dice_scores(logits.argmax(0), sec.target, len(model.classes)).items():
            if c != 0:
                scores.setdefault(c, []).append(d)
    return float(np.mean([np.mean(v) for v in scores.values()])) if scores else 0.0


def _normalisation(sections: Sequence[TrainingSection]) -> tuple[list[float], list[float]]:
    return intensity_statistics([sec.image for sec in sections])


def intensity_statistics(images: Sequence[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over every pixel of ``(C, H, W)`` images: the input
    normalisation a model trained (or fine-tuned) on these images gets."""
    c = images[0].shape[0]
    total = np.zeros(c)
    sq = np.zeros(c)
    n = 0
    for image in images:
        img = image.reshape(c, -1).astype(np.float64)
        total += img.sum(1)
        sq += (img**2).sum(1)
        n += img.shape[1]
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0))
    return mean.tolist(), np.maximum(std, 1e-6).tolist()


def train(images: Sequence[np.ndarray], annotations: Sequence[np.ndarray],
          mapping: Mapping[int, str | None], *, classes: Sequence[str] | None = None,
          names: Sequence[str] | None = None, config: TrainingConfig | None = None,
          section_values: Sequence[Sequence[float]] | None = None,
          section_bias: Sequence[tuple[np.ndarray, int] | None] | None = None,
          init: str | os.PathLike[str] | SegmentationModel | None = None, new_classes: bool = False,
          validation: Sequence[int] | None = None, seed: int = 0, device: str | torch.device = "cpu",
          progress: bool = False) -> tuple[SegmentationModel, list[dict[str, Any]]]:
    """Train a segmentation model on a brain's annotated sections.

    Parameters
    ----------
    images
        Sections, ``(H, W)`` or ``(C, H, W)`` (e.g. grey values plus prior channels), raw values.
    annotations
        One label image per section, same ``(H, W)``, raw label values.
    mapping
        Raw label value -> class name (``None``: not annotated, ignored).
    classes
        Class order (index = output channel); default: the mapping's names in order. Class 0 is the
        background (left out of the validation Dice).
    names
        Section names for messages (e.g. file names).
    config
        :class:`TrainingConfig`.
    section_values
        Per section, scalar inputs to the context branch (the same number for each; e.g. the
        section's place along the brain's series, 0 at the first section, 1 at the last). The
        model then needs them for every section it predicts
        (:meth:`SegmentationModel.set_section_values`). Needs ``config.context``.
    section_bias
        Per section, ``(grid, step)`` or None: scores added to the network's logits while it
        learns, ``grid`` ``(K, Hc, Wc)`` (one plane per class) on a grid of ``step`` pixels,
        interpolated bilinearly to each patch's pixels and turned with them (an atlas prior,
        :meth:`~.prior.AtlasPrior.section_grid`). The network then learns what the prior does
        not already say, and must predict with the same prior added
        (:func:`~.prior.prior_predictor`); the checkpoint records it (``meta["prior_bias"]``).
    init
        A checkpoint path or model to fine-tune from. Its class list must equal ``classes`` unless
        ``new_classes`` (then the output layer is new) or it is a ``"pretrained"`` checkpoint.
    validation
        Indices of the sections to hold out (default: ``config.val_fraction`` of them, seeded).
    seed
        Seed of patch sampling, augmentation, initialisation and dropout.
    device
        ``"cpu"`` or ``"cuda[:N]"``.
    progress
        Show a progress bar.

    Returns
    -------
    model : SegmentationModel
        The best model (by validation Dice; the last one without validation), in eval mode.
    history : list of dict
        One entry per validation (or per ``eval_every`` steps): ``iteration``, ``loss`` (mean since
        the previous entry), ``val_dice`` (or None), ``lr``, ``elapsed_s``.

    Raises
    ------
    InputError, InvalidImageError
        Bad sections/annotations (naming the section), a checkpoint for another class list, bad
        settings, an unavailable device.
    """
    cfg = config or TrainingConfig()
    dev = resolve_device(device)
    class_names = class_list(mapping, classes)
    sections = check_sections(images, annotations, mapping, class_names, names, section_values)
    _attach_bias(sections, section_bias, len(class_names))
    n_values = len(sections[0].values)
    if n_values and not cfg.context and init is None:
        raise InputError("section_values feed the context branch: they need config.context=True")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = _split(len(sections), cfg.val_fraction, rng, validation)
    train_secs = [sections[i] for i in train_idx]
    val_secs = [sections[i] for i in val_idx]
    mean, std = _normalisation(train_secs)
    channels = train_secs[0].image.shape[0]

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        fill = _fill_uninitialized_memory()
        torch.use_deterministic_algorithms(True, warn_only=True)
        _fill_uninitialized_memory(False)
        try:
            model = _initial_model(init, new_classes, class_names, channels, mean, std, cfg, n_values)
            history = _fit(model, train_secs, val_secs, cfg, rng, dev, seed, progress)
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            _fill_uninitialized_memory(fill)
    if any(sec.bias is not None for sec in sections):
        model.meta["prior_bias"] = True
    model.meta.update({
        "kind": "segmentation",
        "training": {"config": cfg.as_dict(), "seed": seed, "sections": [s.name for s in train_secs],
                     "validation": [s.name for s in val_secs],
                     "init": str(init) if isinstance(init, str | os.PathLike) else None},
        "history": history,
    })
    return model.eval(), history


def _attach_bias(sections: list[TrainingSection], bias: Sequence[tuple[np.ndarray, int] | None] | None,
                 n_classes: int) -> None:
    """Check each section's ``(grid, step)`` and attach it (see :func:`train`)."""
    if bias is None:
        return
    if len(bias) != len(sections):
        raise InputError(f"got {len(sections)} sections and {len(bias)} bias grids; they must pair up "
                         "one to one (None for a section without)")
    for sec, item in zip(sections, bias, strict=True):
        if item is None:
            continue
        grid, step = np.asarray(item[0], np.float32), int(item[1])
        if grid.ndim != 3 or grid.shape[0] != n_classes or min(grid.shape) < 1:
            raise InputError(f"{sec.name}: the bias grid has shape {grid.shape}; expected ({n_classes}, "
                             "rows, columns), one plane per class")
        if step < 1 or not np.all(np.isfinite(grid)):
            raise InputError(f"{sec.name}: the bias grid needs a step >= 1 and finite values (step {step})")
        sec.bias, sec.bias_step = grid, step


def _initial_model(init: str | os.PathLike[str] | SegmentationModel | None, new_classes: bool,
                   classes: list[str], channels: int, mean: list[float], std: list[float],
                   cfg: TrainingConfig, n_values: int = 0) -> SegmentationModel:
    if init is None:
        net = UNet(channels, len(classes), depth=cfg.depth, width=cfg.width, norm=cfg.norm,
                   dropout=cfg.dropout, context_channels=channels + n_values + 2 if cfg.context else 0,
                   context_size=cfg.context_size, input_pool=cfg.input_pool,
                   input_mode=cfg.input_mode)
        return SegmentationModel(net, classes, mean, std, patch_size=cfg.patch_size, overlap=cfg.overlap,
                                 meta={"section_values": n_values} if n_values else None)
    if isinstance(init, SegmentationModel):
        meta, state, where = init.metadata(), init.net.state_dict(), Path("<model>")
    else:
        where = Path(init)
        ckpt = _read_checkpoint(where)
        meta, state = ckpt["meta"], ckpt["state_dict"]
    if meta["network"]["in_channels"] != channels:
        raise InputError(f"{where}: the checkpoint's network takes {meta['network']['in_channels']} "
                         f"input channels, the sections have {channels}")
    same = list(meta.get("classes", [])) == classes
    if not same and not new_classes and meta.get("kind") != "pretrained":
        raise InputError(f"{where}: the checkpoint was trained for classes {meta.get('classes')}, not "
                         f"{classes}; pass new_classes=True to fine-tune with a new output layer")
    if int(meta.get("section_values", 0)) != n_values:
        raise InputError(f"{where}: the checkpoint's network takes {int(meta.get('section_values', 0))} "
                         f"section value(s) per section (e.g. the place along the series), the training "
                         f"sections have {n_values}")
    model = _model_from(meta, state, where, classes=classes, skip_head=not same)
    # the new brain's own intensity statistics map it onto what the network has learnt to expect
    model.set_normalisation(mean, std)
    model.patch_size = cfg.patch_size
    if model.patch_size % model.net.multiple:
        raise InputError(f"patch_size {cfg.patch_size} is not a multiple of {model.net.multiple}, which "
                         f"the checkpoint's network needs")
    return model


def _fit(model: SegmentationModel, train_secs: list[TrainingSection], val_secs: list[TrainingSection],
         cfg: TrainingConfig, rng: np.random.Generator, dev: torch.device, seed: int,
         progress: bool) -> list[dict[str, Any]]:
    model.to(dev)
    sampler = PatchSampler(train_secs, cfg.patch_size, rng)
    gen = torch.Generator().manual_seed(seed)
    ctx_size = model.context_size
    canvases: list[torch.Tensor] = []
    factors: list[int] = []
    widths: list[int] = []  # the overview's width in its canvas (what a mirror flips)
    if ctx_size is not None:
        for sec in train_secs:
            f = overview_factor(sec.image.shape[1:], ctx_size)
            widths.append(min(ctx_size, -(-sec.image.shape[-1] // f)))
            ov = (block_mean(sec.image, f) - np.asarray(model.mean.cpu()).reshape(-1, 1, 1)) \
                / np.asarray(model.std.cpu()).reshape(-1, 1, 1)
            canvases.append(torch.from_numpy(overview_canvas(ov.astype(np.float32), ctx_size, sec.values)))
            factors.append(f)
    # an atlas prior added to the logits while learning: turned with the patch's pixels (as extra
    # channels through the augmentation, which changes only the grey channels' intensities)
    biases = [None if sec.bias is None else torch.from_numpy(sec.bias) for sec in train_secs]
    use_bias = any(b is not None for b in biases)
    channels = train_secs[0].image.shape[0]
    aug = cfg.augmentation
    if use_bias:
        aug = replace(aug, intensity_channels=min(aug.intensity_channels or channels, channels))
    # a mirror swaps left and right classes; without such a pair nothing says what a mirrored
    # section's areas are (an area may lie on one side only), so there is no mirror
    swap = hemisphere_swap(model.classes)
    aug = replace(aug, mirror=aug.mirror and swap != list(range(len(swap))))
    opt = _adamw(model.parameters(), cfg.learning_rate, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=cfg.max_iterations,
                                                pct_start=0.15)
    history: list[dict[str, Any]] = []
    best, best_state, stale = -1.0, None, 0
    losses: list[float] = []
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_iterations, unit="it", desc="train")
    try:
        for it in range(1, cfg.max_iterations + 1):
            model.train()
            imgs, tgts, which, origins = sampler.sample(cfg.batch_size)
            x = model.normalise(torch.from_numpy(imgs).to(dev))
            y = torch.from_numpy(tgts).to(dev)
            ctx = None
            if ctx_size is not None:
                ctx = torch.cat([context_input(canvases[s], factors[s], torch.from_numpy(o[None]),
                                               (cfg.patch_size, cfg.patch_size))
                                 for s, o in zip(which, origins, strict=True)])
            bias = None
            if use_bias:
                p = cfg.patch_size
                planes = [torch.zeros(len(model.classes), p, p) if biases[s] is None else
                          grid_window(biases[s], train_secs[s].bias_step, int(o[0]), int(o[1]), p, p)
                          for s, o in zip(which, origins, strict=True)]
                x = torch.cat([x.cpu(), torch.stack(planes)], 1)
            if aug.mirror:
                flip = torch.rand(len(which), generator=gen) < 0.5
                x, y, ctx = mirror(x.cpu(), y.cpu(), ctx, flip, swap,
                                   widths=[widths[s] for s in which] if widths else (),
                                   bias_channels=len(model.classes) if use_bias else 0)
            x, y, ctx = augment(x.cpu(), y.cpu(), ctx, aug, gen)
            if use_bias:
                x, bias = x[:, :channels], x[:, channels:].to(dev)
            x, y = x.to(dev), y.to(dev)
            logits = model.net(x, ctx.to(dev) if ctx is not None else None)
            if bias is not None:
                logits = logits + bias
            loss = _loss(logits, y, cfg.dice_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
            out_of_time = cfg.time_limit_s is not None and time.perf_counter() - start > cfg.time_limit_s
            if it % cfg.eval_every and it != cfg.max_iterations and not out_of_time:
                continue
            dice = _evaluate(model, val_secs, dev, cfg.batch_size) if val_secs else None
            entry = {"iteration": it, "loss": float(np.mean(losses)), "val_dice": dice,
                     "lr": float(sched.get_last_lr()[0]), "elapsed_s": time.perf_counter() - start}
            history.append(entry)
            losses = []
            if bar is not None:
                bar.set_postfix(loss=f"{entry['loss']:.3f}", dice="-" if dice is None else f"{dice:.3f}")
            if dice is not None:
                if dice > best + cfg.min_delta:
                    best, stale = dice, 0
                    best_state = copy.deepcopy(model.net.state_dict())
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
            if out_of_time:
                break
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None:
        model.net.load_state_dict(best_state)
    return history
