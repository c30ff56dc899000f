"""NIfTI bundle: nibabel round trips, label tables, and what nilearn / FSL-XML readers see."""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET

import nibabel as nib
import numpy as np
import pytest
from conftest import make_small_atlas_files

from atlasbuilder.atlas import load_atlas
from atlasbuilder.errors import AtlasDirectoryError, OutputExistsError
from atlasbuilder.export.nifti import export_nifti, read_label_table
from atlasbuilder.importing import import_atlas


@pytest.fixture
def small_atlas(tmp_path):
    pm, labels = make_small_atlas_files(tmp_path)
    return import_atlas(pm, labels, tmp_path / "a", space="MNI152NLin6Asym")


def test_bundle_layout_and_round_trip(small_atlas, tmp_path):
    src = nib.load(tmp_path / "pmaps.nii.gz")  # LAS, uint8 percent
    out = export_nifti(small_atlas)
    assert out == (small_atlas / "maps").absolute()
    d = out / "MNI152NLin6Asym"
    atlas = load_atlas(small_atlas)
    keys = [r.key for r in atlas.map_regions()]
    assert sorted(p.name for p in (d / "pmaps").iterdir()) == sorted(f"{k}.nii.gz" for k in keys)
    # every exported map, resampled back to the source's voxel order, equals source / 100
    src_data = np.asarray(src.dataobj)
    for i, key in enumerate(keys):
        img = nib.load(d / "pmaps" / f"{key}.nii.gz")
        assert img.get_data_dtype() == np.float32
        back = nib.as_closest_canonical(img)  # already RAS; the affine maps voxels to mm
        # world position of source voxel (i, j, k) -> exported voxel
        ijk = np.argwhere(np.ones(src.shape[:3], bool))
        world = nib.affines.apply_affine(src.affine, ijk)
        vox = np.rint(nib.affines.apply_affine(np.linalg.inv(back.affine), world)).astype(int)
        got = np.asarray(back.dataobj)[tuple(vox.T)]
        want = src_data[..., i][tuple(ijk.T)].astype(np.float32) / np.float32(100)
        np.testing.assert_array_equal(got, want)
    four = nib.load(d / "pmaps.nii.gz")
    assert four.shape == (*atlas.space_maps().grid.shape, len(keys))
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(np.asarray(four.dataobj)[..., i],
                                      np.asarray(nib.load(d / "pmaps" / f"{key}.nii.gz").dataobj))
    assert read_label_table(d / "pmaps.tsv") == {r.id: r.key for r in atlas.map_regions()}
    # the 4-D volume order is the TSV's row order
    rows = (d / "pmaps.tsv").read_text().splitlines()
    assert rows[0] == "volume\tindex\tkey\tname"
    assert [r.split("\t")[2] for r in rows[1:]] == keys
    # the MPM is the stored one, with qform = sform, mm units and the label intent
    mpm = nib.load(d / "mpm.nii.gz")
    np.testing.assert_array_equal(np.asarray(mpm.dataobj), atlas.mpm().values)
    assert mpm.header["intent_code"] == nib.nifti1.intent_codes["label"]
    np.testing.assert_allclose(mpm.get_qform(), mpm.get_sform())
    assert mpm.header.get_xyzt_units()[0] == "mm"
    head = (d / "mpm.tsv").read_text().splitlines()[0]
    assert head == "index\tkey\tname"


def test_query_agrees_with_exported_maps(small_atlas):
    """Atlas.query and the NIfTI files give the same probability at the same mm point."""
    atlas = load_atlas(small_atlas)
    d = export_nifti(small_atlas) / "MNI152NLin6Asym"
    rng = np.random.default_rng(3)
    grid = atlas.space_maps().grid
    ijk = rng.integers(0, grid.shape, size=(25, 3))
    pts = nib.affines.apply_affine(grid.affine, ijk) + rng.uniform(-0.4, 0.4, size=(25, 3))
    probs = atlas.probabilities_at(pts)
    for key in probs["key"].values:
        img = nib.load(d / "pmaps" / f"{key}.nii.gz")
        vox = np.floor(nib.affines.apply_affine(np.linalg.inv(img.affine), pts) + 0.5).astype(int)
        got = np.asarray(img.dataobj)[tuple(vox.T)]
        np.testing.assert_allclose(got, probs.sel(region=probs["region"][probs["key"] == key])
                                   .values.ravel(), rtol=1e-6)


def test_nilearn_and_fsl_xml_see_the_labels(small_atlas):
    from nilearn.maskers import NiftiLabelsMasker

    atlas = load_atlas(small_atlas)
    d = export_nifti(small_atlas) / "MNI152NLin6Asym"
    regions = atlas.map_regions()
    # FSL XML: a Label atlas whose index is the voxel value, with a voxel inside each label
    root = ET.parse(d / "mpm.xml").getroot()
    assert root.tag == "atlas" and root.findtext("header/type") == "Label"
    assert root.findtext("header/images/imagefile") == "/mpm"
    labels = {int(el.get("index")): el.text for el in root.iter("label")}
    assert labels == {r.id: r.name for r in regions}
    mpm = np.asarray(nib.load(d / "mpm.nii.gz").dataobj)
    for el in root.iter("label"):
        xyz = tuple(int(el.get(a)) for a in "xyz")
        if (mpm == int(el.get("index"))).any():
            assert mpm[xyz] == int(el.get("index")), el.text
    # the importer's own FSL-XML reader reads the same table back
    from atlasbuilder.importing import read_label_table as read_labels

    table = read_labels(d / "mpm.xml")
    assert dict(zip(table.indices, table.names, strict=True)) == labels
    # nilearn: the labels masker finds exactly the MPM's labels and averages per label
    masker = NiftiLabelsMasker(str(d / "mpm.nii.gz"), standardize=None)
    signal = masker.fit_transform(str(d / "mpm.nii.gz"))
    present = sorted(set(np.unique(mpm).tolist()) - {0})
    np.testing.assert_allclose(signal.ravel(), present)


def test_export_is_deterministic_and_replaces(small_atlas, tmp_path):
    a = export_nifti(small_atlas, tmp_path / "one")
    b = export_nifti(small_atlas, tmp_path / "one")  # replaces in place
    c = export_nifti(small_atlas, tmp_path / "two")
    assert a == b
    for p in (a / "MNI152NLin6Asym").rglob("*.gz"):
        q = c / p.relative_to(a)
        assert p.read_bytes() == q.read_bytes(), p.name
        gzip.decompress(p.read_bytes())  # valid gzip


def test_errors_name_the_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtlasDirectoryError, match="empty"):
        export_nifti(tmp_path / "empty")


def test_refuses_to_replace_a_foreign_folder(small_atlas, tmp_path):
    foreign = tmp_path / "documents"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="not written by an atlasbuilder"):
        export_nifti(small_atlas, foreign)
    assert (foreign / "thesis.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    assert export_nifti(small_atlas, tmp_path / "empty").is_dir()  # an empty folder is fine
