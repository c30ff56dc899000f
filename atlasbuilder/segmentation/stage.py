"""The segmentation stage: train on a manifest's annotated sections, map areas in every section.

Protocols (``StageSettings.protocol``):

- ``"transfer"``: a *cohort model* is trained once on the annotated sections of all the manifest's
  brains (:func:`train_cohort_model`) and maps every brain's sections (:func:`segment_subject`
  with ``init_checkpoint``). It can first be fine-tuned on each brain's own annotations
  (``transfer_iterations``), but by default it is not: on the demo (cohort format 4) fine-tuning
  on a brain's 2 sections lowered the Dice on its other sections. Brains B01-B03 of the default
  cohort, one cohort model: 0.563 after 100 fine-tuning steps, 0.600 without; quick cohort (16
  feature maps, 1000 cohort steps): 0.385 after 40 steps, 0.400 without.
- ``"finetune"``: fine-tune ``init_checkpoint`` (any checkpoint, e.g. a pretrained one) per brain.
- ``"scratch"``: train per brain on its own annotated sections only.
- ``"auto"``: ``"transfer"`` (the most accurate within the build's budget).

Area identity depends on position as well as texture. The network always sees where its window lies
in the section through the coarse *context branch* (an overview of the whole section with the
window marked), and, by default (``stack_position``), where the section lies along the brain's
series (0 at its first section number, 1 at its last): one number per section, given to the context
branch only, which says which areas the section can show. On the demo (brains B01-B03, the build's
protocol, one cohort model) it lifted the mean Dice from 0.594 to 0.615 (every brain gained; hOc5
right 0.54 to 0.69); with the atlas prior, which also says where areas lie, it still pays: 0.679
with it, 0.671 without (all 10 brains, one cohort model). ``StageSettings(positions=True)`` adds
three *position channels* besides the grey values: the in-plane coordinates relative to the
tissue's bounding box (centre 0, edges ±1) and the section's place along the stack, as pixel
channels of the U-Net's input. They are computed
the same way for training patches and for every prediction window (from the window origin), so
prediction still streams sections of any size through :func:`~.prediction.predict_file`. They are
off by default: with two annotated sections per brain the network used them to memorise where each
area lay in those sections, and its Dice fell with the distance from them. Without them, on the
default demo cohort, the build's protocol reached a mean Dice of 0.34 against 0.24 with them
(``benchmarks/bench_segmentation_protocols.py --cohort default --set positions=True``).

An existing atlas says where each area usually lies. With an :class:`~.prior.AtlasPrior` (the
build makes one per brain from the manifest's ``prior_atlas``) the network's scores become
``logit + prior_weight * log(prior + 0.001)``, the atlas's probabilities at the pixel's place: in
every section's prediction (``segment_subject(prior=...)``) and while the network learns
(``train_cohort_model(priors=...)``, and a brain's own fine-tuning), so that it learns what the
atlas does not already say instead of learning the areas' places a second time. On the default
demo, with the FSL Juelich maps as the prior (the population its phantom areas are drawn from),
mean Dice over areas on the non-annotated sections (one cohort model per setting, the placements
and transforms of one build): no prior 0.599 (an earlier build), the prior added to the
predictions only 0.629 at weight 0.5 and 0.639 at weight 1, the prior also while learning 0.654 /
0.679 / 0.671 / 0.638 at weights 0.5 / 1 / 1.5 / 2 (1, the default, gained on every brain; the
weights were compared on the same ten brains). A floor of 0.01 instead of 0.001 gave 0.653, the
prior smoothed by two grid steps instead of one 0.680. The prior alone (its most probable class
at each pixel) scores 0.356.

Two cohort models map each brain by default (``cohort_models``): trained alike from the seeds
``seed`` and ``seed + 1``, their scores averaged (:class:`~.training.ModelEnsemble`, as flip TTA
averages a network's scores). The build trains them at the same time on separate workers; on the
2-core demo machine the second core had nothing else to do while the cohort model trained, so the
second model costs no training wall time, and each brain's prediction about twice as long. Default
demo, weight-1 prior: 0.679 (seed 0) and 0.680 (seed 1) alone, 0.690 together (hOc2, hOc3v,
hOc5 right gained most); a third model (seed + 2, 0.671 alone) added nothing (0.689 with all
three). Spending the idle core on one model instead did not pay: two torch
threads ran a training step only 1.3x faster, and the same compute spent differently scored no
better (batch 4 for 5000 steps 0.681; 24 feature maps for 4000 steps 0.670; bfloat16 autocast,
1.25x faster, for 3400 steps 0.643). Training the two models for 4000 steps instead of 2500
reached 0.709, for 3.7 more minutes of the build: beyond the demo's 20-minute budget from a fresh
machine. A step is 11 % cheaper since the optimiser step is fused and the prior's window is
two small matrix products (0.107 instead of 0.120 s on one idle core); 3000 steps in about the
training time 2500 took before reached 0.711 with ``min_area_mm3`` in one experiment (seeds 0
and 1 alone: 0.707 and 0.696, against 0.686 for seed 0 at 2500) but 0.703 in a full build
(numerically different optimiser, same seeds), against 0.705: within the spread, so 2500 stays.
Neither a larger learning rate (2e-2: 0.681 for seed 0) nor larger patches with fewer of them
(192 px x 4: 0.703 and 0.686 for seeds 0 and 1, 0.704 together; 256 px x 2: 0.691) helped; the
seed-to-seed spread of one model is about 0.015. Left and right of an area sharing their scores
(one output per area and one per hemisphere, added: homologous areas look alike) gave 0.694.

An area that a brain's annotations do not show and that the network finds in less than
``min_area_mm3`` (100 mm^3) of the whole brain is taken for noise (:class:`StageSettings`). Where
a brain has no hOc5 at all (the demo draws each brain's areas from the population maps, and the
thin hOc5 is missing from some), a few hundred stray pixels of it made its Dice 0; dropped, the
area is absent from both the map and the truth. Default demo: 0.690 -> 0.705 (five of the 20
hOc5 maps dropped; hOc5 left 0.36 -> 0.45); 50 mm^3 0.691, 200 mm^3 as 100; the quick cohort
0.549 -> 0.568. Matching every area's size to the true one (an oracle) would have given +0.02.

The figures below, up to the prediction window, were measured on the demo's earlier, fainter
phantom (cohort format 3, whose areas' laminar signatures were too alike); on the current one
(format 4) the build reaches a mean Dice of 0.745 (``docs/demo_accuracy.md``).

The network works at a quarter of the section's resolution (``input_pool=4``) on 4 x 4 blocks
turned into channels (``input_mode="unshuffle"``), so texture finer than a block still reaches
it, with 32 feature maps at its finest level. Measured with the build's protocol on the default
demo cohort (mean Dice over areas on all non-annotated sections, 10 brains): blocks as channels
with 8 maps 0.351, with 32 maps 0.425 (the default; about 1.5x the training and prediction time
of 8 maps); block means with 8 maps reached 0.345 on the cohort's previous truth. With 8 maps the
network did not even fit its own training sections (Dice 0.60-0.71 on them). A manifest sets the
width with ``stages.segmentation.width``; quick builds cap it at 16 (``manifest.QUICK_WIDTH``)
and train for 16 epochs (``manifest.QUICK_EPOCHS``: 16/40 of the cohort steps, 1000 then), 0.25
on the quick cohort; with 8 maps and 3 epochs (188 steps) the network had predicted background
everywhere.

Training patches are rotated (within ±30 degrees), zoomed (±20 %) and elastically displaced (4 px)
by default (``rotation_deg``, ``scale``, ``elastic_px``). Without it the network memorised its
annotated sections: on the quick cohort it scored 0.16-0.48 on the sections next to them (3 mm
away), and even where the areas also differed in stain density (a diagnostic cohort,
``benchmarks/bench_phantom_noise.py --brightness``) it fitted its annotations at 0.94 and scored
0.32-0.58 on their neighbours. Quick demo cohort (3 brains, the stage's defaults otherwise): 0.241
without, 0.350 with half these strengths, 0.395 with them; any rotation with ±25 % zoom and 6 px
fell apart (0.28-0.34, it no longer fitted its own annotations: 0.45-0.58). Default demo cohort:
0.425 without, 0.459 with half these strengths, 0.460 with them (every brain gained). Dropout 0.2
and weight decay 0.05 on top added nothing (0.355 against 0.350 on the quick cohort).
Self-training is not used either: one round on the pixels the brain's model predicts with at
least 90 % confidence in its other sections, 300 more steps, lifted the quick cohort from 0.395
to 0.412, as much as fine-tuning 3-4 times longer on the annotations alone (0.407-0.411), for
about 35 s more per brain (``bench_segmentation_protocols.py --protocols build,selftrain``).

Half the training patches are seen in a mirror (``mirror``, on by default; :func:`~.data.mirror`):
cut from the section mirrored left-right, with the atlas prior, the context overview and the
window's place in it mirrored too and every ``X_left`` class swapped with its ``X_right``: a brain
seen in a mirror is as plausible a brain, and its areas lie where a mirrored brain has them
(flipping the patch alone, as ``flips`` does, would teach that an area also lies where its mirror
image does). It doubles the brains the cohort models learn from, for about 3 % more time per step
(the flips and swaps). Default demo (two cohort models, seeds 0 and 1, with ``min_area_mm3``):
0.709 without, 0.733 with it (a full build; an experiment on the same placements gave 0.733 too,
its two models 0.727 and 0.722 alone); every brain gained, and the more the farther a section lies
from the annotated ones: on the annotated sections themselves 0.86 against 0.89 (it memorises them
less), on the sections 2 mm from them 0.79 against 0.78, 8-10 mm away 0.77-0.78 against 0.73-0.75,
12 mm away 0.75 against 0.69. With it, more training no longer pays: two cohort models of 4000
steps reached 0.732 (before it, 4000 steps had given +0.02).

The few annotations, not the network, are the limit: trained on the true labels of every section
of 8 other brains (275 sections instead of 20), one model maps the other two (B09, B10) at 0.782
with 2500 steps, 0.812 with 5000 and 0.829 with 10000, against 0.741 for one model of the build's
annotations (``benchmarks/bench_segmentation_protocols.py --protocols dense``). More annotated
sections of each brain pay little within the same 2500 steps: one model scored 0.727 with 2
a brain, 0.747 with 4 and 0.752 with 8 (``--annotated N``). What is left is mostly at the
borders: of the full build's wrongly labelled pixels half lie within 1 px of a true border and 73 %
within 3 px, and the truth itself with every area's border moved in by 2 px scores 0.857 (1 px
0.930, 3 px 0.782; ``--build DIR`` prints both). Finer output does not place them
better: a full-resolution head (the upsampled scores and the section's pixels through two 3 x 3
convolutions of 8 maps, added to the scores, starting at zero) scored 0.738 against 0.734 without
it in two full builds on one machine (an AMD EPYC with AVX2, where the same seeds give 0.734, not
the 0.745 of the full build quoted here), within one model's seed-to-seed spread, with as many
misses at the borders (48 % within 1 px), for about 10 % more training and 40 % more prediction
time, so the network has no such head. Four or five of the 97-98 brain-area maps are fragments of
hOc5 that the scored sections show in less than 100 mm^3 (B04 left and right, B05 right; B06 has
no left hOc5, where the network found 137 mm^3 of it, and shows the right only on an annotated
section): they score 0-0.35, and the mean without them is 0.770 instead of 0.734 on that machine
(``--build DIR`` lists them).

Prediction runs the training patch (128 px) as its window by default (``tile``; a 256-px window
scored 0.411 against 0.425, as the context branch was trained on 128-px windows). Neighbouring
windows overlap by ``overlap`` (0.25 by default, 0.5 in the demo manifest: on the default demo
cohort 0.745 against 0.739 with the same cohort models, every brain higher, for about 1.5x the
prediction time). The windows are blended with MONAI's Gaussian weights (sigma 0.125 of the
window): on four brains at overlap 0.5, sigma 0.09 scored the same, 0.0625 -0.012, 0.25 -0.007
and a plain average -0.028. Predicting each window also as cut from the mirrored section (the training's
``mirror``, left and right areas swapped back) added 0.003 more for 1.7x the prediction time, and is
not offered. Flip test-time
augmentation (``tta``, with ``flips`` in training) is off by default: on the demo, whose sections
are all cut and mounted the same way, training with flipped and turned patches cost more than
averaging four flips gained (brains B01-B03: 0.421 without either, 0.370 with flips in training,
0.382 with TTA added), and TTA quadruples the prediction time. Real sections, mounted either way
up, are where it can pay.

Outputs of :func:`segment_subject` (``out_dir``): ``sections/<name>.zarr`` (labels = class index,
per-class uint8 probabilities) and ``segmentation.json`` (written last: classes with region ids,
per-section records). Read them with :func:`load_section_labels`,
:func:`load_section_probabilities` and (the areas' maps of every section, for soft aggregation)
:func:`load_area_probabilities`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, InvalidImageError, MissingFileError
from ..storage import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..manifest import Manifest
    from .prior import AtlasPrior
    from .training import ModelEnsemble, SegmentationModel, TrainingConfig

log = logging.getLogger(__name__)

#: An initial checkpoint, or several: an ensemble of cohort models that map a brain together.
Checkpoints = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

__all__ = [
    "SEGMENTATION_FORMAT",
    "StageSettings",
    "load_area_probabilities",
    "load_section_labels",
    "load_section_probabilities",
    "position_channels",
    "segment",
    "segment_subject",
    "settings_from_manifest",
    "tissue_frame",
    "train_cohort_model",
]

SEGMENTATION_FORMAT = 1
BACKGROUND = "background"
FRAME_SIZE = 256  # overview edge (px) the tissue frame is measured on
PROTOCOLS = ("auto", "transfer", "finetune", "scratch")
MAX_COHORT_MODELS = 8
_PRIOR_CHUNK = 64  # sections whose prior grids are computed together (one transform lookup)


# --------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class StageSettings:
    """How the stage trains and predicts.

    Parameters
    ----------
    protocol
        ``"auto"``, ``"transfer"``, ``"finetune"`` or ``"scratch"`` (see the module docstring).
    cohort_iterations, finetune_iterations, scratch_iterations
        Training steps of the cohort model, of a per-brain fine-tuning (protocol ``"finetune"``),
        of per-brain training from scratch.
    transfer_iterations
        Fine-tuning steps of the cohort model on each brain's own annotations under protocol
        ``"transfer"`` (0, the default: the cohort model maps every brain as it is; see the
        module docstring).
    cohort_lr, finetune_lr, scratch_lr
        Peak learning rates (one-cycle schedule).
    patch_size, batch_size
        Training patches (also the prediction window) and patches per step.
    width, depth, input_pool, input_mode, context
        Network: feature maps at full resolution, levels, input block size and how blocks are
        reduced (see :class:`~.networks.UNet`), coarse context branch.
    positions
        Add the position channels (off by default; see the module docstring).
    stack_position
        Give the context branch the section's place along the brain's series (0 at the first
        section number, 1 at the last) as one more input: which areas a section can show depends
        on where along the brain it was cut, which the section's own outline tells only roughly.
        Only the context branch sees it (one number per section, not per pixel), so the network
        cannot memorise where areas lie in the annotated sections' pixels. A model fine-tuned from
        a checkpoint takes what the checkpoint's network takes (a self-supervised pretrained one:
        no place). Demo (B01-B03, the build's protocol): mean Dice 0.615 against 0.594 without.
    flips
        Train with random flips and 90-degree turns of each patch's pixels (the context overview
        is never turned). Off by default; not with ``positions``.
    mirror
        Train on half the patches as if cut from the section mirrored left-right: pixels, atlas
        prior, context overview and the window's place in it mirrored, ``X_left`` and ``X_right``
        swapped (:func:`~.data.mirror`), a brain seen in a mirror. Only for classes with a
        left/right pair (nothing else says what a mirrored area is); not with ``positions``.
        See the module docstring for what it gained.
    rotation_deg, scale, elastic_px
        Geometric augmentation of the training patches (image and labels alike, never the
        context overview): a random rotation within ``±rotation_deg``, a zoom within
        ``1 ± scale`` and a smooth random displacement of ``elastic_px`` pixels (std) on a
        4 x 4 control grid (:class:`~.data.Augmentation`). Cortex runs every way in a
        section, so an area's texture seen at another angle or a slightly other thickness is
        still that area; this keeps the network from memorising its few annotated sections.
        See the module docstring for what it gained.
    tile, overlap, predict_batch
        Prediction window edge in pixels (None: the training patch, ``patch_size``; a multiple
        of the network's input multiple, 32 for the default network), its overlap, and windows
        per batch.
    tta
        Flip test-time augmentation: each window is also predicted flipped left-right,
        upside-down and both, and the four outputs are averaged (4x the prediction time). Only
        the window's pixels are flipped: the context branch still sees where the window is, so
        a left area stays left. Needs ``flips``: a network trained on unturned patches only
        fell from mean Dice 0.44 to 0.24 on flipped ones (demo, brain B01).
    threads
        Torch CPU threads (None: leave torch's setting). On a shared, oversubscribed CPU one
        thread was ~10x faster than two (prediction of one 806 x 711 px section: 2 s vs 29 s).
    prior_weight
        With an atlas prior (:mod:`.prior`): the exponent of its probabilities in the scores,
        ``logit + prior_weight * log(prior + floor)``, while the network learns and when it
        predicts (see the module docstring); 0 ignores the prior.
    cohort_models
        How many cohort models (protocol ``"transfer"``) are trained, alike but from the seeds
        ``seed``, ``seed + 1``, ...; every brain is mapped by the mean of their scores
        (:class:`~.training.ModelEnsemble`). The build trains them at the same time on separate
        workers: on the 2-core demo machine the second core is otherwise idle while the cohort
        model trains, so 2 models cost no more wall time to train and each brain's prediction takes
        about twice as long. Demo (default cohort, 10 brains, weight-1 prior): 0.679 with one
        model (seed 0; 0.680 with seed 1), 0.690 with both (with ``min_area_mm3: 0``).
    min_area_mm3
        An area that the brain's annotations do not show and that the network finds in less than
        this volume of the whole brain (its predicted pixels on the non-annotated sections times
        the pixel area and the section spacing, in the sections' own scale) is taken for noise:
        the readers of the stage's output (:func:`load_section_labels`,
        :func:`load_area_probabilities`, :func:`load_section_probabilities`) give its pixels to the
        next most probable class and its probability 0. The stored predictions stay as the
        network made them; ``segmentation.json`` lists the areas (``"dropped_areas"``) with each
        area's volume (``"area_volumes_mm3"``). 0 keeps every area. Changing it and running
        :func:`segment_subject` into the same directory re-reads the stored predictions only (a
        build's brain units start afresh when a setting changes: they map the brain again).
        Demo: 0.705 against 0.690 with 0 (see the module docstring).

    Notes
    -----
    Measured with the position channels, on the quick demo cohort (3 brains, 2 annotated
    sections each, 1 thread on a shared 2-core machine; mean Dice over areas on the non-annotated
    sections against the truth): cohort model 800 steps at ``input_pool=4`` then 100 fine-tuning
    steps per brain: 0.18 (cohort model 3.1 min, 0.5 min per brain); 1000 steps at
    ``input_pool=2``: 0.17 (6.7 min). Without position channels, 2500 steps and 8 feature maps
    reached 0.25 there and 0.34 on the default cohort; 32 maps and blocks as channels 0.43, and
    with the patches rotated, zoomed and displaced (the defaults) 0.46 on the default cohort:
    still far below the 0.85 the issue asks for (see
    ``benchmarks/bench_segmentation_protocols.py`` and the module docstring).
    """

    protocol: str = "auto"
    cohort_iterations: int = 2500
    finetune_iterations: int = 100
    scratch_iterations: int = 600
    transfer_iterations: int = 0
    cohort_lr: float = 1e-2
    finetune_lr: float = 2e-3
    scratch_lr: float = 1e-2
    patch_size: int = 128
    batch_size: int = 8
    width: int = 32
    depth: int = 4
    input_pool: int = 4
    input_mode: str = "unshuffle"
    context: bool = True
    positions: bool = False
    stack_position: bool = True
    flips: bool = False
    mirror: bool = True
    rotation_deg: float = 30.0
    scale: float = 0.2
    elastic_px: float = 4.0
    tile: int | None = None
    overlap: float = 0.25
    predict_batch: int = 8
    tta: bool = False
    threads: int | None = None
    prior_weight: float = 1.0
    cohort_models: int = 2
    min_area_mm3: float = 100.0

    def __post_init__(self) -> None:
        from .shapes import input_multiple

        if self.protocol not in PROTOCOLS:
            raise InputError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        for name in ("cohort_iterations", "finetune_iterations", "scratch_iterations",
                     "transfer_iterations"):
            if int(getattr(self, name)) < 0:
                raise InputError(f"{name} must be at least 0, got {getattr(self, name)!r}")
        if not 0 <= self.overlap < 1:
            raise InputError(f"overlap must be in [0, 1), got {self.overlap!r}")
        if not (0 <= self.rotation_deg <= 180 and 0 <= self.scale < 1 and 0 <= self.elastic_px <= 64):
            raise InputError(f"augmentation needs 0 <= rotation_deg <= 180, 0 <= scale < 1 and "
                             f"0 <= elastic_px <= 64; got rotation_deg={self.rotation_deg!r}, "
                             f"scale={self.scale!r}, elastic_px={self.elastic_px!r}")
        if not (math.isfinite(float(self.prior_weight)) and 0 <= float(self.prior_weight) <= 10):
            raise InputError(f"prior_weight must be in [0, 10], got {self.prior_weight!r}")
        if not (math.isfinite(float(self.min_area_mm3)) and float(self.min_area_mm3) >= 0):
            raise InputError(f"min_area_mm3 must be a number >= 0, got {self.min_area_mm3!r}")
        if not 1 <= int(self.cohort_models) <= MAX_COHORT_MODELS:
            raise InputError(f"cohort_models must be 1 to {MAX_COHORT_MODELS}, got {self.cohort_models!r}")
        if self.tta and not self.flips:
            raise InputError("tta needs a network trained with flips (flips=True): one trained on "
                             "unturned patches does not recognise flipped ones")
        if self.mirror and self.positions:
            raise InputError("mirror cannot be used with positions (a mirrored patch would no longer "
                             "match its position channels): set mirror=False")
        if self.flips and self.positions:
            raise InputError("flips cannot be used with positions: a turned patch would no longer "
                             "match its position channels")
        if self.tile is not None:
            m = input_multiple(self.depth, self.input_pool, self.input_mode)
            if int(self.tile) < m or int(self.tile) % m:
                raise InputError(f"tile must be a positive multiple of {m} (input_pool {self.input_pool} "
                                 f"x 2**(depth - 1) for depth {self.depth}), got {self.tile!r}")

    @property
    def window_size(self) -> int:
        """The prediction window's edge in pixels: ``tile``, else the training patch."""
        return int(self.tile) if self.tile is not None else int(self.patch_size)

    def training_config(self, iterations: int, learning_rate: float) -> TrainingConfig:
        """The :class:`~.training.TrainingConfig` of one training run of this protocol."""
        from .data import Augmentation
        from .training import TrainingConfig

        # flips and turns only on request, never with position channels (they would turn them
        # against the labels); the intensity changes touch the grey channel(s) only
        aug = Augmentation(flips=self.flips, mirror=self.mirror, rotation_deg=float(self.rotation_deg),
                           scale=float(self.scale), elastic_px=float(self.elastic_px),
                           intensity_channels=1 if self.positions else None)
        return TrainingConfig(patch_size=self.patch_size, batch_size=self.batch_size,
                              max_iterations=max(1, int(iterations)), learning_rate=learning_rate,
                              eval_every=max(1, int(iterations)), val_fraction=0.0, width=self.width,
                              depth=self.depth, context=self.context, input_pool=self.input_pool,
                              input_mode=self.input_mode,
                              overlap=self.overlap, augmentation=aug)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def settings_from_manifest(manifest: Manifest) -> StageSettings:
    """:class:`StageSettings` from ``stages.segmentation``: ``protocol``, ``tile``, ``overlap``,
    ``batch_size``, ``width``, ``tta`` (which also trains with ``flips``), ``mirror``, ``stack_position``,
    ``prior_weight``, ``cohort_models``, ``min_area_mm3``;
    ``epochs`` scales every
    number of training steps relative to its default of 40 (so a quick build's 16 epochs train for
    16/40 of the steps, at least 40 for the cohort model).

    Raises
    ------
    InputError
        ``tile`` is not a multiple of the network's input multiple (the message names the key).
    """
    seg = manifest.stages.segmentation
    base = StageSettings()
    scale = float(seg.epochs) / 40.0
    try:
        replace(base, tile=int(seg.tile))
    except InputError as exc:
        where = f"{manifest.path}: " if getattr(manifest, "_path", None) else ""
        raise InputError(f"{where}stages.segmentation.tile: {exc}") from None
    return replace(base, protocol=str(seg.protocol), tile=int(seg.tile), overlap=float(seg.overlap),
                   batch_size=int(seg.batch_size), width=int(seg.width), tta=bool(seg.tta),
                   flips=bool(seg.tta), mirror=bool(seg.mirror), stack_position=bool(seg.stack_position),
                   prior_weight=float(seg.prior_weight), cohort_models=int(seg.cohort_models),
                   min_area_mm3=float(seg.min_area_mm3),
                   cohort_iterations=max(40, round(base.cohort_iterations * min(scale, 4.0))),
                   finetune_iterations=max(10, round(base.finetune_iterations * min(scale, 4.0))),
                   scratch_iterations=max(40, round(base.scratch_iterations * min(scale, 4.0))),
                   transfer_iterations=round(base.transfer_iterations * min(scale, 4.0)))


# --------------------------------------------------------------------------------------------------
# position channels


def tissue_frame(overview: np.ndarray, factor: int) -> tuple[float, float, float, float]:
    """``(centre_row, centre_col, half_height, half_width)`` of the tissue, in section pixels.

    ``overview`` ``(C, h, w)`` or ``(h, w)`` is the section averaged over ``factor`` px blocks.
    Tissue is the darker side of an Otsu threshold of the (channel-mean) grey values; the box
    spans the 0.5-99.5 percentiles of the tissue pixels' rows and columns, so specks of dirt do
    not move it.

    Raises
    ------
    InvalidImageError
        A constant overview (no tissue to find).
    """
    ov = np.asarray(overview, np.float64)
    grey = ov.mean(0) if ov.ndim == 3 else ov
    lo, hi = float(grey.min()), float(grey.max())
    if not hi > lo:
        raise InvalidImageError("the section is constant: no tissue to locate")
    hist, edges = np.histogram(grey, bins=128, range=(lo, hi))
    p = hist / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    total = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * (1 - w0))
    between[~np.isfinite(between)] = -1
    threshold = edges[int(np.argmax(between)) + 1]
    tissue = grey < threshold
    if tissue.sum() < 4:  # pragma: no cover - Otsu always splits a non-constant image
        tissue = grey <= np.median(grey)
    rows, cols = np.nonzero(tissue)
    r0, r1 = np.percentile(rows, [0.5, 99.5])
    c0, c1 = np.percentile(cols, [0.5, 99.5])
    f = float(factor)
    cy, cx = (r0 + r1 + 1) / 2 * f, (c0 + c1 + 1) / 2 * f
    hy, hx = max((r1 - r0 + 1) / 2 * f, f), max((c1 - c0 + 1) / 2 * f, f)
    return float(cy), float(cx), float(hy), float(hx)


def position_channels(shape: tuple[int, int], frame: Sequence[float], z: float, *,
                      origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``(3, H, W)`` float32: row and column position relative to ``frame`` (see
    :func:`tissue_frame`; 0 at the centre, ±1 at the box's edges) and the constant ``z``, for the
    window of ``shape`` whose top-left pixel is ``origin`` of the section."""
    cy, cx, hy, hx = (float(v) for v in frame)
    h, w = shape
    rows = (np.arange(origin[0], origin[0] + h, dtype=np.float64) + 0.5 - cy) / hy
    cols = (np.arange(origin[1], origin[1] + w, dtype=np.float64) + 0.5 - cx) / hx
    out = np.empty((3, h, w), np.float32)
    out[0] = rows[:, None]
    out[1] = cols[None, :]
    out[2] = z
    return out


def _frame_of_array(image: np.ndarray) -> tuple[float, float, float, float]:
    from .data import block_mean, overview_factor

    f = overview_factor(image.shape[1:], FRAME_SIZE)
    return tissue_frame(block_mean(image.astype(np.float32), f), f)


def _frame_of_file(path: Path) -> tuple[float, float, float, float]:
    from .data import overview_factor
    from .prediction import _scan, open_section

    with open_section(path) as section:
        _, h, w = section.shape
        f = overview_factor((h, w), FRAME_SIZE)
        lo, hi, ov = _scan(section, f)
    if not lo < hi or ov is None:
        raise InvalidImageError(f"{path}: the section is constant (every pixel is {lo:g}); there is no "
                                "tissue to segment")
    return tissue_frame(ov, f)


def _stack_position(manifest: Manifest, subject_id: str, number: int) -> float:
    """The section's place along the brain's series: 0 at the first, 1 at the last number."""
    s = manifest.subject(subject_id)
    numbers = list(manifest.section_files(subject_id)) + list(s.sections.missing)
    lo, hi = min(numbers), max(numbers)
    return 0.5 if hi == lo else float((number - lo) / (hi - lo))


def _positioned_predictor(model: SegmentationModel | ModelEnsemble, frame: Sequence[float], z: float) -> Any:
    """Wrap ``model`` (trained on grey + position channels) for the sliding-window engine."""
    import torch

    class PositionedPredictor(torch.nn.Module):
        """Appends the position channels of each window (from its origin) before the model."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.classes = model.classes
            self.needs_origins = True
            self.overview_size = model.overview_size
            self.frame = tuple(float(v) for v in frame)
            self.z = float(z)

        def prepare_section(self, overview: np.ndarray, factor: int, shape: tuple[int, int]) -> None:
            pos = _overview_positions(overview.shape[1:], factor, self.frame, self.z)
            self.model.prepare_section(np.concatenate([overview, pos]), factor, shape)

        def forward(self, x: torch.Tensor, origins: torch.Tensor) -> torch.Tensor:
            cy, cx, hy, hx = self.frame
            b, _, h, w = x.shape
            o = origins.to(device=x.device, dtype=torch.float32)
            r = (o[:, 0:1] + torch.arange(h, device=x.device, dtype=torch.float32) + 0.5 - cy) / hy
            c = (o[:, 1:2] + torch.arange(w, device=x.device, dtype=torch.float32) + 0.5 - cx) / hx
            pos = torch.stack([r[:, :, None].expand(b, h, w), c[:, None, :].expand(b, h, w),
                               torch.full((b, h, w), self.z, device=x.device)], 1).to(x.dtype)
            xx = torch.cat([x, pos], 1).contiguous(memory_format=torch.channels_last)
            return self.model(xx, origins)

    return PositionedPredictor()


def _overview_positions(shape: tuple[int, int], factor: int, frame: Sequence[float],
                        z: float) -> np.ndarray:
    """Position channels at overview resolution (block centres), as block averaging makes them."""
    cy, cx, hy, hx = (float(v) for v in frame)
    h, w = shape
    f = float(factor)
    rows = ((np.arange(h) + 0.5) * f - cy) / hy
    cols = ((np.arange(w) + 0.5) * f - cx) / hx
    out = np.empty((3, h, w), np.float32)
    out[0] = rows[:, None]
    out[1] = cols[None, :]
    out[2] = z
    return out


# --------------------------------------------------------------------------------------------------
# reading a subject's data


@dataclass
class _Subject:
    id: str
    classes: list[str]
    mapping: dict[int, str | None]
    region_ids: dict[str, int]
    sections: dict[int, Path]
    annotations: dict[int, Path]
    positions: dict[int, float] = field(default_factory=dict)
    #: mm^3 one section pixel stands for (pixel area x section spacing)
    pixel_mm3: float = 0.0


def _class_setup(manifest: Manifest, subject_id: str) -> tuple[list[str], dict[int, str | None],
                                                               dict[str, int]]:
    s = manifest.subject(subject_id)
    labels = s.annotations.labels
    keys = list(dict.fromkeys(labels.values()))
    classes = [BACKGROUND, *keys]
    mapping: dict[int, str | None] = {int(s.annotations.background): BACKGROUND}
    mapping.update({int(v): str(k) for v, k in labels.items()})
    region_ids: dict[str, int] = {}
    try:
        tree = manifest.load_hierarchy()
    except Exception:
        tree = None
    for value, key in labels.items():
        rid = int(value)
        if tree is not None:
            try:
                rid = int(tree.get(key).id)
            except Exception:
                rid = int(value)
        region_ids.setdefault(str(key), rid)
    return classes, mapping, region_ids


def _subject(manifest: Manifest, subject_id: str) -> _Subject:
    classes, mapping, region_ids = _class_setup(manifest, subject_id)
    sections = manifest.section_files(subject_id)
    annotations = manifest.annotation_files(subject_id)
    missing = sorted(set(annotations) - set(sections))
    if missing:
        names = ", ".join(str(annotations[n]) for n in missing)
        raise InputError(f"subject {subject_id}: annotations {names}"
                         " have no section image with the same number")
    sub = _Subject(subject_id, classes, mapping, region_ids, sections, annotations)
    sub.positions = {n: _stack_position(manifest, subject_id, n) for n in sections}
    series = manifest.subject(subject_id).sections
    sub.pixel_mm3 = ((float(series.pixel_size_um) / 1000.0) ** 2
                     * float(series.spacing) * float(series.thickness_um) / 1000.0)
    return sub


def _read_image(path: Path) -> np.ndarray:
    """A section as ``(C, H, W)`` float32 (tifffile for TIFF, imageio otherwise)."""
    if not path.is_file():
        raise MissingFileError(path, "section image")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(path))
        else:
            import imageio.v3 as iio

            arr = np.asarray(iio.imread(path))
    except Exception as exc:
        raise InvalidImageError(f"{path}: cannot read the image ({exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] not in (3, 4):
        arr = np.moveaxis(arr[..., :3], -1, 0)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.size == 0:
        raise InvalidImageError(f"{path}: expected a 2-D section image, got shape {arr.shape}")
    return arr.astype(np.float32)


def _read_labels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise MissingFileError(path, "annotation")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(path))
        else:
            import imageio.v3 as iio

            arr = np.asarray(iio.imread(path))
    except Exception as exc:
        raise InvalidImageError(f"{path}: cannot read the annotation ({exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if not (np.all(arr[..., 0] == arr[..., 1]) and np.all(arr[..., 0] == arr[..., 2])):
            raise InvalidImageError(f"{path}: the annotation is a colour image; label images must hold "
                                    "one label value per pixel")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InvalidImageError(f"{path}: expected a 2-D label image, got shape {arr.shape}")
    return arr


def _training_inputs(sub: _Subject, settings: StageSettings, numbers: Sequence[int] | None = None
                     ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The annotated sections (grey + position channels), their labels and names, checked."""
    images, labels, names = [], [], []
    for n in numbers if numbers is not None else sorted(sub.annotations):
        spath, apath = sub.sections[n], sub.annotations[n]
        img = _read_image(spath)
        if float(img.min()) == float(img.max()):
            raise InvalidImageError(f"{spath}: the section is constant (every pixel is {img.min():g})")
        ann = _read_labels(apath)
        if ann.shape != img.shape[1:]:
            raise InvalidImageError(f"{apath}: the annotation is {ann.shape[0]} x {ann.shape[1]} px but its "
                                    f"section {spath.name} is {img.shape[1]} x {img.shape[2]} px")
        unknown = sorted(set(np.unique(ann).tolist()) - set(sub.mapping))
        if unknown:
            raise InputError(f"{apath}: label values {unknown[:10]} are not in subject {sub.id}'s "
                             f"annotation labels (known: {sorted(sub.mapping)})")
        if settings.positions:
            img = np.concatenate([img, position_channels(img.shape[1:], _frame_of_array(img),
                                                         sub.positions[n])])
        images.append(img)
        labels.append(ann)
        names.append(str(apath))
    return images, labels, names


def _section_values(sub: _Subject, numbers: Sequence[int], count: int) -> list[tuple[float, ...]]:
    """The context branch's scalar inputs of these sections: ``count`` 1 is the place along the
    series (:func:`_stack_position`), 0 none."""
    if count not in (0, 1):
        raise InputError(f"subject {sub.id}: the model takes {count} section values; the segmentation "
                         "stage knows one (the section's place along the series)")
    return [(sub.positions[n],) if count else () for n in numbers]


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


# --------------------------------------------------------------------------------------------------
# entry points


def train_cohort_model(manifest: Manifest | str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                       subjects: Sequence[str] | None = None, exclude: Sequence[str] = (),
                       settings: StageSettings | None = None, device: str = "cpu",
                       threads: int | None = None, seed: int = 0, progress: bool = True,
                       priors: Mapping[str, AtlasPrior] | None = None) -> Path:
    """Train one model on the annotated sections of several brains and save it (atomically).

    Parameters
    ----------
    manifest
        A loaded manifest or its path.
    out_path
        The checkpoint file to write.
    subjects
        Brains whose annotations are used (default: all); ``exclude`` removes some (e.g. the brain
        a transfer is measured on).
    settings
        :class:`StageSettings` (``cohort_iterations``, ``cohort_lr``, network shape).
    device, threads, seed, progress
        Torch device, CPU threads, seed, progress bar.
    priors
        Subject id -> its :class:`~.prior.AtlasPrior`: the network learns with the prior added to
        its scores on that brain's annotated sections (``train(section_bias=...)``), so it learns
        what the atlas does not already say; it must then map brains with their prior
        (``segment_subject(prior=...)``). Brains without one are learnt from as they are.

    Returns
    -------
    pathlib.Path
        ``out_path``.

    Raises
    ------
    InputError
        No brains left, brains whose annotation label names differ, bad annotations (naming the
        file), a prior made for other classes.
    """
    from .training import save_checkpoint, train

    m = _manifest(manifest)
    st = settings or StageSettings()
    _threads(threads or st.threads)
    ids = [s.id for s in m.subjects] if subjects is None else list(subjects)
    ids = [i for i in ids if i not in set(exclude)]
    if not ids:
        raise InputError("train_cohort_model: no subjects left to train on")
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    names: list[str] = []
    values: list[tuple[float, ...]] = []
    bias: list[tuple[np.ndarray, int] | None] = []
    priors = dict(priors or {})
    classes: list[str] | None = None
    merged: dict[int, str | None] = {}
    for sid in ids:
        sub = _subject(m, sid)
        if classes is None:
            classes = sub.classes
        elif sub.classes != classes:
            raise InputError(f"subject {sid}: annotation classes {sub.classes} differ from {ids[0]}'s "
                             f"{classes}; a cohort model needs one class set")
        imgs, anns, nms = _training_inputs(sub, st)
        annotated = sorted(sub.annotations)
        values += _section_values(sub, annotated, int(st.stack_position))
        prior = priors.get(sid)
        if prior is not None and list(prior.classes) != classes:
            raise InputError(f"subject {sid}: the atlas prior was made for classes {prior.classes}, not "
                             f"{classes}")
        bias += prior.section_bias(annotated) if prior is not None else [None] * len(annotated)
        # label values may differ between brains: recode them to class indices + 1 (0 = background)
        lut = {v: (classes.index(k) if k is not None else -1) for v, k in sub.mapping.items()}
        for ann in anns:
            rec = np.zeros(ann.shape, np.int32)
            for v, c in lut.items():
                rec[ann == v] = c
            labels.append(rec)
        images += imgs
        names += nms
    assert classes is not None
    merged = {i: c for i, c in enumerate(classes)}
    t0 = time.perf_counter()
    model, _ = train(images, labels, merged, classes=classes, names=names,
                     config=st.training_config(st.cohort_iterations, st.cohort_lr), section_values=values,
                     section_bias=bias, seed=seed,
                     device=device, progress=progress)
    model.meta["stage"] = {"kind": "cohort", "subjects": ids, "positions": st.positions,
                           "settings": st.as_dict(), "seed": int(seed),
                           "train_s": time.perf_counter() - t0}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(model, out)


def _manifest(manifest: Manifest | str | os.PathLike[str]) -> Manifest:
    from ..manifest import Manifest, load_manifest

    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest)


def _dice(pred: np.ndarray, truth: np.ndarray, ids: Sequence[int]) -> dict[int, float]:
    out = {}
    for r in ids:
        p, t = pred == r, truth == r
        d = int(p.sum() + t.sum())
        if d:
            out[int(r)] = 2 * float((p & t).sum()) / d
    return out


def _run_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Of :meth:`StageSettings.as_dict` (or its JSON copy), the settings that shape the stored
    outputs (CPU threads do not; ``min_area_mm3`` only changes how they are read:
    :func:`_with_min_area`)."""
    return {k: v for k, v in settings.items() if k not in ("threads", "min_area_mm3")}


def _inputs_key(sub: _Subject, init_checkpoint: Checkpoints | None, seed: int) -> str:
    """A hash of what a brain's segmentation learns from besides the settings: its annotations
    (bytes), label mapping, section files (names and sizes), the initial checkpoint(s) (bytes) and
    the seed. A rerun into the same directory with other inputs redoes the brain."""
    from ..execution import content_key
    from ..storage import sha256_file

    paths = _checkpoint_list(init_checkpoint)
    init: Any = None
    if paths:
        init = sha256_file(paths[0]) if len(paths) == 1 else [sha256_file(p) for p in paths]
    return content_key(
        {str(n): sha256_file(p) for n, p in sorted(sub.annotations.items())},
        {str(k): v for k, v in sorted(sub.mapping.items())},
        {p.name: p.stat().st_size for p in sub.sections.values()}, init, int(seed))


def _checkpoint_list(init_checkpoint: Checkpoints | None) -> list[Path]:
    """One checkpoint path or several (an ensemble) as a list (empty for None)."""
    if init_checkpoint is None:
        return []
    if isinstance(init_checkpoint, (str, os.PathLike)):
        return [Path(init_checkpoint)]
    paths = [Path(p) for p in init_checkpoint]
    if not paths:
        raise InputError("init_checkpoint: an empty list of checkpoints (give None to train from scratch)")
    return paths


def _ensemble(models: Sequence[SegmentationModel]) -> SegmentationModel | ModelEnsemble:
    """One model as it is; several as a :class:`~.training.ModelEnsemble` (mean of their scores)."""
    from .training import ModelEnsemble

    return models[0] if len(models) == 1 else ModelEnsemble(models)


def _json_or_none(path: Path) -> Any:
    """A JSON file's content; None when it is missing or unreadable (a marker to redo work)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _drop_stale_predictions(out_dir: Path, st: StageSettings, inputs_key: str) -> None:
    """Keep the section predictions of an interrupted run with the same settings and inputs
    (they are skipped on resume); remove those of a run with other settings or inputs (another
    model, window or TTA made them)."""
    import shutil

    marker = out_dir / "prediction_settings.json"
    want = {**_run_settings(st.as_dict()), "inputs_key": inputs_key}
    if _json_or_none(marker) != want and (out_dir / "sections").exists():
        shutil.rmtree(out_dir / "sections")
    atomic_write_text(marker, json.dumps(want, indent=1))


def _complete(out_dir: Path, sub: _Subject, st: StageSettings | None = None,
              inputs_key: str | None = None) -> dict[str, Any] | None:
    info = _json_or_none(out_dir / "segmentation.json")
    if not isinstance(info, dict):
        return None
    if info.get("format") != SEGMENTATION_FORMAT or info.get("subject") != sub.id:
        return None
    if [c["key"] for c in info.get("classes", [])] != sub.classes:
        return None
    if st is not None and _run_settings(info.get("settings", {})) != _run_settings(st.as_dict()):
        return None  # made with other settings: redo
    if inputs_key is not None and info.get("inputs_key") != inputs_key:
        return None  # from other annotations, another initial model or seed: redo
    names = {s["file"] for s in info.get("sections", [])}
    if names != {p.name for p in sub.sections.values()}:
        return None
    if not all((out_dir / s["prediction"]).exists() for s in info["sections"]):
        return None
    return dict(info)


def segment_subject(manifest: Manifest | str | os.PathLike[str], subject_id: str,
                    out_dir: str | os.PathLike[str], *,
                    init_checkpoint: Checkpoints | None = None,
                    settings: StageSettings | None = None, device: str = "cpu", threads: int | None = None,
                    seed: int = 0, progress: bool = True, prior: AtlasPrior | None = None
                    ) -> dict[str, Any]:
    """Train (or fine-tune) on one brain's annotations and map the areas in all its sections.

    Parameters
    ----------
    manifest, subject_id
        The manifest (loaded or a path) and the brain.
    out_dir
        Output directory: ``sections/<name>.zarr`` per section, ``model.pt`` (an ensemble:
        ``model.pt``, ``model-2.pt``, ...) and ``segmentation.json`` (written last; an ``out_dir``
        whose json matches is complete and is returned at once).
    init_checkpoint
        Checkpoint to fine-tune from (a cohort model: protocol ``"transfer"``; a pretrained one:
        ``"finetune"``), or a list of cohort models (:attr:`StageSettings.cohort_models`): each is
        fine-tuned alike (when the protocol fine-tunes) and the brain is mapped by the mean of their
        scores (:class:`~.training.ModelEnsemble`). Without it the brain is trained from scratch.
    settings
        :class:`StageSettings`.
    device, threads, seed, progress
        Torch device (``"cpu"``, ``"cuda[:N]"``), CPU threads, seed, progress bars.
    prior
        An :class:`~.prior.AtlasPrior` of this brain: its probabilities are added to the
        network's scores in every section's prediction (weight ``settings.prior_weight``), and
        while the network learns on the brain's annotated sections (fine-tuning, from scratch),
        as :func:`train_cohort_model` does with its ``priors``. Its classes must be the brain's.

    Returns
    -------
    dict
        The content of ``segmentation.json``: ``classes`` (key, region id, label value per class
        index), ``sections`` (number, file, prediction store, annotated, mean confidence), the
        protocol, timings and the Dice of the model on the annotated sections.

    Raises
    ------
    InputError, InvalidImageError, MissingFileError
        Annotation labels outside the manifest mapping, annotation/section size mismatch,
        empty/constant sections, a checkpoint for another class set, CUDA without a GPU; the
        message names the file. No ``segmentation.json`` is written then.
    """
    from .prediction import SlidingWindow, open_prediction, predict_file, resolve_device
    from .prior import prior_predictor
    from .training import intensity_statistics, load_checkpoint, save_checkpoint, train

    m = _manifest(manifest)
    st = settings or StageSettings()
    out = Path(out_dir)
    sub = _subject(m, subject_id)
    inits = _checkpoint_list(init_checkpoint)
    used = bool(inits) and st.protocol != "scratch"
    for path in inits if used else []:
        if not path.is_file():
            raise MissingFileError(path, "checkpoint")
    inputs_key = _inputs_key(sub, inits if used else None, seed)
    if prior is not None:
        if list(prior.classes) != sub.classes:
            raise InputError(f"the atlas prior was made for classes {prior.classes}, but subject "
                             f"{sub.id}'s annotations define {sub.classes}")
        if prior.weight != float(st.prior_weight):
            raise InputError(f"the atlas prior's weight {prior.weight} is not the settings' "
                             f"prior_weight {st.prior_weight}")
        for n, path in sub.sections.items():  # before any work
            place = prior.placements.get(n)
            if place is not None and place.file and Path(place.file).name != path.name:
                raise InputError(f"the atlas prior places {Path(place.file).name} as section {n} of "
                                 f"subject {sub.id}, but the manifest's section {n} is {path}")
        from ..execution import content_key

        inputs_key = content_key(inputs_key, prior.key)
    done = _complete(out, sub, st, inputs_key)
    if done is not None:
        return _with_min_area(out, done, sub, st)
    dev = resolve_device(device)
    _threads(threads or st.threads)
    t0 = time.perf_counter()
    protocol = st.protocol
    if protocol == "auto":
        protocol = "transfer" if inits else "scratch"
    if protocol in ("transfer", "finetune") and not inits:
        raise InputError(f"protocol {protocol!r} needs init_checkpoint (a cohort or pretrained model)")
    if protocol == "scratch":
        inits = []
    pretrained = False
    meta: dict[str, Any] = {}
    if inits:
        from .training import _read_checkpoint

        for init_path in inits:
            meta = _read_checkpoint(init_path)["meta"]
            if meta.get("kind") == "segmentation" and list(meta.get("classes", [])) != sub.classes:
                raise InputError(f"{init_path}: the checkpoint was trained for classes "
                                 f"{meta.get('classes')}, but subject {sub.id}'s annotations define "
                                 f"{sub.classes}")
            pretrained = pretrained or meta.get("kind") == "pretrained"
            if meta.get("prior_bias") and prior is None:
                log.warning("%s: the model learnt with an atlas prior added to its scores, but subject "
                            "%s is mapped without one: expect poorer maps", init_path, sub.id)
    images, labels, names = _training_inputs(sub, st)
    annotated = sorted(sub.annotations)
    iterations = (st.transfer_iterations if protocol == "transfer" else
                  st.finetune_iterations if inits else st.scratch_iterations)
    lr = st.finetune_lr if inits else st.scratch_lr
    if pretrained and iterations == 0:
        raise InputError(f"{', '.join(map(str, inits))}: a pretrained checkpoint has no segmentation "
                         "head yet: it needs fine-tuning steps (finetune_iterations > 0)")
    cfg = st.training_config(iterations, lr)
    before = None
    models: list[SegmentationModel] = []
    if inits and iterations == 0:
        for init_path in inits:
            member = load_checkpoint(init_path, classes=sub.classes, device=dev)
            # as a fine-tuning would: the brain's own intensity statistics map it onto what the
            # network has learnt to expect (brains differ in staining)
            member.set_normalisation(*intensity_statistics(images))
            models.append(member)
    else:
        # a pretrained checkpoint has no segmentation head: nothing to score before fine-tuning
        if inits and not pretrained:
            before = _annotated_dice(_ensemble([load_checkpoint(p, classes=sub.classes, device=dev)
                                                for p in inits]),
                                     images, labels, annotated, sub, st, dev, prior=prior)
        # a checkpoint decides whether sections give their place along the series (a pretrained
        # one never takes it: its context branch is kept as it is); from scratch, the settings do
        count = int(meta.get("section_values", 0)) if inits else int(st.stack_position)
        bias = prior.section_bias(annotated) if prior is not None else None
        for init_path in inits or [None]:  # type: ignore[list-item]
            member, _ = train(images, labels, sub.mapping, classes=sub.classes, names=names, config=cfg,
                              section_values=_section_values(sub, annotated, count), section_bias=bias,
                              init=init_path, new_classes=False, seed=seed, device=dev,
                              progress=progress)
            models.append(member)
    model = _ensemble(models)
    t_train = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model_files = [f"model-{i}.pt" if i > 1 else "model.pt" for i in range(1, len(models) + 1)]
    for member, name in zip(models, model_files, strict=True):
        save_checkpoint(member, out / name)

    t1 = time.perf_counter()
    _drop_stale_predictions(out, st, inputs_key)
    window = SlidingWindow(roi_size=st.window_size, overlap=st.overlap, batch_size=st.predict_batch)
    records = []
    stores: dict[int, Path] = {}
    numbers = sorted(sub.sections)
    grids: dict[int, np.ndarray | None] = {}  # the prior's grids of the next sections, a chunk at a time
    it: Any = numbers
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(numbers, unit="section", desc=f"predict {sub.id}")
    for n in it:
        path = sub.sections[n]
        predictor: Any = model
        if model.section_values:
            model.set_section_values(_section_values(sub, [n], model.section_values)[0])
        if st.positions:
            predictor = _positioned_predictor(model, _frame_of_file(path), sub.positions[n])
        grid = None
        if prior is not None:
            if n not in grids:
                at = numbers.index(n)
                grids = prior.section_grids(numbers[at:at + _PRIOR_CHUNK])
            grid = grids[n]
            predictor = prior_predictor(predictor, grid, prior.step_px)
        store = predict_file(path, out / "sections", predictor, classes=sub.classes, window=window,
                             device=dev, tta=st.tta)
        stores[n] = store
        _, probs, _ = open_prediction(store)
        conf = _mean_confidence(probs)
        rec: dict[str, Any] = {"number": int(n), "file": path.name, "source": str(path),
                               "prediction": str(store.relative_to(out)), "annotated": n in sub.annotations,
                               "mean_confidence": conf, "position": sub.positions[n],
                               "class_pixels": _class_pixels(store, len(sub.classes))}
        if prior is not None:
            rec["prior"] = grid is not None
        if n in sub.annotations:
            rec["labels_from"] = "annotation"
            rec["annotation"] = str(sub.annotations[n])
        else:
            rec["labels_from"] = "prediction"
        records.append(rec)
    t_pred = time.perf_counter() - t1
    # the annotated sections were predicted with the rest: score what was stored
    after = _stored_annotated_dice([stores[n] for n in annotated], labels, sub)
    info = {
        "format": SEGMENTATION_FORMAT,
        "subject": sub.id,
        "classes": [{"index": i, "key": c, "region_id": 0 if c == BACKGROUND else sub.region_ids[c],
                     "label_values": sorted(v for v, k in sub.mapping.items() if k == c)}
                    for i, c in enumerate(sub.classes)],
        "label_values": {str(v): (0 if k in (None, BACKGROUND) else sub.region_ids[k])
                         for v, k in sub.mapping.items()},
        "annotated_sections": "the expert labels are kept as the labels of annotated sections "
                              "(load_section_labels returns them); their predictions are stored too",
        "protocol": protocol,
        "init_checkpoint": (None if not inits else str(inits[0]) if len(inits) == 1
                            else [str(p) for p in inits]),
        "prior": None if prior is None else prior.describe(),
        "model": model_files[0],
        "models": model_files,
        "settings": st.as_dict(),
        "inputs_key": inputs_key,
        "device": str(dev),
        "seed": seed,
        "timings_s": {"train": t_train, "predict": t_pred, "total": time.perf_counter() - t0},
        "dice_annotated": {
            "before_finetuning": before,
            "after_training": after,
            "note": "mean Dice over areas on this brain's annotated sections (training data after "
                    "training; before fine-tuning it is held out unless the initial model saw them)",
        },
        "sections": records,
    }
    return _with_min_area(out, info, sub, st, labels)


def _class_pixels(store: Path, n_classes: int) -> list[int]:
    """How many pixels of a stored prediction have each class (read chunk-row by chunk-row)."""
    from .prediction import open_prediction

    labels, _, _ = open_prediction(store)
    counts = np.zeros(n_classes, np.int64)
    step = max(1, int(labels.chunks[0]))
    for y in range(0, labels.shape[0], step):
        block = np.asarray(labels[y:y + step]).ravel()
        counts += np.bincount(block, minlength=n_classes)[:n_classes]
    return [int(c) for c in counts]


def _annotated_areas(sub: _Subject, labels: Sequence[np.ndarray] | None = None) -> list[str]:
    """The classes the brain's annotations show (in class order); ``labels``: the annotation
    images already read (else they are read here)."""
    shown: set[str] = set()
    arrays = labels if labels is not None else (_read_labels(p) for p in sub.annotations.values())
    for ann in arrays:
        for v in np.unique(ann).tolist():
            key = sub.mapping.get(int(v))
            if key is not None:
                shown.add(key)
    return [c for c in sub.classes if c in shown and c != BACKGROUND]


def _with_min_area(out: Path, info: dict[str, Any], sub: _Subject, st: StageSettings,
                   labels: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """``info`` with the areas' volumes and the areas ``st.min_area_mm3`` drops (see
    :class:`StageSettings`), written to ``out/segmentation.json`` (atomically) when they change;
    ``labels``: the brain's annotation images if already read."""
    threshold = float(st.min_area_mm3)
    if (info.get("settings", {}).get("min_area_mm3") == threshold and "dropped_areas" in info
            and (out / "segmentation.json").is_file()):
        return info
    counts = np.zeros(len(info["classes"]), np.int64)
    for rec in info["sections"]:
        if rec["annotated"]:
            continue
        if "class_pixels" not in rec:  # made before the volumes were recorded
            rec["class_pixels"] = _class_pixels(out / rec["prediction"], len(counts))
        counts += np.asarray(rec["class_pixels"], np.int64)
    shown = _annotated_areas(sub, labels)
    volumes = {c["key"]: round(float(counts[c["index"]]) * sub.pixel_mm3, 3)
               for c in info["classes"] if c["key"] != BACKGROUND}
    dropped = [k for k, v in volumes.items() if k not in shown and v < threshold]
    if dropped:
        log.info("subject %s: %s found in less than %g mm^3 and not in the annotations: taken for "
                 "noise (min_area_mm3)", sub.id, ", ".join(dropped), threshold)
    info = {**info, "settings": {**info.get("settings", {}), "min_area_mm3": threshold},
            "annotated_areas": shown, "area_volumes_mm3": volumes, "dropped_areas": dropped}
    atomic_write_text(out / "segmentation.json", json.dumps(info, indent=1))
    return info


def _dropped_indices(info: dict[str, Any]) -> list[int]:
    dropped = set(info.get("dropped_areas", []))
    return [int(c["index"]) for c in info["classes"] if c["key"] in dropped]


def _relabel(labels: Any, probs: Any, dropped: Sequence[int]) -> np.ndarray:
    """Class indices of a stored prediction, the ``dropped`` classes' pixels given to the next
    most probable class (rows of chunks without them are not read twice)."""
    lab = np.asarray(labels[...]).astype(np.int64)
    if not dropped:
        return lab
    hit = np.isin(lab, dropped)
    rows = np.flatnonzero(hit.any(1))
    step = max(1, int(probs.chunks[1]))
    for y in np.unique(rows // step) * step:
        p = np.asarray(probs[:, y:y + step]).astype(np.int16)
        p[list(dropped)] = -1
        h = hit[y:y + step]
        lab[y:y + step][h] = p.argmax(0)[h]
    return lab


def _mean_confidence(probs: Any) -> float:
    """Mean over pixels of the winning class's probability (0-1), read chunk-row by chunk-row."""
    h = probs.shape[1]
    total, count = 0.0, 0
    step = max(1, int(probs.chunks[1]))
    for y in range(0, h, step):
        block = np.asarray(probs[:, y:y + step]).max(0)
        total += float(block.sum(dtype=np.float64))
        count += block.size
    return total / max(count, 1) / 100.0


def _annotated_dice(model: SegmentationModel | ModelEnsemble, images: Sequence[np.ndarray],
                    labels: Sequence[np.ndarray], numbers: Sequence[int], sub: _Subject, st: StageSettings,
                    dev: torch.device, prior: AtlasPrior | None = None) -> float:
    """Mean Dice over areas of the model on the annotated sections (in memory), predicted as the
    sections are (the same window and test-time flips, and the atlas prior added to the scores)."""
    from .prediction import SlidingWindow, predict_array
    from .prior import prior_predictor

    scores: dict[str, list[float]] = {}
    grids = prior.section_grids(numbers) if prior is not None else {}
    for img, ann, n in zip(images, labels, numbers, strict=True):
        predictor: Any = model
        if model.section_values:
            model.set_section_values(_section_values(sub, [n], model.section_values)[0])
        if st.positions:
            grey = img[:-3]
            frame = _frame_of_array(grey)
            predictor = _positioned_predictor(model, frame, float(img[-1, 0, 0]))
            img = grey
        if prior is not None:
            predictor = prior_predictor(predictor, grids.get(int(n)), prior.step_px)
        window = SlidingWindow(roi_size=st.window_size, overlap=st.overlap, batch_size=st.predict_batch)
        logits = predict_array(img, predictor, window=window, device=dev, tta=st.tta)
        _add_annotation_dice(np.asarray(logits).argmax(0), ann, sub, scores)
    return _mean_area_dice(scores)


def _stored_annotated_dice(stores: Sequence[Path], labels: Sequence[np.ndarray], sub: _Subject) -> float:
    """:func:`_annotated_dice` of the stored predictions of the annotated sections (the labels
    :func:`~.prediction.predict_file` wrote: the class of highest probability, the first on ties)."""
    from .prediction import open_prediction

    scores: dict[str, list[float]] = {}
    for store, ann in zip(stores, labels, strict=True):
        pred, _, _ = open_prediction(store)
        _add_annotation_dice(np.asarray(pred[...]), ann, sub, scores)
    return _mean_area_dice(scores)


def _add_annotation_dice(pred: np.ndarray, ann: np.ndarray, sub: _Subject,
                         scores: dict[str, list[float]]) -> None:
    """Append each area's Dice of the class indices ``pred`` against annotation ``ann`` (label
    values) to ``scores`` (areas the annotation does not show are left out)."""
    index = {c: i for i, c in enumerate(sub.classes)}
    target = np.full(ann.shape, -1, np.int64)
    for v, k in sub.mapping.items():
        if k is not None:
            target[ann == v] = index[k]
    for c, key in enumerate(sub.classes):
        if key == BACKGROUND:
            continue
        p, t = pred == c, target == c
        d = int(p.sum() + t.sum())
        if t.any():
            scores.setdefault(key, []).append(2 * float((p & t).sum()) / d)


def _mean_area_dice(scores: Mapping[str, Sequence[float]]) -> float:
    return float(np.mean([np.mean(v) for v in scores.values()])) if scores else math.nan


def _read_info(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / "segmentation.json"
    if not path.is_file():
        raise MissingFileError(path, "segmentation result (run segment_subject first)")
    try:
        return dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc


def _annotation_ids(info: dict[str, Any], path: Path) -> np.ndarray:
    """An annotated section's expert labels as region ids (uint16, 0 = none)."""
    values = {int(v): int(r) for v, r in info["label_values"].items()}
    ann = _read_labels(path)
    keys = np.array(sorted(values), np.int64)
    ids = np.array([values[k] for k in keys], np.uint16)
    pos = np.clip(np.searchsorted(keys, ann.astype(np.int64)), 0, len(keys) - 1)
    return np.where(keys[pos] == ann, ids[pos], 0).astype(np.uint16)


def load_section_labels(out_dir: str | os.PathLike[str]) -> dict[int, np.ndarray]:
    """Region-id label image (uint16, 0 = none) of every section of a segmented brain.

    Annotated sections return their expert labels (mapped to region ids), the others the
    prediction's most probable class (the next most probable where that is an area the brain's
    ``min_area_mm3`` dropped: ``"dropped_areas"`` in ``segmentation.json``).

    Raises
    ------
    MissingFileError
        ``out_dir`` holds no complete segmentation.
    """
    from .prediction import open_prediction

    out = Path(out_dir)
    info = _read_info(out)
    lut = np.array([c["region_id"] for c in info["classes"]], np.uint16)
    dropped = _dropped_indices(info)
    result: dict[int, np.ndarray] = {}
    for rec in info["sections"]:
        if rec.get("labels_from") == "annotation":
            lab = _annotation_ids(info, Path(rec["annotation"]))
        else:
            labels, probs, _ = open_prediction(out / rec["prediction"])
            lab = lut[_relabel(labels, probs, dropped)]
        result[int(rec["number"])] = lab
    return result


def load_area_probabilities(out_dir: str | os.PathLike[str]
                            ) -> tuple[list[str], dict[int, np.ndarray]]:
    """The areas' probabilities on every section of a segmented brain, for soft aggregation.

    Returns ``(keys, maps)``: the area classes' keys (the hierarchy's leaf keys; background and
    other classes without a region are left out) and, per section number, a ``(K, H, W)`` uint8
    percent array in that order. Annotated sections give their expert labels (100 % in the
    labelled area, 0 elsewhere), as :func:`load_section_labels` does; the others the CNN's
    probabilities (0 for an area ``min_area_mm3`` dropped). Raises what
    :func:`load_section_labels` raises.
    """
    from .prediction import open_prediction

    out = Path(out_dir)
    info = _read_info(out)
    areas = [c for c in info["classes"] if int(c["region_id"]) != 0]
    index = np.array([int(c["index"]) for c in areas], np.int64)
    ids = np.array([int(c["region_id"]) for c in areas], np.uint16)
    dropped = _dropped_indices(info)
    result: dict[int, np.ndarray] = {}
    for rec in info["sections"]:
        if rec.get("labels_from") == "annotation":
            lab = _annotation_ids(info, Path(rec["annotation"]))
            maps = (lab[None] == ids[:, None, None]).astype(np.uint8) * np.uint8(100)
        else:
            _, probs, _ = open_prediction(out / rec["prediction"])
            maps = np.asarray(probs[...], dtype=np.uint8)[index]
            maps[np.isin(index, dropped)] = 0
        result[int(rec["number"])] = maps
    return [str(c["key"]) for c in areas], result


def load_section_probabilities(out_dir: str | os.PathLike[str], number: int) -> tuple[list[str], np.ndarray]:
    """``(keys, probabilities)`` of one section: class keys and ``(K, H, W)`` uint8 percent (0 for
    an area ``min_area_mm3`` dropped).

    Raises
    ------
    MissingFileError
        No complete segmentation in ``out_dir``.
    InputError
        No section with that number.
    """
    from .prediction import open_prediction

    out = Path(out_dir)
    info = _read_info(out)
    for rec in info["sections"]:
        if int(rec["number"]) == int(number):
            _, probs, _ = open_prediction(out / rec["prediction"])
            p = np.asarray(probs[...])
            p[_dropped_indices(info)] = 0
            return [c["key"] for c in info["classes"]], p
    raise InputError(f"{out / 'segmentation.json'}: no section number {number} "
                     f"(have {[r['number'] for r in info['sections']][:10]}...)")


def segment(manifest_path: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None, *,
            subjects: Sequence[str] | None = None, device: str = "auto", quick: bool = False,
            settings: StageSettings | None = None, progress: bool = True) -> Path:
    """``atlasbuilder segment``: segment the brains of a manifest into ``output_dir/<subject>/``.

    A synthetic manifest is first generated (or taken from the cache), as the build does.
    Protocol ``auto``/``transfer`` trains ``cohort_models`` cohort models on all brains'
    annotations, one after the other from the seeds 0, 1, ... (``output_dir/cohort_model.pt``,
    ``cohort_model-2.pt``, ...; each reused while the annotations and training settings are those
    it was trained on, see its ``.json``), which map every brain together (after a fine-tuning
    per brain if ``transfer_iterations`` asks for one); a brain's complete output is reused while
    its settings and inputs are unchanged.

    Parameters
    ----------
    manifest_path
        The manifest.
    output_dir
        Where to write (default ``./<atlas name>-segmentation``).
    subjects
        Only these brains (default: all).
    device
        ``"cpu"``, ``"cuda[:N]"`` or ``"auto"`` (the manifest's ``stages.segmentation.device``;
        CUDA when available).
    quick
        The quick settings and (for a synthetic manifest) the quick demo cohort.
    settings
        :class:`StageSettings` instead of the manifest's.
    progress
        Progress bars.

    Returns
    -------
    pathlib.Path
        ``output_dir``.
    """
    m = _manifest(manifest_path)
    if m.is_synthetic:
        from ..manifest import load_manifest
        from ..synthetic.cohort import CohortSettings, cached_cohort

        syn = m.synthetic
        assert syn is not None
        cs = CohortSettings(subjects=syn.subjects, seed=m.seed, areas=tuple(m.areas),
                            annotated_sections=syn.annotated_sections, reference_brain=syn.reference_brain)
        if quick or m.is_quick:
            cs = cs.quick()
        path, _ = cached_cohort(cs, progress=progress)
        data = load_manifest(path)
        st = settings or settings_from_manifest(m.quick() if (quick or m.is_quick) else m)
    else:
        data = m
        st = settings or settings_from_manifest(m)
    if m.prior_atlas or (m.synthetic is not None and m.synthetic.prior_atlas):
        log.warning("%s: the atlas prior needs every brain's sections placed and registered first, "
                    "which `atlasbuilder build` does; `segment` maps the areas without it",
                    m.path)
    if device == "auto":
        device = _auto_device(str(m.stages.segmentation.device))
    out = Path(output_dir) if output_dir is not None else Path.cwd() / f"{m.atlas.name}-segmentation"
    ids = [s.id for s in data.subjects] if not subjects else list(subjects)
    for sid in ids:
        data.subject(sid)  # unknown ids fail before any work
    init: list[Path] | None = None
    if st.protocol in ("auto", "transfer"):
        # cohort_models models, from the seeds 0, 1, ..., one after the other
        init = [out / ("cohort_model.pt" if i == 0 else f"cohort_model-{i + 1}.pt")
                for i in range(st.cohort_models)]
        for seed, ckpt in enumerate(init):
            # reused while every brain's annotations and the training settings are the same
            sidecar = ckpt.with_suffix(".json")
            want = {"inputs_key": _cohort_key(data, st), "seed": seed}
            if seed == 0:  # as written before there were several
                want = {"inputs_key": want["inputs_key"]}
            if not ckpt.is_file() or _json_or_none(sidecar) != want:
                if ckpt.is_file():
                    log.info("%s: annotations or settings changed since it was trained: retraining", ckpt)
                train_cohort_model(data, ckpt, settings=st, device=device, seed=seed, progress=progress)
                atomic_write_text(sidecar, json.dumps(want, indent=1))
    for sid in ids:
        segment_subject(data, sid, out / sid, init_checkpoint=init, settings=st, device=device,
                        progress=progress)
    return out


def _cohort_key(m: Manifest, st: StageSettings) -> str:
    """What a cohort model learns from: every brain's inputs (see :func:`_inputs_key`) and the
    settings that shape training (the prediction window and CPU threads do not)."""
    from ..execution import content_key

    train = {k: v for k, v in _run_settings(st.as_dict()).items()
             if k not in ("tile", "prior_weight", "cohort_models")}
    return content_key(train, {s.id: _inputs_key(_subject(m, s.id), None, 0) for s in m.subjects})


def _auto_device(setting: str) -> str:
    if setting and setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"

