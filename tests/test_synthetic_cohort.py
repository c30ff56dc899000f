"""The demo cohort generator: files like real data, a manifest the build reads, consistent truth."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from atlasbuilder.manifest import load_manifest
from atlasbuilder.synthetic.cohort import CohortSettings, generate_cohort
from atlasbuilder.synthetic.histology import SectionTransform
from atlasbuilder.synthetic.sections import SectionGeometry, read_pixel_size_um

pytestmark = pytest.mark.slow

TINY = CohortSettings(subjects=2, section_spacing_mm=4.0, reference_spacing_mm=4.0,
                      reference_pixel_size_mm=0.2, workers=2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "demo"
    generate_cohort(out, TINY, contact_sheet=True)
    return out


def test_manifest_is_real_data_and_valid(cohort):
    m = load_manifest(cohort / "manifest.yaml")  # files checked too
    assert not m.is_synthetic
    assert [s.id for s in m.subjects] == ["B01", "B02"]
    assert m.spaces.reference == ["MNI152NLin2009cAsym", "BigBrain"]
    s = m.subjects[0]
    assert s.sections.pixel_size_um == 200 and s.sections.plane == "coronal"
    secs = m.section_files("B01")
    anns = m.annotation_files("B01")
    assert len(anns) == 2 and set(anns) <= set(secs)
    assert not set(s.sections.missing) & set(secs)
    assert set(s.annotations.labels.values()) <= {f"{a}_{h}" for a in TINY.areas
                                                   for h in ("left", "right")}
    assert (cohort / "contact_sheet.png").is_file()


def test_images_carry_pixel_size_and_label_values(cohort):
    m = load_manifest(cohort / "manifest.yaml")
    for sid in ("B01", "B02"):
        sec = next(iter(m.section_files(sid).values()))
        assert read_pixel_size_um(sec) == pytest.approx(200)
        img = tifffile.imread(sec)
        assert img.dtype == np.uint8 and img.ndim == 2
        for ann in m.annotation_files(sid).values():
            assert read_pixel_size_um(ann) == pytest.approx(200)
            lab = np.asarray(Image.open(ann))
            assert lab.shape == img.shape
            values = set(np.unique(lab).tolist()) - {0}
            assert values and values <= set(m.subject(sid).annotations.labels)


def test_areas_differ_by_texture_not_brightness(cohort):
    """Per-area mean intensity on the annotated sections within 5 % of the areas' mean.

    Each section is first divided by its own annotated mean: the stain drift along the stack
    (an artefact of the whole section) is not a difference between areas.
    """
    m = load_manifest(cohort / "manifest.yaml")
    sums: dict[int, list[float]] = {}
    for sid in ("B01", "B02"):
        secs = m.section_files(sid)
        for n, ann in m.annotation_files(sid).items():
            img = tifffile.imread(secs[n]).astype(float)
            lab = np.asarray(Image.open(ann))
            img /= img[lab > 0].mean()
            for v in np.unique(lab[lab > 0]):
                sel = lab == v
                if sel.sum() >= 400:
                    sums.setdefault(int(v), []).append(float(img[sel].mean()))
    means = np.array([np.mean(v) for v in sums.values()])
    assert len(means) >= 4
    assert np.abs(means / means.mean() - 1).max() <= 0.05


def test_truth_maps_are_the_cohort_frequency(cohort):
    t = cohort / "truth"
    labs = [np.asanyarray(nib.load(t / "subjects" / s / "labels_MNI152NLin2009cAsym.nii.gz").dataobj)
            for s in ("B01", "B02")]
    table = (t / "mpm" / "MNI152NLin2009cAsym.tsv").read_text().splitlines()
    assert table[0] == "index\tkey" and len(table) == 11
    for row in table[1:]:
        rid, key = row.split("\t")
        p = np.asanyarray(nib.load(t / "pmaps" / "MNI152NLin2009cAsym" / f"{key}.nii.gz").dataobj)
        np.testing.assert_array_equal(p, np.mean([lab == int(rid) for lab in labs], axis=0))
        assert (t / "pmaps" / "BigBrain" / f"{key}.nii.gz").is_file()
    for space in ("MNI152NLin2009cAsym", "BigBrain"):
        assert (t / "mpm" / f"{space}.nii.gz").is_file()
    assert "labels_subject.nii.gz" in (t / "README.md").read_text()


def test_section_placement_truth_maps_annotations_onto_subject_labels(cohort):
    """An annotated pixel, taken back through its section's true misplacement and the section
    geometry, lands on the same area in the brain's true 3-D labels."""
    m = load_manifest(cohort / "manifest.yaml")
    truth = cohort / "truth" / "subjects" / "B01"
    info = json.loads((truth / "sections.json").read_text())
    geom = SectionGeometry(info["geometry"]["x0_mm"], info["geometry"]["z0_mm"],
                           info["geometry"]["pixel_size_mm"], tuple(info["geometry"]["shape"]))
    img3d = nib.load(truth / "labels_subject.nii.gz")
    lab3d = np.asanyarray(img3d.dataobj)
    inv_aff = np.linalg.inv(img3d.affine)
    agree = []
    for n, ann_path in m.annotation_files("B01").items():
        rec = next(r for r in info["sections"] if r["number"] == n)
        ann = np.asarray(Image.open(ann_path))
        name = ann_path.stem
        tf = SectionTransform(shape=ann.shape, pixel_size_mm=geom.pixel_size_mm,
                              rotation_deg=rec["rotation_deg"], shift_px=tuple(rec["shift_px"]),
                              spacing_px=rec["distortion_spacing_px"],
                              control_px=np.load(truth / "distortions" / f"{name}.npy").astype(float))
        q = np.argwhere(ann > 0)
        clean = tf.inverse(q.astype(float))
        mm = geom.pixel_to_mm(clean[:, 0], clean[:, 1], rec["y_mm"])
        ijk = np.rint(mm @ inv_aff[:3, :3].T + inv_aff[:3, 3]).astype(int)
        agree.append(np.mean(lab3d[tuple(ijk.T)] == ann[tuple(q.T)]))
    assert min(agree) > 0.7, agree


def test_generation_is_deterministic(tmp_path):
    s = replace(TINY, subjects=1, reference_brain=False, section_spacing_mm=8.0, workers=1)

    def digest(d: Path) -> dict[str, str]:
        return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(d.rglob("*")) if p.is_file() and p.name != "cohort.json"}

    generate_cohort(tmp_path / "a", s)
    generate_cohort(tmp_path / "b", s)
    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert da == db and len(da) > 5
    generate_cohort(tmp_path / "c", replace(s, seed=1))
    assert digest(tmp_path / "c") != da
