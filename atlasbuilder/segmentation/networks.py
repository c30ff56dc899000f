"""Networks: a compact 2-D U-Net with optional prior channels and a coarse context branch.

The U-Net maps ``(B, in_channels, h, w)`` to per-class logits ``(B, num_classes, h, w)`` for any
``h, w`` (inputs are reflect-padded to a multiple of ``2 ** (depth - 1)`` inside and cropped back).
Extra input channels (e.g. an atlas prior: one probability map per class, registered to the section)
are simply more ``in_channels``.

The optional *context branch* answers "where in the section is this window?", which texture alone
cannot: area identity depends on position. It encodes a small, whole-section overview (the section
block-averaged to ``context_size`` pixels, plus one channel marking the window's footprint) into
``context_features`` numbers by a few strided convolutions and a linear layer, and concatenates them,
broadcast, to the bottleneck. It costs almost nothing next to the U-Net.

Example
-------
>>> import torch
>>> net = UNet(in_channels=1, num_classes=5, depth=3, width=8)
>>> net(torch.zeros(2, 1, 37, 50)).shape
torch.Size([2, 5, 37, 50])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .shapes import INPUT_MODES, input_multiple

__all__ = ["INPUT_MODES", "NORMS", "ContextEncoder", "UNet", "input_multiple", "resize", "resize_matrix"]

NORMS = ("batch", "instance", "group", "none")

RESIZE_MATRIX_MAX = 256
"""The largest output side :func:`resize` resizes by matrix products (above: ``interpolate``)."""

_MATRICES: dict[tuple[int, int, str, bool, torch.dtype, torch.device], torch.Tensor] = {}


def resize_matrix(n_in: int, n_out: int, mode: str = "bilinear", align_corners: bool = False, *,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n_out, n_in)``: the weights by which :func:`torch.nn.functional.interpolate` (``mode``
    ``"bilinear"`` or ``"bicubic"``) resizes one axis from ``n_in`` to ``n_out`` samples, so that
    ``M_h @ x @ M_w.T`` resizes ``x`` ``(..., n_in_h, n_in_w)`` as ``interpolate(x, size)`` does (both
    modes are separable). Read off ``interpolate`` itself (its response to each unit sample along
    the axis, the other axis kept at its size, which it leaves as it is), so the weights are torch's
    own; cached."""
    dev = torch.device(device)
    key = (int(n_in), int(n_out), mode, bool(align_corners), dtype, dev)
    m = _MATRICES.get(key)
    if m is None:
        eye = torch.eye(int(n_in), dtype=torch.float64)[None, None]
        m = F.interpolate(eye, size=(int(n_out), int(n_in)), mode=mode, align_corners=align_corners)[0, 0]
        m = _MATRICES[key] = m.to(dtype=dtype, device=dev)
    return m


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size, mode: str = "bilinear",
           align_corners: bool = False) -> torch.Tensor:
    """``interpolate(x, size, mode=mode, align_corners=align_corners)`` for ``x`` ``(B, C, h, w)``.

    While a network learns on the CPU (``x`` needs a gradient) and ``size`` is at most
    :data:`RESIZE_MATRIX_MAX` on both axes: two matrix products with :func:`resize_matrix`, equal to
    ``interpolate`` within float rounding (5e-7 on unit-scale values). Torch's own bilinear kernel is
    slow backwards on the CPU: the U-Net's forward and backward on a training batch of 8 patches of
    128 px took 45.3 instead of 51.0 ms with 16 feature maps and 104.8 instead of 107.4 ms with 32,
    one core (``/tmp`` micro-benchmark, two runs each). Otherwise ``interpolate`` itself: forwards
    alone the products gain nothing, and their cost grows with the square of the size.
    """
    h, w = int(size[0]), int(size[1])
    if (x.device.type != "cpu" or x.dim() != 4 or not x.requires_grad
            or max(h, w) > RESIZE_MATRIX_MAX):
        return F.interpolate(x, size=(h, w), mode=mode, align_corners=align_corners)
    mh = resize_matrix(x.shape[-2], h, mode, align_corners, dtype=x.dtype, device=x.device)
    mw = resize_matrix(x.shape[-1], w, mode, align_corners, dtype=x.dtype, device=x.device)
    return mh @ x @ mw.T


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


class _ConvBlock(nn.Sequential):
    """(conv 3x3 -> norm -> ReLU) x 2, dropout between."""

    def __init__(self, cin: int, cout: int, norm: str, dropout: float) -> None:
        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=bias), _norm(norm, cout),
                                   nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers += [nn.Conv2d(cout, cout, 3, padding=1, bias=bias), _norm(norm, cout), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class ContextEncoder(nn.Module):
    """``(B, channels, size, size)`` overview (+ window mask) -> ``(B, features)``."""

    def __init__(self, channels: int, size: int, features: int = 32, width: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, n = channels, size
        while n > 4:
            cout = min(width * 2 ** (len(layers) // 2), 64)
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            cin, n = cout, (n + 1) // 2
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * n * n, features)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(torch.flatten(self.conv(x), 1)))


class UNet(nn.Module):
    """Compact 2-D U-Net producing per-class logits.

    Parameters
    ----------
    in_channels
        Image channels plus any prior channels.
    num_classes
        Output classes (background, each area, other cortex/tissue).
    depth
        Resolution levels (``depth - 1`` poolings).
    width
        Feature maps at full resolution, doubled at each level.
    norm
        ``"batch"``, ``"instance"``, ``"group"`` or ``"none"``.
    dropout
        Channel dropout inside each block (0 = off).
    context_channels
        Channels of the context overview including its window-mask channel (0 = no context
        branch).
    context_size
        Edge of the (square) context overview in pixels.
    context_features
        Numbers the context is encoded into.
    input_pool
        Average the input over ``input_pool`` x ``input_pool`` blocks first and upsample the logits
        back (bilinear): the network works at a coarser resolution, ``input_pool**2`` times cheaper,
        while its inputs and outputs keep the section's pixels. Area boundaries are smooth at the
        scale of a few pixels, so 2 costs little accuracy on 0.2 mm sections.
    input_mode
        How the input is brought to the coarser resolution: ``"average"`` (block means: fine
        texture within a block is lost) or ``"unshuffle"`` (each ``input_pool`` x ``input_pool``
        block becomes ``input_pool**2`` channels, :func:`torch.nn.functional.pixel_unshuffle`: the
        first convolution sees every pixel, so texture finer than a block, such as cortical layers
        a few pixels thick, survives at almost the same cost).

    Raises
    ------
    InputError
        Invalid sizes or an unknown ``norm``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, *, depth: int = 4, width: int = 16,
                 norm: str = "batch", dropout: float = 0.0, context_channels: int = 0,
                 context_size: int = 64, context_features: int = 32, input_pool: int = 1,
                 input_mode: str = "average") -> None:
        super().__init__()
        if norm not in NORMS:
            raise InputError(f"norm must be one of {NORMS}, got {norm!r}")
        for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 1),
                                 ("depth", depth, 1), ("width", width, 1),
                                 ("context_channels", context_channels, 0), ("input_pool", input_pool, 1)):
            if int(value) < low:
                raise InputError(f"{name} must be at least {low}, got {value!r}")
        if not 0 <= dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {dropout!r}")
        input_multiple(depth, input_pool, input_mode)
        self.config: dict[str, Any] = {
            "in_channels": in_channels, "num_classes": num_classes, "depth": depth, "width": width,
            "norm": norm, "dropout": dropout, "context_channels": context_channels,
            "context_size": context_size, "context_features": context_features,
            "input_pool": int(input_pool), "input_mode": input_mode,
        }
        chans = [width * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        unshuffle = input_mode == "unshuffle" and int(input_pool) > 1
        cin = in_channels * int(input_pool) ** 2 if unshuffle else in_channels
        for c in chans:
            self.down.append(_ConvBlock(cin, c, norm, dropout))
            cin = c
        self.context = None
        if context_channels:
            self.context = ContextEncoder(context_channels, context_size, context_features)
            self.fuse = nn.Sequential(nn.Conv2d(chans[-1] + context_features, chans[-1], 1),
                                      nn.ReLU(inplace=True))
        self.up = nn.ModuleList()
        self.reduce = nn.ModuleList()
        for c_hi, c_lo in zip(chans[:-1][::-1], chans[1:][::-1], strict=True):
            self.reduce.append(nn.Conv2d(c_lo, c_hi, 1))
            self.up.append(_ConvBlock(2 * c_hi, c_hi, norm, dropout))
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        self.pool = int(input_pool)
        self.unshuffle = unshuffle
        self.multiple = 2 ** (depth - 1) * self.pool

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``x``; ``context`` ``(B, context_channels, s, s)`` if the branch exists."""
        h, w = x.shape[-2:]
        m = self.multiple
        ph, pw = -h % m, -w % m
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        if self.unshuffle:
            x = F.pixel_unshuffle(x, self.pool)
        elif self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        if self.context is not None:
            if context is None:
                raise InputError("this network has a context branch: pass the context overview")
            z = self.context(context)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
            x = self.fuse(torch.cat([x, z], 1))
        for reduce, block, skip in zip(self.reduce, self.up, skips[:-1][::-1], strict=True):
            x = resize(reduce(x), skip.shape[-2:])
            x = block(torch.cat([x, skip], 1))
        out = self.head(x)
        if self.pool > 1:
            out = resize(out, (out.shape[-2] * self.pool, out.shape[-1] * self.pool))
        return out[..., :h, :w] if (ph or pw) else out
