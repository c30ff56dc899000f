"""Atlas prior: how probable each area is at a section's pixels, from an existing atlas.

A lab that maps areas in a new brain already has maps of them from earlier brains (the previous
release of its atlas, or the published Julich-Brain maps). Where a section's pixel lies in the
atlas's space, the atlas says how often each area was found there. :class:`AtlasPrior` computes
that for every section of one brain and :func:`prior_predictor` adds it to the network's scores:

    score_k(pixel) = logit_k(pixel) + weight * log(prior_k(pixel) + floor)

(Bayes' rule with the network's posterior tempered by ``weight``). The same sum is what the
network learns with (``train(section_bias=...)`` takes :meth:`AtlasPrior.section_grid`), so that it
learns what the atlas does not already say; a network that learnt so must predict with the same
prior and weight. The prior of the background class is what the atlas leaves over:
``1 - sum of the areas' probabilities``, clipped to [0, 1] (other areas of the atlas count as
background, as they do in the annotations).

Where a pixel is: section pixel -> the brain's own space by the section's placement (the in-plane
alignment of :func:`atlasbuilder.reconstruction.reconstruct` to the brain's blockface/MRI) ->
the atlas's space through the brain's registration and the template transforms
(:class:`atlasbuilder.registration.TransformGraph`). The prior is computed on a grid of
``step_mm`` (nearest atlas voxel), smoothed by one grid step and interpolated bilinearly to the
pixels, so even a section far larger than memory costs one point lookup per grid step squared
(a 10 x 15 cm section at 1 mm: 15,000 points).

Rules, documented for users:

* a class the atlas does not map (an area mapped for the first time) gets the background's prior,
  so the atlas neither favours nor penalises it against background (a warning names it);
* a point outside the atlas's volume has no area there (background prior 1);
* a section without a placement (no tissue, lost) gets no prior (bias 0).

Example
-------
>>> prior = AtlasPrior("julich-atlas", classes, placements, graph, "subject:B01")   # doctest: +SKIP
>>> predictor = prior_predictor(model, prior.section_grid(12), prior.step_px)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    import torch

    from ..registration import TransformGraph

__all__ = ["PRIOR_FLOOR", "AtlasPrior", "prior_predictor"]

logger = logging.getLogger(__name__)

#: Points of several sections mapped through the transforms in one lookup, at most this many
#: (a 10 x 15 cm section at 1 mm has 15,000).
_BATCH_POINTS = 2_000_000

#: Added to the prior before its logarithm: a pixel where the atlas never saw an area can still be
#: called that area when the network is sure enough (about 7 * weight nats of evidence).
PRIOR_FLOOR = 1e-3
BACKGROUND = "background"


class AtlasPrior:
    """One brain's atlas prior, section by section.

    Parameters
    ----------
    atlas_dir
        An atlas directory (built or imported by atlasbuilder).
    classes
        The segmentation classes (``"background"`` first, then area keys).
    placements
        Section number -> its :class:`atlasbuilder.reconstruction.SectionPlacement` (``matrix``:
        ``[x, z] = matrix @ [row, col, 1]`` maps a stored section pixel to the brain's own space
        (mm) in the plane ``y = y_mm``; None for a section without placement; ``shape``).
    graph
        Transforms linking ``subject_space`` to one of the atlas's spaces.
    subject_space
        The brain's space name (``"subject:<id>"``).
    pixel_mm
        Section pixel size (mm): sets the grid step in pixels.
    weight
        Exponent of the prior (0 turns it off).
    step_mm
        Grid step of the prior.

    Raises
    ------
    InputError
        The atlas is incomplete, none of its spaces is reachable from ``subject_space``, or it maps
        none of the classes.
    """

    def __init__(self, atlas_dir: str | Path, classes: Sequence[str],
                 placements: Mapping[int, Any], graph: TransformGraph,
                 subject_space: str, *, pixel_mm: float, weight: float = 1.0,
                 step_mm: float = 1.0) -> None:
        from ..atlas import load_atlas
        from ..registration import NoTransformPathError

        if not (math.isfinite(weight) and weight >= 0):
            raise InputError(f"prior weight must be a number >= 0, got {weight!r}")
        self.classes = [str(c) for c in classes]
        if not self.classes or self.classes[0] != BACKGROUND:
            raise InputError(f"the classes of an atlas prior start with {BACKGROUND!r}, got {self.classes}")
        self.atlas = load_atlas(atlas_dir)
        self.placements = dict(placements)
        self.weight = float(weight)
        self.step_px = max(1, round(step_mm / pixel_mm))
        self.pixel_mm = float(pixel_mm)
        self.space = ""
        errors = []
        for space in self.atlas.spaces:
            try:
                graph.path(subject_space, space)
            except NoTransformPathError as exc:
                errors.append(str(exc))
                continue
            self.space = space
            break
        if not self.space:
            raise InputError(f"prior atlas {atlas_dir}: none of its spaces ({', '.join(self.atlas.spaces)}) "
                             f"can be reached from {subject_space}: {errors[0] if errors else ''}")
        self.graph = graph
        self.subject_space = subject_space
        keys = [r.key for r in self.atlas.map_regions(self.space)]
        self.columns = {c: keys.index(c) for c in self.classes if c != BACKGROUND and c in keys}
        missing = [c for c in self.classes if c != BACKGROUND and c not in self.columns]
        if not self.columns:
            raise InputError(f"prior atlas {atlas_dir} maps none of the areas {self.classes[1:]}")
        if missing:
            logger.warning("prior atlas %s does not map %s: they get the background's prior",
                           atlas_dir, ", ".join(missing))
        self.missing = missing
        self.atlas_dir = Path(atlas_dir)

    @classmethod
    def from_directories(cls, atlas_dir: str | Path, classes: Sequence[str], placement_dir: str | Path,
                         transform_dirs: Sequence[str | Path], subject_space: str, *,
                         pixel_mm: float, weight: float = 1.0, step_mm: float = 1.0) -> AtlasPrior:
        """The prior of a brain whose sections were placed by
        :func:`~atlasbuilder.reconstruction.reconstruct` into ``placement_dir`` and whose
        transforms (the brain's registration, template pairs) lie under ``transform_dirs``."""
        from ..reconstruction import load_reconstruction
        from ..registration import TransformGraph

        rec = load_reconstruction(placement_dir)
        graph = TransformGraph.from_directories(transform_dirs)
        return cls(atlas_dir, classes, rec.sections, graph, subject_space, pixel_mm=pixel_mm,
                   weight=weight, step_mm=step_mm)

    @property
    def key(self) -> str:
        """What the prior is made of: the atlas, the placements and the transforms' files."""
        from ..execution import content_key
        from ..storage import sha256_file

        chain = self.graph.path(self.subject_space, self.space)
        return content_key(
            sha256_file(self.atlas_dir / "atlas.json"), self.space, self.weight, self.step_px,
            {str(n): [None if p.matrix is None else np.asarray(p.matrix).round(6).tolist(), p.y_mm]
             for n, p in sorted(self.placements.items())},
            [[(Path(f).name, Path(f).stat().st_size, inv) for f, inv in t.inverse_files] for t in chain])

    def describe(self) -> dict[str, Any]:
        """For ``segmentation.json``."""
        return {"atlas": str(self.atlas_dir), "space": self.space, "weight": self.weight,
                "floor": PRIOR_FLOOR, "step_px": self.step_px, "not_in_atlas": list(self.missing)}

    def probabilities(self, points_mm: np.ndarray) -> np.ndarray:
        """``(K, n)`` class probabilities at ``(n, 3)`` points of the brain's own space."""
        pts = self.graph.map_points(np.asarray(points_mm, np.float64), self.subject_space, self.space)
        p = np.asarray(self.atlas.probabilities_at(pts, self.space).values)
        out = np.zeros((len(self.classes), len(pts)), np.float64)
        for k, c in enumerate(self.classes):
            if c in self.columns:
                out[k] = p[:, self.columns[c]]
        out = np.nan_to_num(out, nan=0.0)  # outside the atlas's volume: no area there
        areas = out.sum(0)
        out[0] = np.clip(1.0 - areas, 0.0, 1.0)
        for c in self.missing:
            out[self.classes.index(c)] = out[0]
        return np.clip(out, 0.0, 1.0)

    def section_grid(self, number: int) -> np.ndarray | None:
        """``weight * log(prior + floor)`` on the section's grid of ``step_px`` pixels.

        Grid point ``(i, j)`` lies at pixel ``(i * step + (step - 1) / 2, j * step + ...)`` of the
        ``(H, W)`` section (its placement's ``shape``); ``(K, ceil(H / step), ceil(W / step))``
        float32, None without a placement.
        """
        return self.section_grids([number])[int(number)]

    def section_grids(self, numbers: Sequence[int]) -> dict[int, np.ndarray | None]:
        """:meth:`section_grid` of each section, the same values, but the points of many sections
        go through the transforms together (each lookup reads the transform files again: one per
        section cost a brain of 35 sections 4.5 s, one for all about 0.5 s)."""
        from scipy import ndimage

        out: dict[int, np.ndarray | None] = {int(n): None for n in numbers}  # in the order asked
        todo: list[tuple[int, tuple[int, int], np.ndarray]] = []
        s = self.step_px
        for number in out:
            place = self.placements.get(number)
            if place is None or place.matrix is None or self.weight == 0:
                continue
            h, w = (int(v) for v in place.shape)
            rows = np.arange(-(-h // s)) * s + (s - 1) / 2
            cols = np.arange(-(-w // s)) * s + (s - 1) / 2
            rr, cc = np.meshgrid(rows, cols, indexing="ij")
            xz = np.asarray(place.matrix, np.float64) @ np.stack([rr.ravel(), cc.ravel(), np.ones(rr.size)])
            pts = np.stack([xz[0], np.full(rr.size, float(place.y_mm)), xz[1]], 1)
            todo.append((number, rr.shape, pts))
        start = 0
        while start < len(todo):  # batches of about _BATCH_POINTS points (memory stays bounded)
            stop, n_pts = start, 0
            while stop < len(todo) and (stop == start or n_pts + len(todo[stop][2]) <= _BATCH_POINTS):
                n_pts += len(todo[stop][2])
                stop += 1
            batch = todo[start:stop]
            p_all = self.probabilities(np.concatenate([t[2] for t in batch]))
            at = 0
            for number, shape, pts in batch:
                p = p_all[:, at:at + len(pts)].reshape(len(self.classes), *shape)
                at += len(pts)
                # the atlas is read at its nearest voxel: smooth by one grid step so that no voxel
                # edge shows in the section's labels
                p = np.stack([ndimage.gaussian_filter(q, 1.0, mode="nearest") for q in p])
                out[number] = (self.weight * np.log(p + PRIOR_FLOOR)).astype(np.float32)
            start = stop
        return out

    def section_bias(self, numbers: Sequence[int]) -> list[tuple[np.ndarray, int] | None]:
        """``(section_grid, step_px)`` of each section (None without a placement): what
        :func:`~.training.train` takes as ``section_bias`` to learn with the prior."""
        grids = self.section_grids(numbers)
        out: list[tuple[np.ndarray, int] | None] = []
        for n in numbers:
            g = grids[int(n)]
            out.append(None if g is None else (g, self.step_px))
        return out


def prior_predictor(predictor: Any, grid: np.ndarray | None, step: int) -> Any:
    """Wrap a predictor so that the section's prior ``grid`` (from :meth:`AtlasPrior.section_grid`)
    is added to its scores (the prediction engine's ``window_bias``); ``grid`` None: unchanged."""
    if grid is None:
        return predictor
    import torch

    from .data import grid_window

    class PriorPredictor(torch.nn.Module):
        """The wrapped predictor's scores plus the atlas prior at the window's pixels."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = predictor
            self.classes = getattr(predictor, "classes", None)
            self.needs_origins = bool(getattr(predictor, "needs_origins", False))
            self.flips_keep_origins = bool(getattr(predictor, "flips_keep_origins", False))
            self.overview_size = getattr(predictor, "overview_size", None)
            self.grid = torch.from_numpy(np.ascontiguousarray(grid))
            self.step = int(step)

        def prepare_section(self, overview: np.ndarray, factor: int, shape: tuple[int, int]) -> None:
            self.inner.prepare_section(overview, factor, shape)

        def forward(self, x: torch.Tensor, origins: torch.Tensor | None = None) -> torch.Tensor:
            return self.inner(x, origins) if self.needs_origins else self.inner(x)

        def window_bias(self, origins: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            g = self.grid.to(origins.device)
            if self.classes is not None and g.shape[0] != len(self.classes):
                raise InputError(f"the prior has {g.shape[0]} classes, the model {len(self.classes)}")
            h, w = size
            return torch.stack([grid_window(g, self.step, int(o[0]), int(o[1]), h, w)
                                for o in origins.cpu()])

    return PriorPredictor()
