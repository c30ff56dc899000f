"""Tests for atlasbuilder.volumes: NIfTI in, checked RAS+ xarray volumes out, and grids.

Every fixture is synthetic with a known answer: voxel values are unique (``arange``) so any
misplaced voxel shows, and rotated images hold a linear function of the mm position, which
trilinear resampling reproduces exactly.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xarray as xr

from atlasbuilder.errors import (
    GridMismatchError,
    InputError,
    InvalidImageError,
    MissingFileError,
)
from atlasbuilder.volumes import (
    Grid,
    check_same_grid,
    from_array,
    grid_of,
    load_nifti,
    nearest_voxel,
    read_nifti,
    to_nifti,
)

# The reference volume: RAS+, anisotropic voxels, unique values.
REF_SHAPE = (3, 4, 5)
REF_SPACING = (2.0, 3.0, 1.5)
REF_ORIGIN = (-4.0, 10.0, -3.0)
REF_DATA = np.arange(np.prod(REF_SHAPE), dtype=np.float32).reshape(REF_SHAPE)


def ref_affine() -> np.ndarray:
    a = np.diag([*REF_SPACING, 1.0])
    a[:3, 3] = REF_ORIGIN
    return a


def ref_coords() -> dict[str, np.ndarray]:
    return {ax: o + s * np.arange(n)
            for ax, o, s, n in zip("xyz", REF_ORIGIN, REF_SPACING, REF_SHAPE, strict=True)}


def all_orientations() -> list[np.ndarray]:
    """The 48 axis-aligned orientations (6 axis permutations x 8 flip patterns)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1.0, -1.0), repeat=3):
            out.append(np.array([[p, f] for p, f in zip(perm, flips, strict=True)]))
    return out


def ornt_id(ornt: np.ndarray) -> str:
    img = nib.Nifti1Image(REF_DATA, ref_affine()).as_reoriented(ornt)
    return "".join(nib.aff2axcodes(img.affine))


def voxel_world(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """World (mm) position and value of every voxel of a 3-D image, from its own affine."""
    ijk = np.indices(img.shape[:3]).reshape(3, -1).T
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    values = np.asanyarray(img.dataobj)[tuple(ijk.T)]
    return world, values


def assert_same_as_reference(vol: xr.Dataset) -> None:
    assert vol.image.dims == ("x", "y", "z")
    for ax, c in ref_coords().items():
        np.testing.assert_allclose(vol[ax].values, c, atol=1e-9)
    np.testing.assert_array_equal(vol.image.values, REF_DATA)


# -- orientation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ornt", all_orientations(), ids=ornt_id)
def test_every_axis_aligned_orientation_gives_the_same_ras_volume(ornt):
    img = nib.Nifti1Image(REF_DATA, ref_affine()).as_reoriented(ornt)
    vol = read_nifti(img, "MNI152NLin6Asym")
    assert_same_as_reference(vol)
    # independent of how the image was built: each voxel's value sits at the mm point its own
    # affine gives it
    world, values = voxel_world(img)
    idx, inside = grid_of(vol).nearest_voxel(world)
    assert inside.all()
    np.testing.assert_array_equal(vol.image.values[tuple(idx.T)], values)
    coords = np.stack([vol[ax].values[idx[:, i]] for i, ax in enumerate("xyz")], axis=1)
    np.testing.assert_allclose(coords, world, atol=1e-9)


def las_image() -> nib.Nifti1Image:
    """The reference volume stored as FSL stores it (x flipped), built by hand."""
    a = ref_affine()
    a[0, 0] = -REF_SPACING[0]
    a[0, 3] = REF_ORIGIN[0] + (REF_SHAPE[0] - 1) * REF_SPACING[0]
    return nib.Nifti1Image(REF_DATA[::-1].copy(), a)


def lps_image() -> nib.Nifti1Image:
    """The reference volume as ITK/ANTs store it (x and y flipped), built by hand."""
    a = ref_affine()
    a[0, 0], a[1, 1] = -REF_SPACING[0], -REF_SPACING[1]
    a[0, 3] = REF_ORIGIN[0] + (REF_SHAPE[0] - 1) * REF_SPACING[0]
    a[1, 3] = REF_ORIGIN[1] + (REF_SHAPE[1] - 1) * REF_SPACING[1]
    return nib.Nifti1Image(REF_DATA[::-1, ::-1].copy(), a)


def permuted_image() -> nib.Nifti1Image:
    """Array axes stored as (z, x, y): the affine maps array axis 0 to z, 1 to x, 2 to y."""
    data = np.transpose(REF_DATA, (2, 0, 1)).copy()
    a = np.zeros((4, 4))
    a[2, 0], a[0, 1], a[1, 2] = REF_SPACING[2], REF_SPACING[0], REF_SPACING[1]
    a[:3, 3] = REF_ORIGIN
    a[3, 3] = 1
    return nib.Nifti1Image(data, a)


@pytest.mark.parametrize("make, codes", [
    (las_image, ("L", "A", "S")),
    (lps_image, ("L", "P", "S")),
    (permuted_image, ("S", "R", "A")),
    (lambda: nib.Nifti1Image(REF_DATA, ref_affine()), ("R", "A", "S")),
])
def test_hand_built_orientations_from_files(tmp_path, make, codes):
    img = make()
    assert nib.aff2axcodes(img.affine) == codes
    path = tmp_path / "img.nii.gz"
    nib.save(img, path)
    vol = read_nifti(path, "MNI152NLin6Asym")
    assert_same_as_reference(vol)
    assert vol.attrs["space"] == "MNI152NLin6Asym"
    assert vol.attrs["source"] == str(path)
    # the original (e.g. LAS) affine is kept as provenance
    np.testing.assert_allclose(np.array(vol.attrs["source_affine"]), img.affine)
    # value at a known mm point: voxel (2, 1, 3) of the reference
    p = {ax: REF_ORIGIN[i] + REF_SPACING[i] * v for i, (ax, v) in enumerate(zip("xyz", (2, 1, 3),
                                                                              strict=True))}
    assert float(vol.image.sel(p, method="nearest")) == REF_DATA[2, 1, 3]


def test_float_noise_in_the_affine_is_not_a_rotation():
    a = ref_affine()
    a[0, 1] = a[1, 2] = 1e-7  # float32 header round-off, far below any real rotation
    vol = read_nifti(nib.Nifti1Image(REF_DATA, a), "s")
    np.testing.assert_array_equal(vol.image.values, REF_DATA)


def test_variable_name_and_dtype():
    vol = read_nifti(nib.Nifti1Image(REF_DATA, ref_affine()), "s", name="probability",
                     dtype="float64")
    assert list(vol.data_vars) == ["probability"]
    assert vol.probability.dtype == np.float64
    assert vol.attrs["source"] == "<image>"


def test_scaled_integer_data_are_scaled(tmp_path):
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, tmp_path / "s.nii.gz")
    vol = read_nifti(tmp_path / "s.nii.gz", "s")
    np.testing.assert_allclose(vol.image.values, raw * 0.5 + 10.0)
    # load_nifti hands back an image whose data are already scaled, so nothing scales twice
    again = load_nifti(tmp_path / "s.nii.gz")
    np.testing.assert_allclose(np.asanyarray(again.dataobj), raw * 0.5 + 10.0)


# -- rotation / shear ----------------------------------------------------------------------------

def linear_field(world: np.ndarray) -> np.ndarray:
    return 100.0 + world[..., 0] + 2.0 * world[..., 1] - 0.5 * world[..., 2]


def oblique_image(kind: str, shape=(16, 16, 16)) -> nib.Nifti1Image:
    """A 2 mm image with a rotated (30 deg about z) or sheared affine holding linear_field."""
    a = np.eye(4)
    if kind == "rotated":
        t = np.deg2rad(30)
        a[:3, :3] = 2.0 * np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0],
                                    [0, 0, 1]])
    else:
        a[:3, :3] = np.array([[2.0, 0.6, 0], [0, 2.0, 0], [0, 0, 2.0]])
    a[:3, 3] = (-5.0, -20.0, 7.0)
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk @ a[:3, :3].T + a[:3, 3]
    data = linear_field(world).reshape(shape).astype(np.float32)
    return nib.Nifti1Image(data, a)


@pytest.mark.parametrize("kind", ["rotated", "sheared"])
def test_oblique_affine_is_rejected_naming_resample(tmp_path, kind):
    path = tmp_path / f"{kind}.nii.gz"
    nib.save(oblique_image(kind), path)
    with pytest.raises(InvalidImageError, match="resample") as info:
        read_nifti(path, "s")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["rotated", "sheared"])
def test_oblique_affine_is_resampled_on_request(kind):
    img = oblique_image(kind)
    vol = read_nifti(img, "s", resample=True)
    g = grid_of(vol)
    assert g.spacing == pytest.approx((2.0, 2.0, 2.0))
    # the new grid covers the old field of view: it starts at its lowest corner
    n = np.array(img.shape)
    corners = np.array(list(itertools.product(*[(0, k - 1) for k in n]))) @ img.affine[:3, :3].T
    corners += img.affine[:3, 3]
    np.testing.assert_allclose(g.origin, corners.min(axis=0), atol=1e-6)
    far = np.array(g.origin) + (np.array(g.shape) - 1) * 2.0
    assert np.all(far <= corners.max(axis=0) + 1e-6)
    assert np.all(far > corners.max(axis=0) - 2.0)
    # at every new voxel well inside the old volume, the value is the linear field there
    ijk = np.indices(g.shape).reshape(3, -1).T
    world = np.array(g.origin) + ijk * np.array(g.spacing)
    src = (world - img.affine[:3, 3]) @ np.linalg.inv(img.affine[:3, :3]).T
    interior = np.all((src >= 1) & (src <= n - 2), axis=1)
    assert interior.sum() > 500
    got = vol.image.values[tuple(ijk[interior].T)]
    np.testing.assert_allclose(got, linear_field(world[interior]), rtol=0, atol=2e-3)
    # and a known point: the centre voxel of the source, looked up by its mm position
    centre = img.affine[:3, :3] @ (n // 2) + img.affine[:3, 3]
    idx, inside = g.nearest_voxel(centre)
    assert inside[0]
    near = np.array(g.origin) + idx[0] * 2.0
    assert float(vol.image.values[tuple(idx[0])]) == pytest.approx(linear_field(near), abs=2e-3)


def test_resampled_labels_keep_their_type_and_values():
    img = oblique_image("rotated")
    labels = (np.asanyarray(img.dataobj) > 100).astype(np.int16) * 7
    vol = read_nifti(nib.Nifti1Image(labels, img.affine), "s", resample=True, order=0)
    assert vol.image.dtype == np.int16
    assert set(np.unique(vol.image.values)) == {0, 7}


def test_resampled_4d_keeps_region_axis():
    img = oblique_image("rotated", shape=(8, 8, 8))
    data = np.stack([np.asanyarray(img.dataobj), 2 * np.asanyarray(img.dataobj)], axis=-1)
    vol = read_nifti(nib.Nifti1Image(data, img.affine), "s", allow_4d=True, resample=True)
    assert vol.image.dims == ("region", "x", "y", "z")
    np.testing.assert_allclose(vol.image.values[1], 2 * vol.image.values[0], rtol=1e-5)


# -- dimensionality ------------------------------------------------------------------------------

def test_4d_with_allow_4d_has_leading_region_dim(tmp_path):
    data = np.stack([REF_DATA, REF_DATA + 100, REF_DATA + 200], axis=-1)
    las = las_image()
    img = nib.Nifti1Image(data[::-1].copy(), las.affine)  # stored LAS, like FSL's maps
    nib.save(img, tmp_path / "maps.nii.gz")
    vol = read_nifti(tmp_path / "maps.nii.gz", "s", allow_4d=True)
    assert vol.image.dims == ("region", "x", "y", "z")
    assert vol.image.shape == (3, *REF_SHAPE)
    for r in range(3):
        np.testing.assert_array_equal(vol.image.values[r], REF_DATA + 100 * r)
    for ax, c in ref_coords().items():
        np.testing.assert_allclose(vol[ax].values, c)


def test_4d_without_allow_4d_is_rejected(tmp_path):
    path = tmp_path / "maps.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5, 2), np.float32), np.eye(4)), path)
    with pytest.raises(InvalidImageError, match=r"3-D") as info:
        read_nifti(path, "s")
    assert str(path) in str(info.value)
    assert "(3, 4, 5, 2)" in str(info.value)


def test_4d_with_a_single_volume_is_read_as_3d():
    vol = read_nifti(nib.Nifti1Image(REF_DATA[..., None], ref_affine()), "s")
    assert_same_as_reference(vol)


def test_5d_vector_layout_with_allow_4d():
    data = np.stack([REF_DATA, -REF_DATA], axis=-1)[:, :, :, None, :]  # x, y, z, 1, region
    vol = read_nifti(nib.Nifti1Image(data, ref_affine()), "s", allow_4d=True)
    assert vol.image.dims == ("region", "x", "y", "z")
    np.testing.assert_array_equal(vol.image.values[0], REF_DATA)
    np.testing.assert_array_equal(vol.image.values[1], -REF_DATA)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 5, 2, 2)], ids=["2d", "5d"])
@pytest.mark.parametrize("allow_4d", [False, True])
def test_other_dimensionalities_are_rejected(shape, allow_4d):
    img = nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4))
    with pytest.raises(InvalidImageError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        read_nifti(img, "s", allow_4d=allow_4d)


# -- values --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    data = REF_DATA.copy()
    data[1, 2, 3] = bad
    with pytest.raises(InvalidImageError, match="1 voxels are NaN or infinite"):
        read_nifti(nib.Nifti1Image(data, ref_affine()), "s")


def test_nan_accepted_with_allow_nan_and_kept_in_place():
    data = REF_DATA.copy()
    data[1, 2, 3] = np.nan
    vol = read_nifti(nib.Nifti1Image(data[::-1].copy(), las_image().affine), "s", allow_nan=True)
    values = vol.image.values
    assert np.isnan(values[1, 2, 3])
    assert np.isnan(values).sum() == 1
    np.testing.assert_array_equal(np.nan_to_num(values, nan=-1), np.where(np.isnan(data), -1, data))


def test_nan_is_rejected_even_when_casting_to_integers():
    # regression: the cast used to run first, turning NaN into an arbitrary integer
    data = REF_DATA.copy()
    data[0, 0, 0] = np.nan
    with pytest.raises(InvalidImageError, match="1 voxels"), np.errstate(invalid="ignore"):
        read_nifti(nib.Nifti1Image(data, ref_affine()), "s", dtype="int16")


# -- file errors ---------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(MissingFileError) as info:
        read_nifti(path, "s")
    err = info.value
    assert isinstance(err, FileNotFoundError)
    assert isinstance(err, InputError)
    assert err.exit_code == 2
    assert str(path) in str(err)
    assert err.path == str(path)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(InvalidImageError, match="directory"):
        read_nifti(tmp_path, "s")


def _big_image() -> nib.Nifti1Image:
    # big enough that half the compressed file still holds the whole header
    rng = np.random.default_rng(0)
    return nib.Nifti1Image(rng.random((24, 24, 24)).astype(np.float32), np.eye(4))


def _write_corrupt(tmp_path: Path, kind: str) -> Path:
    rng = np.random.default_rng(1)
    if kind == "random.nii.gz":
        p = tmp_path / "random.nii.gz"
        p.write_bytes(rng.bytes(2000))
    elif kind == "random.nii":
        p = tmp_path / "random.nii"
        p.write_bytes(rng.bytes(2000))
    elif kind == "empty.nii.gz":
        p = tmp_path / "empty.nii.gz"
        p.write_bytes(b"")
    else:  # truncated.nii.gz / truncated.nii: first half of a real file
        full = tmp_path / ("full" + kind.removeprefix("truncated"))
        nib.save(_big_image(), full)
        data = full.read_bytes()
        p = tmp_path / kind
        p.write_bytes(data[: len(data) // 2])
    return p


@pytest.mark.parametrize("kind", ["random.nii.gz", "random.nii", "empty.nii.gz",
                                  "truncated.nii.gz", "truncated.nii"])
def test_corrupt_or_truncated_file_names_the_file(tmp_path, kind):
    path = _write_corrupt(tmp_path, kind)
    with pytest.raises(InvalidImageError) as info:
        read_nifti(path, "s")
    assert str(path) in str(info.value)
    assert isinstance(info.value, InputError)
    with pytest.raises(InvalidImageError):
        load_nifti(path)


def test_truncated_gzip_keeps_a_readable_header(tmp_path):
    # guard that the truncated fixture really tests the data read, not the header read
    path = _write_corrupt(tmp_path, "truncated.nii.gz")
    assert nib.load(path).shape == (24, 24, 24)


def test_non_nifti_image_is_rejected(tmp_path):
    path = tmp_path / "vol.mgz"
    nib.save(nib.MGHImage(REF_DATA, ref_affine()), path)
    with pytest.raises(InvalidImageError, match="expected a NIfTI image"):
        read_nifti(path, "s")


# -- writing -------------------------------------------------------------------------------------

def test_to_nifti_round_trip(tmp_path):
    vol = read_nifti(las_image(), "s")
    img = to_nifti(vol)
    np.testing.assert_allclose(img.affine, ref_affine())
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), REF_DATA)
    assert img.header.get_xyzt_units()[0] == "mm"
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    nib.save(img, tmp_path / "out.nii.gz")
    back = read_nifti(tmp_path / "out.nii.gz", "s")
    xr.testing.assert_equal(back.image, vol.image)
    np.testing.assert_allclose(nib.load(tmp_path / "out.nii.gz").affine, ref_affine())


def test_to_nifti_4d_round_trip_and_dataarray():
    data = np.stack([REF_DATA, REF_DATA * 2], axis=-1)
    vol = from_array(data, grid_of(read_nifti(nib.Nifti1Image(REF_DATA, ref_affine()), "s")), "s",
                     name="probability")
    img = to_nifti(vol.probability)  # a DataArray works too
    assert img.shape == (*REF_SHAPE, 2)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    back = read_nifti(img, "s", allow_4d=True, name="probability")
    np.testing.assert_array_equal(back.probability.values, vol.probability.values)


def test_to_nifti_needs_a_name_for_several_variables():
    vol = from_array(REF_DATA, Grid(REF_SHAPE, REF_ORIGIN, REF_SPACING), "s")
    vol["other"] = vol.image * 2
    with pytest.raises(InvalidImageError, match="2 variables"):
        to_nifti(vol)
    np.testing.assert_array_equal(np.asanyarray(to_nifti(vol, "other").dataobj), REF_DATA * 2)


def test_to_nifti_rejects_unknown_dims():
    vol = from_array(REF_DATA, Grid(REF_SHAPE, REF_ORIGIN, REF_SPACING), "s")
    da = vol.image.expand_dims(t=2)
    with pytest.raises(InvalidImageError, match="unexpected dims"):
        to_nifti(da)


def test_from_array_checks_shape_and_dims():
    grid = Grid(REF_SHAPE, REF_ORIGIN, REF_SPACING)
    with pytest.raises(GridMismatchError, match="does not match"):
        from_array(np.zeros((3, 4, 6)), grid, "s")
    with pytest.raises(InvalidImageError, match="5-D"):
        from_array(np.zeros((*REF_SHAPE, 1, 1)), grid, "s")
    vol = from_array(REF_DATA, grid, "s")
    assert vol.attrs["space"] == "s"
    np.testing.assert_allclose(np.array(vol.attrs["source_affine"]), ref_affine())


# -- grids ---------------------------------------------------------------------------------------

def test_grid_affine_and_coords_agree():
    g = Grid(REF_SHAPE, REF_ORIGIN, REF_SPACING)
    np.testing.assert_allclose(g.affine, ref_affine())
    c = g.coords()
    for i, j, k in [(0, 0, 0), (2, 3, 4), (1, 2, 0)]:
        np.testing.assert_allclose(g.affine @ [i, j, k, 1],
                                   [c["x"][i], c["y"][j], c["z"][k], 1])


GRID = Grid(shape=(4, 3, 2), origin=(-10.0, 5.0, 0.0), spacing=(2.0, 0.5, 3.0))


def centre(i: int, j: int, k: int) -> np.ndarray:
    return np.array(GRID.origin) + np.array(GRID.spacing) * (i, j, k)


def test_nearest_voxel_at_voxel_centres():
    ijk = np.indices(GRID.shape).reshape(3, -1).T
    idx, inside = GRID.nearest_voxel(np.array([centre(*v) for v in ijk]))
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ijk)
    assert inside.all()


def test_nearest_voxel_single_point_shape():
    idx, inside = GRID.nearest_voxel(centre(3, 2, 1))
    assert idx.shape == (1, 3) and inside.shape == (1,)
    np.testing.assert_array_equal(idx[0], (3, 2, 1))


def test_nearest_voxel_off_grid_matches_brute_force():
    rng = np.random.default_rng(0)
    lo = np.array(GRID.origin) - 0.49 * np.array(GRID.spacing)
    hi = centre(*(np.array(GRID.shape) - 1)) + 0.49 * np.array(GRID.spacing)
    pts = rng.uniform(lo, hi, size=(500, 3))
    idx, inside = GRID.nearest_voxel(pts)
    assert inside.all()
    coords = GRID.coords()
    for a, ax in enumerate("xyz"):
        expected = np.abs(pts[:, a:a + 1] - coords[ax][None, :]).argmin(axis=1)
        np.testing.assert_array_equal(idx[:, a], expected)


def test_nearest_voxel_half_way_goes_to_the_higher_index():
    s = np.array(GRID.spacing)
    # exactly between centres 1 and 2 on x, 0 and 1 on y, 0 and 1 on z (exact in binary)
    p = centre(1, 0, 0) + 0.5 * s
    assert tuple(p) == (-7.0, 5.25, 1.5)
    idx, inside = GRID.nearest_voxel(p)
    np.testing.assert_array_equal(idx[0], (2, 1, 1))
    assert inside[0]
    # slightly less than half-way stays
    idx, _ = GRID.nearest_voxel(centre(1, 0, 0) + 0.49 * s)
    np.testing.assert_array_equal(idx[0], (1, 0, 0))
    # half-way on the low side also rounds up (to the voxel itself), not to even
    idx, _ = GRID.nearest_voxel(centre(3, 2, 1) - 0.5 * s)
    np.testing.assert_array_equal(idx[0], (3, 2, 1))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nearest_voxel_border(axis):
    s = np.array(GRID.spacing)
    last = np.array(GRID.shape) - 1
    step = np.zeros(3)
    step[axis] = s[axis]
    pts = np.array([
        centre(0, 0, 0) - 0.49 * step,  # within half a voxel of the first centre: inside
        centre(0, 0, 0) - 0.51 * step,  # beyond: outside
        centre(*last) + 0.49 * step,
        centre(*last) + 0.51 * step,
        centre(0, 0, 0) - 7 * step,  # far outside
        centre(*last) + 7 * step,
    ])
    idx, inside = GRID.nearest_voxel(pts)
    np.testing.assert_array_equal(inside, [True, False, True, False, False, False])
    np.testing.assert_array_equal(idx[0], (0, 0, 0))
    np.testing.assert_array_equal(idx[2], last)
    # indices of outside points are clipped into range, never wrapped
    assert np.all(idx >= 0) and np.all(idx <= last)


def test_nearest_voxel_nan_and_inf_are_outside():
    pts = np.array([[np.nan, 5.0, 0.0], [-10.0, np.nan, 0.0], [np.inf, 5.0, 0.0],
                    [-10.0, 5.0, 0.0]])
    idx, inside = GRID.nearest_voxel(pts)
    np.testing.assert_array_equal(inside, [False, False, False, True])
    assert np.all(idx >= 0) and np.all(idx < np.array(GRID.shape))


def test_nearest_voxel_of_a_volume():
    vol = from_array(np.zeros(GRID.shape), GRID, "s")
    pts = np.array([centre(2, 1, 0), centre(0, 0, 0) - 10])
    idx, inside = nearest_voxel(vol, pts)
    np.testing.assert_array_equal(idx[0], (2, 1, 0))
    np.testing.assert_array_equal(inside, [True, False])


def test_grid_of_reads_back_the_grid():
    vol = from_array(np.zeros(GRID.shape), GRID, "s")
    g = grid_of(vol)
    assert g.shape == GRID.shape
    np.testing.assert_allclose(g.origin, GRID.origin)
    np.testing.assert_allclose(g.spacing, GRID.spacing)
    assert grid_of(vol.image) == g


@pytest.mark.parametrize("x", [
    np.array([0.0, 1.0, 3.0]),    # non-uniform
    np.array([2.0, 1.0, 0.0]),    # decreasing (not RAS+)
    np.array([0.0, 0.0, 0.0]),    # zero step
], ids=["non-uniform", "decreasing", "zero-step"])
def test_grid_of_rejects_bad_coordinates(x):
    da = xr.DataArray(np.zeros((3, 2, 2)), dims=("x", "y", "z"),
                      coords={"x": x, "y": [0.0, 1.0], "z": [0.0, 1.0]})
    with pytest.raises(GridMismatchError, match="'x'"):
        grid_of(da)


def test_grid_of_needs_all_three_coordinates():
    da = xr.DataArray(np.zeros((2, 2, 2)), dims=("x", "y", "z"),
                      coords={"x": [0.0, 1.0], "y": [0.0, 1.0]})
    with pytest.raises(GridMismatchError, match="'z'"):
        grid_of(da)


# -- check_same_grid -----------------------------------------------------------------------------

def vol_on(grid: Grid, space: str = "MNI152NLin6Asym") -> xr.Dataset:
    return from_array(np.zeros(grid.shape, np.float32), grid, space)


def test_same_grid_passes():
    check_same_grid(vol_on(GRID), vol_on(GRID), vol_on(GRID).image)
    check_same_grid(vol_on(GRID))
    check_same_grid()


def test_different_space_names_both_spaces():
    with pytest.raises(GridMismatchError) as info:
        check_same_grid(vol_on(GRID), vol_on(GRID, "MNI152NLin2009cAsym"))
    assert "MNI152NLin6Asym" in str(info.value)
    assert "MNI152NLin2009cAsym" in str(info.value)


def test_different_shape():
    other = Grid((4, 3, 3), GRID.origin, GRID.spacing)
    with pytest.raises(GridMismatchError, match="shape"):
        check_same_grid(vol_on(GRID), vol_on(GRID), vol_on(other))


@pytest.mark.parametrize("other", [
    Grid(GRID.shape, (-9.0, 5.0, 0.0), GRID.spacing),      # shifted origin
    Grid(GRID.shape, GRID.origin, (2.0, 0.5, 2.0)),         # other spacing
], ids=["shifted", "spacing"])
def test_same_shape_other_grid(other):
    with pytest.raises(GridMismatchError, match="different grids"):
        check_same_grid(vol_on(GRID), vol_on(other))


# -- known bugs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_to_nifti_writes_int64_labels_and_bool_masks(tmp_path, dtype):
    labels = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)  # e.g. from np.argmax
    vol = from_array(labels, Grid((2, 3, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "s")
    nib.save(to_nifti(vol), tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "labels.nii.gz").dataobj),
                                  labels.astype(int))


@pytest.mark.parametrize("shape", [(3, 4), (6,), (3, 2)])
def test_nearest_voxel_rejects_points_of_the_wrong_shape(shape):
    with pytest.raises(ValueError):
        GRID.nearest_voxel(np.zeros(shape))


def test_single_slice_keeps_its_thickness():
    img = nib.Nifti1Image(np.ones((4, 4, 1), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    vol = read_nifti(img, "s")
    np.testing.assert_allclose(to_nifti(vol).affine, img.affine)
    # and a point 0.8 mm off the slice centre (inside its 2 mm thickness) is inside
    _, inside = nearest_voxel(vol, [0.0, 0.0, 0.8])
    assert inside[0]
