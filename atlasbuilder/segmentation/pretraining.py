"""Self-supervised pretraining: learn section texture from unannotated sections.

The pretext task is masked inpainting: random square blocks of each (augmented) patch are blanked
and the U-Net, with a regression head, reconstructs them; the loss counts the blanked pixels only.
Nothing needs annotating, so every section of every brain can be used. The result is a checkpoint of
kind ``"pretrained"``: :func:`~.training.train` fine-tunes it (``init=path``) with a new output
layer for the brain's classes; :func:`~.training.load_checkpoint` refuses it for prediction.

Example
-------
>>> model, history = pretrain(sections, config=PretrainingConfig(max_iterations=300))  # doctest: +SKIP
>>> save_checkpoint(model, "pretrained.pt")                                          # doctest: +SKIP
>>> tuned, _ = train(images, annotations, mapping, init="pretrained.pt")             # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .data import (
    Augmentation,
    PatchSampler,
    augment,
    block_mean,
    check_sections,
    context_input,
    overview_canvas,
    overview_factor,
)
from .networks import UNet, input_multiple
from .prediction import resolve_device
from .training import SegmentationModel, _adamw, _normalisation

__all__ = ["PretrainingConfig", "pretrain"]


@dataclass(frozen=True)
class PretrainingConfig:
    """How to pretrain; the network fields (``width``, ``depth``, ``norm``, ``context``,
    ``input_pool``, ``input_mode``: see :class:`~.networks.UNet`) are kept in the checkpoint and
    fine-tuning keeps them, so set them as the fine-tuned model should have them (the
    segmentation stage's defaults: width 32, ``input_pool=4``, ``input_mode="unshuffle"``).
    ``mask_fraction`` of the ``block_size`` px blocks of a patch are blanked."""

    patch_size: int = 128
    batch_size: int = 8
    max_iterations: int = 600
    time_limit_s: float | None = None
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    mask_fraction: float = 0.3
    block_size: int = 16
    width: int = 8
    depth: int = 4
    norm: str = "batch"
    context: bool = True
    context_size: int = 64
    input_pool: int = 1
    input_mode: str = "average"
    overlap: float = 0.25
    augmentation: Augmentation = field(default_factory=Augmentation)

    def __post_init__(self) -> None:
        if not 0 < self.mask_fraction < 1:
            raise InputError(f"mask_fraction must be in (0, 1), got {self.mask_fraction!r}")
        multiple = input_multiple(self.depth, self.input_pool, self.input_mode)
        if self.block_size < 1 or self.patch_size % multiple:
            raise InputError(f"block_size must be positive and patch_size ({self.patch_size}) a multiple "
                             f"of input_pool * 2**(depth - 1) = {multiple}")


def _block_mask(b: int, size: int, block: int, fraction: float, g: torch.Generator) -> torch.Tensor:
    n = -(-size // block)
    coarse = (torch.rand(b, 1, n, n, generator=g) < fraction).float()
    return F.interpolate(coarse, scale_factor=block, mode="nearest")[..., :size, :size]


def pretrain(images: Sequence[np.ndarray], *, names: Sequence[str] | None = None,
             config: PretrainingConfig | None = None, seed: int = 0, device: str | torch.device = "cpu",
             progress: bool = False) -> tuple[SegmentationModel, list[dict[str, Any]]]:
    """Pretrain a U-Net (with the context branch if configured) by masked inpainting.

    Parameters
    ----------
    images
        Unannotated sections, ``(H, W)`` or ``(C, H, W)``, raw values.
    names, seed, device, progress
        As for :func:`~.training.train`.
    config
        :class:`PretrainingConfig`.

    Returns
    -------
    model : SegmentationModel
        Kind ``"pretrained"`` (one output per input channel); save it with
        :func:`~.training.save_checkpoint` and fine-tune it with ``train(..., init=path)``.
    history : list of dict
        ``iteration``, ``loss`` (mean masked MSE since the previous entry), ``elapsed_s``.

    Raises
    ------
    InputError, InvalidImageError
        Bad sections (naming them), bad settings, an unavailable device.
    """
    cfg = config or PretrainingConfig()
    dev = resolve_device(device)
    blank = [np.zeros(np.shape(im)[-2:], np.int64) for im in images]
    sections = check_sections(images, blank, {0: "tissue"}, ["tissue"], names)
    mean, std = _normalisation(sections)
    c = sections[0].image.shape[0]
    rng = np.random.default_rng(seed)
    history: list[dict[str, Any]] = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        net = UNet(c, c, depth=cfg.depth, width=cfg.width, norm=cfg.norm,
                   context_channels=c + 2 if cfg.context else 0, context_size=cfg.context_size,
                   input_pool=cfg.input_pool, input_mode=cfg.input_mode)
        model = SegmentationModel(net, [f"channel {i}" for i in range(c)], mean, std,
                                  patch_size=cfg.patch_size, overlap=cfg.overlap,
                                  meta={"kind": "pretrained"}).to(dev)
        sampler = PatchSampler(sections, cfg.patch_size, rng)
        g = torch.Generator().manual_seed(seed)
        canvases, factors = [], []
        if cfg.context:
            for sec in sections:
                f = overview_factor(sec.image.shape[1:], cfg.context_size)
                ov = (block_mean(sec.image, f) - np.reshape(mean, (-1, 1, 1))) / np.reshape(std, (-1, 1, 1))
                canvases.append(torch.from_numpy(overview_canvas(ov.astype(np.float32), cfg.context_size)))
                factors.append(f)
        opt = _adamw(model.parameters(), cfg.learning_rate, cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate,
                                                    total_steps=cfg.max_iterations, pct_start=0.15)
        start, losses = time.perf_counter(), []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_iterations, unit="it", desc="pretrain")
        try:
            for it in range(1, cfg.max_iterations + 1):
                model.train()
                imgs, tgts, which, origins = sampler.sample(cfg.batch_size)
                x = model.normalise(torch.from_numpy(imgs).to(dev)).cpu()
                ctx = None
                if cfg.context:
                    ctx = torch.cat([context_input(canvases[s], factors[s], torch.from_numpy(o[None]),
                                                   (cfg.patch_size, cfg.patch_size))
                                     for s, o in zip(which, origins, strict=True)])
                x, _, ctx = augment(x, torch.from_numpy(tgts), ctx, cfg.augmentation, g)
                mask = _block_mask(x.shape[0], cfg.patch_size, cfg.block_size, cfg.mask_fraction, g)
                x, mask = x.to(dev), mask.to(dev)
                out = model.net(x * (1 - mask), ctx.to(dev) if ctx is not None else None)
                loss = (((out - x) ** 2) * mask).sum() / (mask.sum() * c).clamp_min(1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                out_of_time = cfg.time_limit_s is not None and time.perf_counter() - start > cfg.time_limit_s
                if it % 50 == 0 or it == cfg.max_iterations or out_of_time:
                    history.append({"iteration": it, "loss": float(np.mean(losses)),
                                    "elapsed_s": time.perf_counter() - start})
                    losses = []
                    if out_of_time:
                        break
        finally:
            if bar is not None:
                bar.close()
    model.meta.update({"training": {"pretraining": asdict(cfg), "seed": seed,
                                    "sections": [s.name for s in sections]},
                       "history": history})
    return model.eval(), history
