"""Reconstruction: tiny synthetic stacks with known misplacements, exact checks of the stacking."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from atlasbuilder.errors import AtlasBuilderError, InputError, InvalidImageError, MissingFileError
from atlasbuilder.reconstruction import (
    _interp_labels,
    _sdt,
    load_reconstruction,
    reconstruct,
)
from atlasbuilder.synthetic.sections import write_tiff

PX = 0.2  # section pixel (mm)
SHAPE = (200, 200)  # section rows, cols: 40 mm field
X0, Z0 = -20.0, 20.0  # mm of the clean section's column 0 / row 0
THICK_UM, SPACING = 100.0, 10  # section distance 1 mm
N_SEC = 6
NUMBERS = [1 + k * SPACING for k in range(N_SEC)]
MOVES = {  # number -> (rotation deg, shift px (row, col))
    1: (4.0, (6.0, -9.0)), 11: (-3.0, (-8.0, 4.0)), 21: (1.5, (3.0, 12.0)),
    31: (-5.0, (10.0, 2.0)), 41: (2.5, (-5.0, -7.0)), 51: (0.0, (0.0, 0.0)),
}


def _phantom(x: np.ndarray, z: np.ndarray, y: float) -> np.ndarray:
    """0 background, 1 grey matter (x < 0), 2 grey matter (x >= 0), 3 white matter."""
    s = 1.0 + 0.04 * y
    body = ((x - 1) / (14 * s)) ** 2 + (z / (10 * s)) ** 2 <= 1
    bump = (x - 9) ** 2 + (z - 9) ** 2 <= 25
    notch = (x + 6) ** 2 + (z + 9) ** 2 <= 9
    tissue = (body | bump) & ~notch
    wm = ((x + 2) / 6) ** 2 + ((z - 1) / 4) ** 2 <= 1
    out = np.where(tissue, np.where(x < 0, 1, 2), 0)
    return np.where(tissue & wm, 3, out)


def _load(path: Any) -> Any:
    img: Any = nib.load(path)
    return img.dataobj


def _y(n: int) -> float:
    return (n - 1) * THICK_UM / 1000.0


def _inverse(q: np.ndarray, rot_deg: float, shift: tuple[float, float]) -> np.ndarray:
    """Stored pixel -> clean pixel (rotation about the image centre + shift)."""
    c = (np.asarray(SHAPE, float) - 1) / 2
    th = np.deg2rad(rot_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    return (q - c - np.asarray(shift)) @ rot + c


def _true_mm(n: int, q: np.ndarray) -> np.ndarray:
    p = _inverse(q, *MOVES[n])
    return np.stack([X0 + p[:, 1] * PX, np.full(len(p), _y(n)), Z0 - p[:, 0] * PX], 1)


def _stored_classes(n: int) -> np.ndarray:
    rr, cc = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    q = np.stack([rr.ravel(), cc.ravel()], 1).astype(float)
    mm = _true_mm(n, q)
    return _phantom(mm[:, 0], mm[:, 2], _y(n)).reshape(SHAPE)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("stack")
    files, labels = {}, {}
    stain = np.array([240, 70, 70, 185], dtype=np.float32)  # slide, grey, grey, white matter
    for n in NUMBERS:
        cls = _stored_classes(n)
        img = stain[cls]
        rng = np.random.default_rng(n)
        img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        files[n] = root / f"S_s{n:04d}.tif"
        write_tiff(files[n], img, PX)
        labels[n] = np.where(cls == 3, 0, np.where(cls > 0, 80 + cls, 0)).astype(np.uint16)
    # blockface: 0.5 mm in-plane, slice k at section 1 + k*SPACING, MRI-like contrast
    bx = np.arange(-22.0, 22.01, 0.5)
    bz = np.arange(-22.0, 22.01, 0.5)
    ys = [_y(n) for n in NUMBERS]
    mri = np.array([0, 110, 110, 220], dtype=np.uint8)
    xx, zz = np.meshgrid(bx, bz, indexing="ij")
    vol = np.stack([mri[_phantom(xx, zz, y)] for y in ys], axis=1)  # (x, y, z)
    aff = np.diag([0.5, THICK_UM / 1000 * SPACING, 0.5, 1.0])
    aff[:3, 3] = [bx[0], ys[0], bz[0]]
    ref = root / "blockface.nii.gz"
    nib.save(nib.Nifti1Image(vol, aff), ref)
    return {"root": root, "files": files, "labels": labels, "reference": ref}


def _common(stack: dict) -> dict:
    return dict(pixel_size_um=PX * 1000, thickness_um=THICK_UM, spacing=SPACING, progress=False,
                space="subject:T")


@pytest.fixture(scope="module")
def rec_ref(stack: dict, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("rec") / "r"
    files = {n: p for n, p in stack["files"].items() if n != 31}  # 31 is lost
    labels = {n: stack["labels"][n] for n in files}
    return reconstruct(files, out, reference=stack["reference"], labels=labels, missing=[31],
                       **_common(stack))


def _tissue_pixels(n: int) -> np.ndarray:
    return np.argwhere(_stored_classes(n) > 0)[::7].astype(float)


def test_recovers_known_misplacements_with_reference(rec_ref) -> None:
    for n in NUMBERS:
        if n == 31:
            continue
        q = _tissue_pixels(n)
        mine = rec_ref.section_to_mm(n, q[:, 0], q[:, 1])
        err = np.linalg.norm(mine - _true_mm(n, q), axis=1)
        # well under one 0.5 mm voxel of the grid (a wrong rotation sign or shift would be mm off)
        assert np.median(err) < 0.15, (n, np.median(err))
        assert err.max() < 0.4, (n, err.max())
        assert rec_ref.sections[n].status == "ok"
        assert rec_ref.sections[n].residual < 0.1


def test_missing_section_is_filled_and_recorded(rec_ref) -> None:
    assert rec_ref.sections[31].status == "missing" and rec_ref.sections[31].matrix is None
    lab = np.asarray(_load(rec_ref.labels_path))
    img = np.asarray(_load(rec_ref.image_path))
    j = round((_y(31) - rec_ref.grid.origin[1]) / rec_ref.grid.spacing[1])
    gx, gz = np.meshgrid(rec_ref.grid.coords()["x"], rec_ref.grid.coords()["z"], indexing="ij")
    truth = _phantom(gx, gz, _y(31))
    want = np.where(truth == 3, 0, np.where(truth > 0, 80 + truth, 0))
    assert np.mean(lab[:, j, :] == want) > 0.97
    assert img[:, j, :][truth > 0].mean() > 4 * max(img[:, j, :][truth == 0].mean(), 1)


def test_labels_on_section_planes_match_truth(rec_ref) -> None:
    lab = np.asarray(_load(rec_ref.labels_path))
    assert lab.dtype == np.uint16
    xs, zs = rec_ref.grid.coords()["x"], rec_ref.grid.coords()["z"]
    for n in (1, 21, 51):
        j = round((_y(n) - rec_ref.grid.origin[1]) / rec_ref.grid.spacing[1])
        gx, gz = np.meshgrid(xs, zs, indexing="ij")
        truth = _phantom(gx, gz, _y(n))
        want = np.where(truth == 3, 0, np.where(truth > 0, 80 + truth, 0))
        for v in (81, 82):
            a, b = lab[:, j, :] == v, want == v
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95


def test_section_at_inverts_section_to_mm(rec_ref) -> None:
    rows, cols = np.array([10.0, 100.5, 150.0]), np.array([20.0, 99.0, 180.25])
    mm = rec_ref.section_to_mm(21, rows, cols)
    back = rec_ref.section_at(mm)
    np.testing.assert_allclose(back, np.stack([np.full(3, 21.0), rows, cols], 1), atol=1e-9)
    # 0.4 mm off the plane is still section 21 (sections are 1 mm apart); far away is outside
    off = mm + np.array([0.0, 0.4, 0.0])
    assert np.all(rec_ref.section_at(off)[:, 0] == 21)
    out = rec_ref.section_at([[0.0, 50.0, 0.0], [500.0, _y(21), 0.0]])
    assert np.isnan(out).all()
    # the missing section's plane belongs to nobody within half a spacing... but its neighbours are 1 mm away
    got = rec_ref.section_at([[0.0, _y(31) + 0.1, 0.0]])
    assert np.isnan(got).all()
    with pytest.raises(InputError, match="section 31"):
        rec_ref.section_to_mm(31, [0], [0])


def test_outputs_and_rerun(rec_ref, stack: dict) -> None:
    d = rec_ref.directory
    doc = json.loads((d / "reconstruction.json").read_text())
    assert [s["number"] for s in doc["sections"]] == NUMBERS
    assert (d / "qa.png").stat().st_size > 1000
    img: Any = nib.load(d / "image.nii.gz")
    np.testing.assert_allclose(np.diag(img.affine)[:3], np.full(3, 0.5))
    again = load_reconstruction(d)
    assert again.grid == rec_ref.grid
    np.testing.assert_allclose(np.asarray(again.sections[11].matrix), np.asarray(rec_ref.sections[11].matrix))
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    files = {n: p for n, p in stack["files"].items() if n != 31}
    rerun = reconstruct(files, d, reference=stack["reference"], missing=[31],
                        labels={n: stack["labels"][n] for n in files}, **_common(stack))
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before
    np.testing.assert_allclose(np.asarray(rerun.sections[41].matrix), np.asarray(rec_ref.sections[41].matrix))


def test_without_reference_aligns_to_the_middle_section(stack: dict, tmp_path: Path) -> None:
    rec = reconstruct(stack["files"], tmp_path / "r", **_common(stack))
    mid = NUMBERS[len(NUMBERS) // 2]
    # the frame is the middle section's: compare every section's map with the middle one's,
    # through the true clean-section coordinates (the phantom changes little between sections)
    c = (np.asarray(SHAPE, float) - 1) / 2
    th = np.deg2rad(MOVES[mid][0])
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    for n in NUMBERS:
        q = _tissue_pixels(n)
        p = _inverse(q, *MOVES[n])
        q_mid = (p - c) @ rot.T + c + np.asarray(MOVES[mid][1])  # clean -> stored middle section
        want = rec.section_to_mm(mid, q_mid[:, 0], q_mid[:, 1])
        got = rec.section_to_mm(n, q[:, 0], q[:, 1])
        err = np.linalg.norm(got[:, [0, 2]] - want[:, [0, 2]], axis=1)
        assert np.median(err) < 0.3, (n, np.median(err))
    assert np.allclose(np.diff([rec.sections[n].y_mm for n in NUMBERS]), 1.0)


def test_shape_based_interpolation_of_discs() -> None:
    yy, xx = np.mgrid[0:101, 0:101]
    r = np.hypot(yy - 50, xx - 50)
    a = {7: _sdt(r <= 10, 1.0)}
    b = {7: _sdt(r <= 30, 1.0)}
    for w, want in ((0.0, 10), (0.5, 20), (0.25, 15), (1.0, 30)):
        got = _interp_labels(a, b, w, r.shape)
        radius = np.sqrt((got == 7).sum() / np.pi)
        assert abs(radius - want) < 0.8, (w, radius)
    # a label only on one side shrinks away instead of appearing as a copy
    got = _interp_labels(a, {}, 0.5, r.shape)
    assert not (got == 7).any()
    # two touching labels keep their boundary
    left, right = xx < 50, xx >= 50
    sd = {1: _sdt(left, 1.0), 2: _sdt(right, 1.0)}
    np.testing.assert_array_equal(_interp_labels(sd, sd, 0.3, r.shape), np.where(left, 1, 2))


def test_area_keeping_interpolation_of_a_shifted_ribbon() -> None:
    """A curved ribbon (a cortical area) lies 6 px lower in the next section: the signed
    distances' average shrinks it midway (more than half of it is lost); keeping the area grows
    it back to the mean of the two areas, closer to the true ribbon midway, and leaves alone
    what does not shrink and the sections' own planes."""
    yy, xx = np.mgrid[0:100, 0:100]

    def arc(cy: int) -> np.ndarray:
        r = np.hypot(yy - cy, xx - 50)
        return (r >= 30) & (r < 34) & (yy < cy)

    other = (xx < 8) & (yy > 80)  # a second label, far away and the same in both sections
    a = {3: _sdt(arc(60), 1.0), 5: _sdt(other, 1.0)}
    b = {3: _sdt(arc(66), 1.0), 5: _sdt(other, 1.0)}
    plain = _interp_labels(a, b, 0.5, xx.shape)
    kept = _interp_labels(a, b, 0.5, xx.shape, grow_mm=3.0)
    want = arc(60).sum()
    assert (plain == 3).sum() < 0.5 * want
    assert abs(int((kept == 3).sum()) - want) <= 0.03 * want
    np.testing.assert_array_equal(kept == 3, (kept == 3) | (plain == 3))  # grows, never moves

    def dice(x: np.ndarray, y: np.ndarray) -> float:
        return 2 * float((x & y).sum()) / float(x.sum() + y.sum())

    assert dice(kept == 3, arc(63)) > dice(plain == 3, arc(63)) + 0.15  # 0.73 against 0.55
    np.testing.assert_array_equal(kept == 5, other)
    # the growth is capped, and a section's own plane is left as it is
    capped = _interp_labels(a, b, 0.5, xx.shape, grow_mm=0.5)
    assert (plain == 3).sum() < (capped == 3).sum() < (kept == 3).sum()
    np.testing.assert_array_equal(_interp_labels(a, b, 0.0, xx.shape, grow_mm=3.0),
                                  _interp_labels(a, b, 0.0, xx.shape))


def test_probabilities_interpolate_linearly(stack: dict, tmp_path: Path) -> None:
    files = {n: stack["files"][n] for n in (1, 11)}
    probs = {1: np.full((1, *SHAPE), 100, np.uint8), 11: np.zeros((1, *SHAPE), np.uint8)}
    rec = reconstruct(files, tmp_path / "p", reference=stack["reference"], probabilities=probs,
                      probability_keys=["hOc1_left"], alignment="none", refine_mi=False, **_common(stack))
    vol = np.asarray(_load(rec.probabilities_path))
    assert vol.shape == (*rec.grid.shape, 1)
    ny = rec.grid.shape[1]
    assert ny == 3  # 1 mm at 0.5 mm voxels
    centre = vol[vol.shape[0] // 2, :, vol.shape[2] // 2, 0]
    np.testing.assert_array_equal(centre, [100, 50, 0])


def test_bad_inputs_name_the_file(stack: dict, tmp_path: Path) -> None:
    files = dict(stack["files"])
    common = _common(stack)
    wrong = tmp_path / "S_s0001.tif"
    write_tiff(wrong, np.full(SHAPE, 240, np.uint8), 0.4)
    with pytest.raises(InvalidImageError, match="S_s0001.tif.*pixel size 400"):
        reconstruct({**files, 1: wrong}, tmp_path / "a", reference=stack["reference"], **common)
    bad_lab = {11: np.zeros((10, 10), np.uint16)}
    with pytest.raises(InvalidImageError, match="section 11.*S_s0011.tif"):
        reconstruct(files, tmp_path / "b", reference=stack["reference"], labels=bad_lab, **common)
    with pytest.raises(MissingFileError, match="nowhere.nii.gz"):
        reconstruct(files, tmp_path / "c", reference=tmp_path / "nowhere.nii.gz", **common)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5), np.uint8), np.eye(4)), flat)
    with pytest.raises(InvalidImageError, match="flat.nii.gz.*3-D"):
        reconstruct(files, tmp_path / "d", reference=flat, **common)
    with pytest.raises(InputError, match=r"labels given for section\(s\) \[999\]"):
        reconstruct(files, tmp_path / "e", labels={999: np.zeros(SHAPE)}, **common)
    with pytest.raises(InputError, match="alignment"):
        reconstruct(files, tmp_path / "f", alignment="elastic", **common)  # type: ignore[arg-type]
    with pytest.raises(MissingFileError, match="reconstruction.json"):
        load_reconstruction(tmp_path / "none")
    assert issubclass(InvalidImageError, AtlasBuilderError)
    assert not os.path.exists(tmp_path / "a" / "reconstruction.json")


def test_affine_recovers_a_wrong_shrinkage_and_is_deterministic(stack: dict, tmp_path: Path) -> None:
    files = {n: stack["files"][n] for n in (11, 21)}
    common = {**_common(stack), "shrinkage": 1.06}  # the sections did not shrink: 6 % too large
    errs = {}
    for alignment in ("rigid", "affine"):
        rec = reconstruct(files, tmp_path / alignment, reference=stack["reference"], alignment=alignment,
                          **common)
        q = _tissue_pixels(21)
        errs[alignment] = np.linalg.norm(rec.section_to_mm(21, q[:, 0], q[:, 1]) - _true_mm(21, q), axis=1)
    assert np.median(errs["affine"]) < 0.2
    assert np.percentile(errs["rigid"], 90) > 2 * np.percentile(errs["affine"], 90)
    again = reconstruct(files, tmp_path / "again", reference=stack["reference"], alignment="affine", **common)
    np.testing.assert_array_equal(np.asarray(again.sections[21].matrix), np.asarray(rec.sections[21].matrix))


def test_tear_in_labels_is_closed() -> None:
    from atlasbuilder.reconstruction import _close_tears

    lab = np.zeros((60, 60), np.uint16)
    lab[10:50, 10:30] = 81
    lab[10:50, 30:50] = 82
    torn = lab.copy()
    torn[29:32, 5:55] = 0  # a 0.6 mm gap across both areas
    fixed = _close_tears(torn, PX)
    gap = (torn == 0) & (lab > 0)
    assert np.mean(fixed[gap] == lab[gap]) >= 0.9  # (pixels on the areas' outer edges may stay open)
    np.testing.assert_array_equal(fixed[~gap], lab[~gap])


def test_reused_alignment_and_grey_matter_guided_labels(rec_ref, stack: dict, tmp_path: Path) -> None:
    files = {n: p for n, p in stack["files"].items() if n != 31}
    labels = {n: stack["labels"][n] for n in (1, 21, 41, 51)}  # 11 has an image but no labels
    rec = reconstruct(files, tmp_path / "g", reference=stack["reference"], labels=labels, missing=[31],
                      alignment_from=rec_ref.directory, **_common(stack))
    for n in files:
        np.testing.assert_array_equal(np.asarray(rec.sections[n].matrix),
                                      np.asarray(rec_ref.sections[n].matrix))
    lab = np.asarray(_load(rec.labels_path))
    gx, gz = np.meshgrid(rec.grid.coords()["x"], rec.grid.coords()["z"], indexing="ij")
    for n in (11, 31):  # unlabelled section (guided by its stain), missing one (by the blockface)
        j = round((_y(n) - rec.grid.origin[1]) / rec.grid.spacing[1])
        truth = _phantom(gx, gz, _y(n))
        want = np.where(truth == 3, 0, np.where(truth > 0, 80 + truth, 0))
        for v in (81, 82):
            a, b = lab[:, j, :] == v, want == v
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.93, (n, v)
        wm_core = _phantom(gx, gz, _y(n)) == 3
        assert (lab[:, j, :][wm_core] == 0).mean() > 0.95


def test_label_transfer_by_registration(rec_ref, stack: dict, tmp_path: Path) -> None:
    files = {n: p for n, p in stack["files"].items() if n in (1, 11, 21)}
    labels = {n: stack["labels"][n] for n in (1, 21)}
    rec = reconstruct(files, tmp_path / "w", reference=stack["reference"], labels=labels,
                      alignment_from=rec_ref.directory, label_transfer="register", **_common(stack))
    lab = np.asarray(_load(rec.labels_path))
    gx, gz = np.meshgrid(rec.grid.coords()["x"], rec.grid.coords()["z"], indexing="ij")
    j = round((_y(11) - rec.grid.origin[1]) / rec.grid.spacing[1])
    truth = _phantom(gx, gz, _y(11))
    want = np.where(truth == 3, 0, np.where(truth > 0, 80 + truth, 0))
    for v in (81, 82):
        a, b = lab[:, j, :] == v, want == v
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.93, v
