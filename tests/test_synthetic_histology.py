"""Synthetic cell-body-stained sections: laminae where the profiles put them, equal brightness
across areas, determinism, and artefacts whose true transform is known."""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from atlasbuilder.errors import InputError
from atlasbuilder.synthetic.histology import (
    BACKGROUND,
    BUILTIN_AREAS,
    GREY_MATTER,
    WHITE_MATTER,
    LaminarProfile,
    apply_artefacts,
    contact_sheet,
    cortical_depth,
    profiles_for,
    render_section,
    ribbon_phantom,
    section_defects,
    smooth_labels,
)

PX = 0.2
DEPTH_GRID = np.linspace(0.0, 1.0, 2001)


@pytest.fixture(scope="module")
def phantom():
    """The folded ribbon at 0.2 mm (blocky labels from a 1 mm grid), its profiles and smooth labels."""
    tissue, area, keys = ribbon_phantom(PX)
    profiles = profiles_for(list(keys.values()))
    tissue_s, area_s = smooth_labels(tissue, area, PX)
    return tissue, area, keys, profiles, tissue_s, area_s


@pytest.fixture(scope="module")
def rendered(phantom):
    tissue, area, keys, profiles, *_ = phantom
    return render_section(tissue, area, profiles, keys, PX, rng=7)


def area_masks(phantom):
    *_, keys, _, tissue_s, area_s = phantom
    return {keys.get(lab, "cortex"): (tissue_s == GREY_MATTER) & (area_s == lab)
            for lab in [0, *keys]}


# ---------------------------------------------------------------------------------------- profiles


def test_builtin_profiles_have_equal_mean_and_contrast_but_different_patterns():
    profiles = profiles_for(list(BUILTIN_AREAS))
    assert set(profiles) == set(BUILTIN_AREAS)
    curves = {k: p.cell_od(DEPTH_GRID) for k, p in profiles.items()}
    means = [c.mean() for c in curves.values()]
    stds = [c.std() for c in curves.values()]
    assert np.ptp(means) < 1e-5 and np.ptp(stds) < 1e-4
    # the patterns differ: no two areas' depth profiles are close to each other
    keys = list(curves)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert np.abs(curves[a] - curves[b]).mean() > 0.05, (a, b)
    for p in profiles.values():
        assert abs(sum(p.thickness) - 1) < 1e-9 and min(p.thickness) >= 0.1 - 1e-9
    # hOc1: thickest granular layer IV of all, a stria, thinnest cortex
    hoc1 = profiles["hOc1"]
    assert hoc1.stria is not None
    assert hoc1.thickness[3] == max(p.thickness[3] for p in profiles.values())
    b = hoc1.boundaries
    assert b[3] < hoc1.stria.depth < b[4]  # inside layer IV
    assert hoc1.cortex_thickness == min(p.cortex_thickness for p in profiles.values())


def test_unknown_areas_get_distinct_stable_normalised_profiles():
    a = profiles_for(["FG1", "FG2"], seed=3)
    b = profiles_for(["FG2", "FG1"], seed=3)
    assert set(a) == {"FG1", "FG2", "cortex"}
    assert a["FG1"] == b["FG1"] and a["FG2"] == b["FG2"]
    assert a["FG1"].density != a["FG2"].density
    assert profiles_for(["FG1"], seed=4)["FG1"] != a["FG1"]
    many = profiles_for([f"area{i}" for i in range(50)])
    for p in many.values():
        od = p.cell_od(DEPTH_GRID)
        assert od.mean() == pytest.approx(many["cortex"].cell_od(DEPTH_GRID).mean(), rel=5e-3)
        assert min(p.thickness) >= 0.1 - 1e-9


def test_profile_rejects_bad_values():
    good = profiles_for([])["cortex"]
    with pytest.raises(InputError, match="6 values"):
        replace(good, density=(0.1, 0.2))
    with pytest.raises(InputError, match="sum to 1"):
        replace(good, thickness=(0.2,) * 6)
    with pytest.raises(InputError, match="flat density"):
        replace(good, density=(0.3,) * 6, stria=None).normalised()


def test_layer_weights_partition_depth():
    p = profiles_for(["hOc1"])["hOc1"]
    w = p.layer_weights(DEPTH_GRID)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-12)
    mids = (p.boundaries[:-1] + p.boundaries[1:]) / 2
    np.testing.assert_array_equal(np.argmax(p.layer_weights(mids), axis=-1), np.arange(6))


# --------------------------------------------------------------------------------------- geometry


def test_cortical_depth_on_a_slab_is_linear():
    # rows: 3 background, 20 grey matter, 5 white matter; depth is the same across columns
    tissue = np.repeat(np.array([0] * 3 + [2] * 20 + [3] * 5)[:, None], 6, axis=1)
    depth = cortical_depth(tissue, 0.1)
    assert np.isnan(depth[tissue != GREY_MATTER]).all()
    expected = (np.arange(20) + 0.5) / 20
    np.testing.assert_allclose(depth[3:23, 2], expected, atol=1e-6)


def test_cortical_depth_on_the_phantom(phantom):
    *_, tissue_s, _ = phantom
    depth = cortical_depth(tissue_s, PX)
    gm = tissue_s == GREY_MATTER
    assert np.isfinite(depth[gm]).all() and np.isnan(depth[~gm]).all()
    assert depth[gm].min() >= 0 and depth[gm].max() <= 1
    outside = ~np.isin(tissue_s, [GREY_MATTER, WHITE_MATTER])
    next_to_pia = gm & ndimage.binary_dilation(outside)
    next_to_wm = gm & ndimage.binary_dilation(tissue_s == WHITE_MATTER)
    assert np.median(depth[next_to_pia]) < 0.05 and depth[next_to_pia].max() < 0.2
    assert np.median(depth[next_to_wm]) > 0.95 and depth[next_to_wm].min() > 0.8


def test_smooth_labels_remove_the_voxel_staircase():
    # a straight oblique border, labelled on a 1 mm grid and upsampled to 0.2 mm (blocky)
    n, f = 40, 5
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    coarse = np.where(yy < 0.4 * xx + 10, GREY_MATTER, WHITE_MATTER)
    tissue = np.kron(coarse, np.ones((f, f), dtype=int))
    area = np.where(tissue == GREY_MATTER, 1, 0)
    sm_t, sm_a = smooth_labels(tissue, area, 0.2)
    rows = np.arange(n * f)
    cols = np.arange(30, n * f - 30)  # away from the image edges
    x_mm = (cols + 0.5) * 0.2
    border_mm = 0.4 * x_mm + 10  # where the true line is, at each column
    errors = {}
    for labels, name in [(tissue, "blocky"), (sm_t, "smoothed")]:
        last_gm = np.array([rows[labels[:, c] == GREY_MATTER].max() for c in cols])
        errors[name] = np.abs((last_gm + 1) * 0.2 - border_mm)
    assert errors["blocky"].max() > 0.5  # the 1 mm staircase
    # smoothing roughly halves the error; about 0.05 mm of what is left is the 0.2 mm pixel grid
    assert errors["smoothed"].max() < 0.65 * errors["blocky"].max()
    assert errors["smoothed"].mean() < 0.6 * errors["blocky"].mean()
    assert ((sm_a == 1) == (sm_t == GREY_MATTER)).all()


# -------------------------------------------------------------------------------------- rendering


def test_render_is_deterministic(phantom, rendered):
    tissue, area, keys, profiles, *_ = phantom
    again = render_section(tissue, area, profiles, keys, PX, rng=np.random.default_rng(7))
    assert again.dtype == np.uint8 and again.shape == tissue.shape
    assert again.tobytes() == rendered.tobytes()
    other = render_section(tissue, area, profiles, keys, PX, rng=8)
    assert (other != rendered).mean() > 0.2


def test_areas_have_equal_mean_intensity(phantom, rendered):
    masks = area_masks(phantom)
    means = np.array([rendered[m].mean() for m in masks.values()])
    assert all(m.sum() > 5000 for m in masks.values())
    assert (means.max() - means.min()) / means.mean() < 0.05
    *_, tissue_s, _ = phantom
    gm = rendered[tissue_s == GREY_MATTER].mean()
    wm = rendered[tissue_s == WHITE_MATTER].mean()
    bg = rendered[tissue_s == BACKGROUND].mean()
    assert gm + 40 < wm < bg - 10 and bg > 225  # dark cortex, pale white matter, bright slide


def test_density_gain_darkens_one_area_only(phantom, rendered):
    tissue, area, keys, profiles, *_ = phantom
    key = next(iter(keys.values()))
    darker = {**profiles, key: replace(profiles[key], density_gain=1.5)}
    img = render_section(tissue, area, darker, keys, PX, rng=7)
    masks = area_masks(phantom)
    core = ndimage.binary_erosion(masks[key], iterations=5)  # away from the blended border
    others = [k for k in masks if k != key]
    assert img[core].mean() < rendered[core].mean() - 10
    for k in others:
        inner = ndimage.binary_erosion(masks[k], iterations=5)
        assert abs(img[inner].mean() - rendered[inner].mean()) < 4.0  # cell noise only
    with pytest.raises(InputError, match="density_gain"):
        replace(profiles[key], density_gain=0.0)


def depth_profile(image, mask, depth, bins):
    idx = np.digitize(depth[mask], bins) - 1
    vals = image[mask].astype(float)
    return np.array([vals[idx == i].mean() for i in range(len(bins) - 1)])


def test_layers_sit_at_their_depths(phantom, rendered):
    *_, profiles, tissue_s, _ = phantom
    depth = cortical_depth(tissue_s, PX)
    bins = np.linspace(0, 1, 26)
    centres = (bins[:-1] + bins[1:]) / 2
    for key, mask in area_masks(phantom).items():
        measured = depth_profile(rendered, mask, depth, bins)
        expected_od = np.array([profiles[key].cell_od(np.linspace(lo, hi, 50)).mean()
                                for lo, hi in itertools.pairwise(bins)])
        # darker where more cells: the measured profile mirrors the expected one
        r = np.corrcoef(measured, -expected_od)[0, 1]
        assert r > 0.9, (key, r)
        # layer I is paler than every band that expects clearly more cells (at the demo's laminar
        # contrast a cell-sparse layer V or VI may be as pale as layer I)
        denser = (centres > 0.1) & (expected_od > expected_od[centres < 0.08].max() + 0.05)
        assert denser.any(), key
        assert measured[centres < 0.08].mean() > measured[denser].max(), key


def test_hoc1_stria_is_a_bright_band_at_its_depth(phantom, rendered):
    *_, profiles, tissue_s, _ = phantom
    stria = profiles["hOc1"].stria
    assert stria is not None
    depth = cortical_depth(tissue_s, PX)
    mask = area_masks(phantom)["hOc1"]
    bins = np.linspace(0, 1, 41)
    centres = (bins[:-1] + bins[1:]) / 2
    prof = depth_profile(rendered, mask, depth, bins)
    window = np.abs(centres - stria.depth) < 0.15
    peak = centres[window][np.argmax(prof[window])]
    assert abs(peak - stria.depth) <= 0.04
    inside = prof[np.abs(centres - stria.depth) < 0.03].mean()
    flanks = prof[(np.abs(centres - stria.depth) > 0.08) & (np.abs(centres - stria.depth) < 0.15)]
    assert inside > flanks.max() + 20  # well above the dense IVa and IVc on either side


def test_area_borders_are_blended_not_stepped():
    # a straight slab of cortex, hOc1 left of column 150 and hOc2 right of it; on rows where the
    # two profiles differ, the seed-averaged image crosses the border gradually (over ~0.5 mm)
    tissue = np.zeros((50, 300), np.int16)
    tissue[3:43], tissue[43:] = GREY_MATTER, WHITE_MATTER
    area = np.where(tissue == GREY_MATTER, np.where(np.arange(300) < 150, 1, 2), 0).astype(np.int16)
    keys = {1: "hOc1", 2: "hOc2"}
    profiles = profiles_for(list(keys.values()))

    def crossing(blend_mm):
        img = np.mean([render_section(tissue, area, profiles, keys, PX, rng=s, noise=0, inhomogeneity=0,
                                      label_voxel_mm=None, blend_mm=blend_mm) for s in range(12)], axis=0)
        left, right = img[:, 20:120].mean(axis=1), img[:, 180:280].mean(axis=1)
        rows = [r for r in range(3, 43) if abs(left[r] - right[r]) > 20]
        assert len(rows) >= 8
        return np.mean([(img[r] - right[r]) / (left[r] - right[r]) for r in rows], axis=0)

    blended, sharp = crossing(0.5), crossing(0.05)
    assert sharp[149] - sharp[150] > 0.7  # without blending: a step at the border
    assert blended[149] - blended[150] < 0.45
    assert 0.15 < blended[149] < 0.85 and 0.1 < blended[150] < 0.75
    assert blended[144] > 0.8 and blended[155] < 0.2  # ... and only near it


def test_render_rejects_missing_profiles(phantom):
    tissue, area, keys, profiles, *_ = phantom
    with pytest.raises(InputError, match="no laminar profile"):
        render_section(tissue, area, {"cortex": profiles["cortex"]}, keys, PX, rng=0)
    with pytest.raises(InputError, match="classes 0..3"):
        render_section(tissue + 3, area, profiles, keys, PX, rng=0)
    with pytest.raises(InputError, match="pixel_size_mm"):
        render_section(tissue, area, profiles, keys, 0.0, rng=0)


def test_any_area_set_renders(phantom):
    tissue, area, _, _, _, _ = phantom
    keys = {1: "FG1", 2: "FG2", 3: "hOc1", 4: "FG3", 5: "FG4"}
    img = render_section(tissue, area, profiles_for(list(keys.values())), keys, PX, rng=0)
    assert img.shape == tissue.shape


# -------------------------------------------------------------------------------------- artefacts


def blob_image(shape, centre, sigma=2.0):
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    blob = np.exp(-((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) / (2 * sigma**2))
    return (240 - 200 * blob).astype(np.uint8)


def test_transform_moves_a_point_where_it_says():
    shape, p = (300, 260), np.array([90.0, 170.0])
    img = blob_image(shape, p)
    lab = np.zeros(shape, np.int16)
    out, _, tf = apply_artefacts(img, lab, PX, rng=11, shift_mm=3, rotation_deg=8, distortion_mm=0.5,
                                 drift=0, noise=0)
    assert np.abs(tf.shift_px).max() > 2 and abs(tf.rotation_deg) > 0.5
    q = tf.forward(p)[0]
    weight = np.clip(240.0 - out, 0, None)
    weight[np.hypot(*(np.mgrid[0:shape[0], 0:shape[1]] - q[:, None, None])) > 8] = 0
    centroid = np.array(ndimage.center_of_mass(weight))
    assert np.linalg.norm(centroid - q) < 0.3
    assert np.linalg.norm(q - p) > 3  # it really moved
    np.testing.assert_allclose(tf.inverse(tf.forward(p)), p[None], atol=1e-5)
    grid = tf.sampling_grid()
    np.testing.assert_allclose(grid[:, 40, 55], tf.inverse([[40, 55]])[0], atol=1e-9)


def test_labels_move_with_the_image(phantom):
    *_, tissue_s, area_s = phantom
    img = (20 + 60 * tissue_s).astype(np.uint8)  # a piecewise-constant image of the labels
    out, (t2, a2), _ = apply_artefacts(img, (tissue_s, area_s), PX, rng=5, drift=0, noise=0,
                                       background=20)
    assert t2.dtype == tissue_s.dtype and a2.dtype == area_s.dtype
    interior = np.ones(t2.shape, bool)
    for v in np.unique(t2):
        # bilinear image vs nearest-neighbour labels differ only within 2 px of a label border
        interior &= ~(ndimage.binary_dilation(t2 == v, iterations=2) & ~(t2 == v))
    assert np.array_equal(out[interior], (20 + 60 * t2[interior]).astype(np.uint8))
    assert (a2[t2 != GREY_MATTER] == 0).all()
    assert set(np.unique(a2)) == set(np.unique(area_s))


def test_staining_drift_across_the_stack(phantom, rendered):
    tissue_s = phantom[-2]
    kw = dict(shift_mm=0, rotation_deg=0, distortion_mm=0, noise=0, drift=0.3)
    first, *_ = apply_artefacts(rendered, tissue_s, PX, rng=0, position=0.0, **kw)
    last, *_ = apply_artefacts(rendered, tissue_s, PX, rng=0, position=1.0, **kw)
    gm = tissue_s == GREY_MATTER
    bg = tissue_s == BACKGROUND
    assert last[gm].mean() < first[gm].mean() - 15  # stronger staining later in the stack
    assert abs(float(last[bg].mean()) - float(first[bg].mean())) < 0.5  # the slide is unchanged


def test_tear_cuts_a_gap_through_tissue(phantom, rendered):
    tissue_s = phantom[-2]
    kw = dict(shift_mm=0, rotation_deg=0, distortion_mm=0, noise=0, drift=0)
    intact, (t0,), _ = apply_artefacts(rendered, tissue_s, PX, rng=2, **kw)
    torn, (t1,), _ = apply_artefacts(rendered, tissue_s, PX, rng=2, tear=True, **kw)
    gap = (t0 > 0) & (t1 == 0)
    assert 50 < gap.sum() < 0.1 * (t0 > 0).sum()
    assert np.abs(torn[gap].astype(int) - 240).max() <= 1  # background where the tissue was
    changed = torn != intact
    assert (torn[changed] == 240).all() and changed.sum() < 3 * gap.sum()


def test_artefacts_are_deterministic(rendered, phantom):
    *_, tissue_s, area_s = phantom
    a = apply_artefacts(rendered, (tissue_s, area_s), PX, rng=3, tear=True, position=0.2)
    b = apply_artefacts(rendered, (tissue_s, area_s), PX, rng=3, tear=True, position=0.2)
    assert a[0].tobytes() == b[0].tobytes() and a[1][1].tobytes() == b[1][1].tobytes()
    with pytest.raises(InputError, match="position"):
        apply_artefacts(rendered, tissue_s, PX, rng=3, position=2.0)
    with pytest.raises(InputError, match="label shape"):
        apply_artefacts(rendered, tissue_s[:-1], PX, rng=3)


def test_section_defects():
    miss, torn = section_defects(40, rng=1, missing=0.1, torn=0.05)
    assert miss.sum() == 4 and torn.sum() == 2 and not (miss & torn).any()
    again = section_defects(40, rng=1, missing=0.1, torn=0.05)
    assert np.array_equal(again[0], miss) and np.array_equal(again[1], torn)
    with pytest.raises(InputError):
        section_defects(10, rng=1, missing=0.8, torn=0.5)


# ------------------------------------------------------------------------------------- looking at it


def test_contact_sheet_writes_a_png(tmp_path, phantom, rendered):
    *_, area_s = phantom
    path = tmp_path / "sheet.png"
    sheet = contact_sheet([rendered, rendered], [area_s, area_s], path, titles=["a", "b"], tile_px=200)
    assert sheet.ndim == 3 and sheet.shape[2] == 3 and sheet.dtype == np.uint8
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]  # no temporary file left


def test_import_is_light():
    code = ("import sys, atlasbuilder.synthetic.histology; "
            "print(any(m.startswith(('matplotlib', 'sklearn', 'torch')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_phantom_layers_are_several_pixels_thick():
    tissue, area, keys = ribbon_phantom(PX)
    profiles = profiles_for(list(keys.values()))
    tissue_s, area_s = smooth_labels(tissue, area, PX)
    depth = cortical_depth(tissue_s, PX)
    for lab, key in {0: "cortex", **keys}.items():
        mask = (tissue_s == GREY_MATTER) & (area_s == lab)
        # cortical thickness in px from depth: distance to pia over depth, on mid-cortex pixels
        d_pia = ndimage.distance_transform_edt(np.isin(tissue_s, [GREY_MATTER, WHITE_MATTER]))
        mid = mask & (np.abs(depth - 0.5) < 0.05)
        thickness_px = np.median((d_pia[mid] - 0.5) / depth[mid])
        assert thickness_px * min(profiles[key].thickness) >= 2.5, (key, thickness_px)


def test_laminar_profile_is_a_frozen_value():
    p = profiles_for(["hOc2"])["hOc2"]
    assert isinstance(p, LaminarProfile)
    with pytest.raises(AttributeError):
        p.key = "x"  # type: ignore[misc]
