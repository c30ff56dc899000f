"""Segmentation: map cortical areas in every histological section of a brain (torch lives here only).

- :mod:`.prediction` — the sliding-window engine. It knows nothing of the model: any callable that
  maps a ``(B, C, h, w)`` tensor to ``(B, K, h, w)`` scores. Sections of any size are read, blended
  and written tile-row by tile-row, so peak memory does not grow with the section.
- :mod:`.networks` — a compact 2-D U-Net with optional prior channels and a coarse context branch.
- :mod:`.data` — checked annotated sections, class-balanced patches, augmentation.
- :mod:`.training` — training with early stopping, checkpoints, fine-tuning.
- :mod:`.pretraining` — self-supervised pretraining (masked inpainting) on unannotated sections.
- :mod:`.prior` — the atlas prior: an existing atlas's probabilities at each section pixel (placed
  through the brain's blockface and registration), added to the network's scores.
- :mod:`.stage` — the pipeline entry points: cohort model, per-brain training and prediction,
  readers of the stage's output (:func:`load_section_labels`, :func:`load_section_probabilities`,
  :func:`load_area_probabilities`).

Nothing is imported eagerly: ``import atlasbuilder.segmentation`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "predict_array": "prediction",
    "predict_file": "prediction",
    "predict_sections": "prediction",
    "open_prediction": "prediction",
    "importance_map": "prediction",
    "window_starts": "prediction",
    "SlidingWindow": "prediction",
    "UNet": "networks",
    "SegmentationModel": "training",
    "TrainingConfig": "training",
    "train": "training",
    "save_checkpoint": "training",
    "load_checkpoint": "training",
    "pretrain": "pretraining",
    "PretrainingConfig": "pretraining",
    "StageSettings": "stage",
    "train_cohort_model": "stage",
    "segment_subject": "stage",
    "segment": "stage",
    "load_section_labels": "stage",
    "load_section_probabilities": "stage",
    "load_area_probabilities": "stage",
    "settings_from_manifest": "stage",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
