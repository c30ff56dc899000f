"""Aggregation: probability maps, the MPM rule, entropy, statistics, and queries on built atlases."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from atlasbuilder import load_atlas
from atlasbuilder.aggregation import (
    aggregate_space,
    compute_statistics,
    dice,
    entropy_map,
    label_volume,
    maximum_probability_map,
    probability_maps,
)
from atlasbuilder.atlas import inside_centroid, write_atlas_metadata
from atlasbuilder.errors import (
    AtlasDirectoryError,
    GridMismatchError,
    InputError,
    UnknownRegionError,
    UnknownSpaceError,
)
from atlasbuilder.manifest import AggregationSettings
from atlasbuilder.regions import load_hierarchy
from atlasbuilder.volumes import Grid

SPACE = "MNI152NLin2009cAsym"
AREAS = ["hOc1_left", "hOc1_right", "hOc2_left", "hOc2_right"]


@pytest.fixture(scope="module")
def tree():
    return load_hierarchy("juelich")


def ids(tree, keys=AREAS):
    return [tree.get(k).id for k in keys]


def save(path, data, grid):
    nib.save(nib.Nifti1Image(np.asarray(data), grid.affine), path)
    return path


def build(tmp_path, tree, labels, grid, *, areas=AREAS, settings=None, **kw):
    files = {f"B{n + 1:02d}": save(tmp_path / f"b{n}.nii.gz", lab.astype(np.int16), grid)
             for n, lab in enumerate(labels)}
    out = tmp_path / "atlas"
    out.mkdir(exist_ok=True)
    s = aggregate_space(files, SPACE, areas, tree, out, settings=settings, **kw)
    write_atlas_metadata(out, name="t", version="1", regions=tree, spaces=[s.maps])
    return load_atlas(out), s, files


# -- the MPM rule and entropy, by hand ------------------------------------------------------------
def test_mpm_rule_hand_cases():
    p = np.zeros((3, 5, 1, 1))
    # voxel 0: a clear winner (area 13); voxel 1: a tie of areas 11 and 13 where the 26 neighbours
    # (voxels 0 and 2; the rest lie beyond the grid and count 0) favour 13: 0.45 + 0.3 > 0.2 + 0.3;
    # voxel 2: a tie where the neighbours (1, 3) favour 11: 0.4 + 0.1 > 0.4 + 0;
    # voxel 3: total 0.15 below the threshold; voxel 4: nothing
    p[:, 0, 0, 0] = [0.2, 0.0, 0.45]
    p[:, 1, 0, 0] = [0.4, 0.0, 0.4]
    p[:, 2, 0, 0] = [0.3, 0.0, 0.3]
    p[:, 3, 0, 0] = [0.1, 0.05, 0.0]
    mpm = maximum_probability_map(p, [11, 12, 13], min_probability=0.2)[:, 0, 0]
    assert mpm.tolist() == [13, 13, 11, 0, 0]
    assert maximum_probability_map(p, [11, 12, 13], min_probability=0.1)[3, 0, 0] == 11
    # equal neighbourhoods: the fixed order decides
    q = np.zeros((2, 3, 3, 3))
    q[:, 1, 1, 1] = 0.5
    assert maximum_probability_map(q, [5, 6])[1, 1, 1] == 5
    assert maximum_probability_map(q[::-1], [6, 5])[1, 1, 1] == 6
    q[1, 0, 0, 0] = 0.1  # one neighbour of the centre favours area 6
    assert maximum_probability_map(q, [5, 6])[1, 1, 1] == 6
    # neighbourhoods equal but for float rounding (0.1 + 0.2 > 0.3 in float64): still a tie, the
    # fixed order decides, whether the maps come as float64 or float32 (e.g. read from a store)
    e = np.zeros((2, 3, 3, 3))
    e[:, 1, 1, 1] = 0.5
    e[0, 0, 0, 0] = 0.3
    e[1, 0, 0, 0], e[1, 2, 2, 2] = 0.1, 0.2
    assert 0.1 + 0.2 != 0.3
    for maps in (e, e.astype(np.float32)):
        assert maximum_probability_map(maps, [6, 5])[1, 1, 1] == 6
        assert maximum_probability_map(maps[::-1], [5, 6])[1, 1, 1] == 5
    # threshold on the total probability, not the maximum: 0.15 + 0.15 = 0.3 >= 0.3
    r = np.zeros((2, 2, 1, 1))
    r[:, 0, 0, 0] = [0.15, 0.15]
    r[:, 1, 0, 0] = [0.14, 0.15]
    m = maximum_probability_map(r, [1, 2], min_probability=0.3)[:, 0, 0]
    assert m.tolist() == [2, 0]  # voxel 0's tie: its neighbour voxel 1 favours area 2
    # gap label: cortex voxels left without an area
    cortex = np.array([True, True]).reshape(2, 1, 1)
    m = maximum_probability_map(r, [1, 2], min_probability=0.3, cortex_mask=cortex, gap_id=99)
    assert m[:, 0, 0].tolist() == [2, 99]
    # lazily read maps give the same answer
    assert np.array_equal(maximum_probability_map(list(q), [5, 6]), maximum_probability_map(q, [5, 6]))
    with pytest.raises(InputError, match="0..1"):
        maximum_probability_map(q, [5, 6], min_probability=1.5)


def test_entropy_hand_values():
    p = np.zeros((2, 5, 1, 1))
    p[:, 0, 0, 0] = [0.5, 0.5]      # 1 bit
    p[:, 1, 0, 0] = [0.25, 0.0]     # H(0.25, 0.75)
    p[:, 2, 0, 0] = [1.0, 0.0]      # certain
    p[:, 3, 0, 0] = [0.8, 0.8]      # overlapping soft maps: renormalised to (0.5, 0.5)
    h = entropy_map(p)[:, 0, 0]
    want = [1.0, -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)), 0.0, 1.0, 0.0]
    np.testing.assert_allclose(h, want, atol=1e-6)


def test_probability_maps_hemispheres_and_coverage():
    lab = np.array([[1, 2, -1], [1, 0, 2], [2, 0, 0]]).reshape(3, 3, 1, 1)
    p = probability_maps(lab, [1, 2])
    # voxel 0: brains 1,2 say 1 and brain 3 says 2 -> 2/3, 1/3
    np.testing.assert_allclose(p[:, 0, 0, 0], [2 / 3, 1 / 3])
    # voxel 2: brain 1 does not cover it -> denominators are 2
    np.testing.assert_allclose(p[:, 2, 0, 0], [0, 1 / 2])
    only = probability_maps(lab, [1, 2], hemisphere_brains=[None, np.array([False, True, True])])
    np.testing.assert_allclose(only[1, :, 0, 0], [1 / 2, 0, 1 / 2])


def test_dice():
    assert dice(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == 0.5
    assert math.isnan(dice(np.zeros(3), np.zeros(3)))


# -- aggregate_space end to end -------------------------------------------------------------------
def test_identical_brains_give_binary_maps(tmp_path, tree):
    rng = np.random.default_rng(0)
    grid = Grid((12, 10, 8), (-6.0, -80.0, 0.0), (1.0, 1.0, 1.0))
    lab = np.where(rng.random(grid.shape) < 0.6, rng.choice(ids(tree), size=grid.shape), 0)
    atlas, summary, _ = build(tmp_path, tree, [lab] * 4, grid)
    ds = atlas.maps()
    pm = ds["pmaps"].values
    assert set(np.unique(pm)) <= {0, 100}
    for i, rid in enumerate(ids(tree)):
        assert np.array_equal(pm[i] == 100, lab == rid)
    np.testing.assert_array_equal(atlas.mpm().values, lab)
    assert float(ds["entropy"].values.max()) == 0.0
    assert (ds["coverage"].values == 4).all()
    assert summary.brains == ("B01", "B02", "B03", "B04") and summary.mode == "hard"
    assert summary.mpm_voxels["hOc1_left"] == int((lab == ids(tree)[0]).sum())


def test_aggregate_exact_fractions_index_and_queries(tmp_path, tree):
    grid = Grid((6, 5, 4), (0.0, -70.0, 10.0), (2.0, 2.0, 2.0))
    a, b, c, _ = ids(tree)
    l1 = np.zeros(grid.shape, int)
    l2 = np.zeros(grid.shape, int)
    l3 = np.zeros(grid.shape, int)
    l1[0:3], l2[0:2], l3[1:4] = a, a, a
    l2[3:5], l3[4], l1[5] = c, c, b
    l3[5, 0, 0] = -1  # brain 3 does not cover this voxel
    atlas, _, _ = build(tmp_path, tree, [l1, l2, l3], grid)
    pts = np.array([grid.coords()["x"][[0, 1, 2, 3, 4, 5, 5]],
                    [-70, -70, -70, -70, -70, -70, -68], [10, 10, 10, 10, 10, 10, 10]]).T
    p = atlas.probabilities_at(pts)
    assert list(p.key.values) == AREAS
    # stored as uint8 percent: round(100 * k / n) / 100
    want = np.array([[67, 0, 0, 0], [100, 0, 0, 0], [67, 0, 0, 0], [33, 0, 33, 0],
                     [0, 0, 67, 0], [0, 50, 0, 0], [0, 33, 0, 0]]) / 100
    np.testing.assert_array_equal(p.values, want)
    # MPM: x=3 ties hOc1_left/hOc2_left 1/3 each; neighbourhood: x=2 has hOc1 2/3, x=4 hOc2 2/3
    # over the 3x3x3 box (clipped) both get the same mass -> fixed order: hOc1_left
    assert atlas.labels_at(pts).tolist() == [a, a, a, a, c, b, b]
    cov = atlas.maps()["coverage"].values
    assert cov[5, 0, 0] == 2 and cov[0, 0, 0] == 3
    # query at the 'area' level sums hemispheres; 'lobe' sums everything (clipped to 1)
    [q] = atlas.query(pts[3], level="area", min_probability=0)
    assert [(r["key"], r["probability"]) for r in q["regions"]] == [("hOc1", 0.33), ("hOc2", 0.33)]
    lobe = atlas.probabilities_at(pts, level="lobe")
    assert list(lobe.key.values) == ["occipital_lobe"]
    np.testing.assert_allclose(lobe.values[:, 0], [0.67, 1, 0.67, 0.66, 0.67, 0.5, 0.33])
    assert atlas.labels_at(pts, level="lobe").tolist() == [tree.get("occipital_lobe").id] * 7
    assert set(np.unique(atlas.mpm(level="area").values)) <= {0, tree.get("hOc1").id,
                                                             tree.get("hOc2").id}
    # outside is an explicit answer
    [out] = atlas.query([100, 0, 0])
    assert out["outside"] is True and out["regions"] == []
    assert atlas.labels_at([[100, 0, 0]]).tolist() == [0]


def test_aggregate_bad_input(tmp_path, tree):
    grid = Grid((4, 4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    other = Grid((4, 4, 4), (1.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    lab = np.zeros(grid.shape, np.int16)
    f1 = save(tmp_path / "1.nii.gz", lab, grid)
    f2 = save(tmp_path / "2.nii.gz", lab, other)
    with pytest.raises(GridMismatchError, match="brain B02"):
        aggregate_space({"B01": f1, "B02": f2}, SPACE, AREAS, tree, tmp_path / "a")
    with pytest.raises(UnknownRegionError, match="did you mean"):
        aggregate_space({"B01": f1}, SPACE, ["hOc1_lefft"], tree, tmp_path / "a")
    with pytest.raises(InputError, match="not a leaf"):
        aggregate_space({"B01": f1}, SPACE, ["hOc1"], tree, tmp_path / "a")
    with pytest.raises(UnknownSpaceError):
        aggregate_space({"B01": f1}, "Talairach", AREAS, tree, tmp_path / "a")
    with pytest.raises(InputError, match="cortex mask"):
        aggregate_space({"B01": f1}, SPACE, AREAS, tree, tmp_path / "a",
                        settings=AggregationSettings(gap_label=True))
    with pytest.raises(InputError, match="probability volumes"):
        aggregate_space({"B01": f1}, SPACE, AREAS, tree, tmp_path / "a",
                        settings=AggregationSettings(soft=True))
    fl = save(tmp_path / "f.nii.gz", lab.astype(np.float32) + 0.5, grid)
    with pytest.raises(InputError, match="non-integer"):
        aggregate_space({"B01": fl}, SPACE, AREAS, tree, tmp_path / "a")
    assert not (tmp_path / "a" / "store.zarr" / SPACE).exists()


def test_soft_mode_hemispheres_and_gap(tmp_path, tree):
    grid = Grid((3, 2, 2), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    a, b = ids(tree, ["hOc1_left", "hOc1_right"])
    lab = np.zeros(grid.shape, np.int16)
    probs = {}
    rng = np.random.default_rng(3)
    raw = rng.random((2, 2, *grid.shape)) * 0.5  # brain, area
    for n, brain in enumerate(["B01", "B02"]):
        probs[brain] = {k: label_volume(raw[n, i].astype(np.float32), grid, SPACE)
                        for i, k in enumerate(["hOc1_left", "hOc1_right"])}
    files = {"B01": label_volume(lab, grid, SPACE), "B02": label_volume(lab, grid, SPACE)}
    cortex = np.ones(grid.shape, bool)
    s = aggregate_space(files, SPACE, ["hOc1_left", "hOc1_right"], tree, tmp_path,
                        settings=AggregationSettings(soft=True, gap_label=True,
                                                     mpm_min_probability=0.5),
                        prob_files=probs, cortex_mask=cortex,
                        hemispheres={"B01": ["left"], "B02": ["left", "right"]})
    write_atlas_metadata(tmp_path, name="s", version="1", regions=tree, spaces=[s.maps])
    atlas = load_atlas(tmp_path)
    left = atlas.probability_map("hOc1_left").values
    right = atlas.probability_map("hOc1_right").values
    np.testing.assert_allclose(left, np.rint(raw[:, 0].mean(axis=0) * 100) / 100, atol=1e-6)
    # only B02 has a right hemisphere: its map alone
    np.testing.assert_allclose(right, np.rint(raw[1, 1] * 100) / 100, atol=1e-6)
    p_l, p_r = raw[:, 0].mean(axis=0), raw[1, 1]
    mpm = atlas.mpm().values
    want = np.where(p_l + p_r >= 0.5, np.where(p_r > p_l, b, a), s.gap_id)
    np.testing.assert_array_equal(mpm, want)
    assert s.gap_id == max(r.id for r in tree) + 1 and atlas.gap_id() == s.gap_id
    # the statistics' probability-weighted volumes: of the stored soft maps when asked, else of
    # the labels (none here)
    import pandas as pd

    for from_store, want_l in ((True, left), (False, np.zeros_like(left))):
        res = compute_statistics(tmp_path, tree, ["hOc1_left", "hOc1_right"], {SPACE: files},
                                 maps_from_store=from_store)
        row = pd.read_csv(res.tables["area_summary"]).set_index("area").loc["hOc1_left"]
        assert row.pmap_weighted_volume_mm3 == pytest.approx(want_l.sum(), rel=1e-6)
        assert row.volume_p25_mm3 == (want_l >= 0.25).sum()
        assert row.volume_p50_mm3 == (want_l >= 0.5).sum() and row.volume_mean_mm3 == 0
    with pytest.raises(AtlasDirectoryError, match="no probability maps"):
        compute_statistics(tmp_path / "none", tree, ["hOc1_left"], {SPACE: files},
                           maps_from_store=True)


# -- statistics ----------------------------------------------------------------------------------
def test_statistics_hand_computed(tmp_path, tree):
    grid = Grid((10, 4, 4), (0.0, 0.0, 0.0), (2.0, 1.0, 1.0))  # 2 mm3 voxels
    a, b = ids(tree)[:2]
    labs = []
    sizes_l, sizes_r = [4, 6, 8], [2, 4, 4]
    for n in range(3):
        lab = np.zeros(grid.shape, np.int16)
        lab[: sizes_l[n], 0, 0] = a   # hOc1_left: x voxels 0..size-1
        lab[: sizes_r[n], 1, 0] = b   # hOc1_right
        labs.append(lab)
    files = {f"B{n}": save(tmp_path / f"{n}.nii.gz", lab, grid) for n, lab in enumerate(labs)}
    native = {f"B{n}": save(tmp_path / f"n{n}.nii.gz", lab, grid) for n, lab in enumerate(labs)}
    out = tmp_path / "atlas"
    res = compute_statistics(out, tree, AREAS, {SPACE: files}, native_label_files=native,
                             shrinkage={"B0": 1.0, "B1": 2.0, "B2": 1.0},
                             thresholds=(0.25, 0.5, 1.0))
    assert set(res.tables) == {"brain_area", "area_summary", "asymmetry", "dice_pairwise", "loo_cv"}
    import pandas as pd

    ba = pd.read_csv(res.tables["brain_area"])
    row = ba[(ba.brain == "B1") & (ba.area == "hOc1_left") & (ba.space == "native")].iloc[0]
    assert row.volume_mm3 == 12 and row.volume_corrected_mm3 == 12 * 8  # shrinkage 2 -> x8
    assert row.centroid_x_mm == pytest.approx(5.0) and row.centroid_y_mm == 0
    s = pd.read_csv(res.tables["area_summary"])
    m = s[(s.area == "hOc1_left") & (s.space == SPACE)].iloc[0]
    vols = np.array(sizes_l) * 2.0
    assert m.volume_mean_mm3 == pytest.approx(vols.mean())
    assert m.volume_sd_mm3 == pytest.approx(vols.std(ddof=1), rel=1e-5)
    assert m.cv == pytest.approx(vols.std(ddof=1) / vols.mean(), rel=1e-5)
    cx = np.array([(n - 1) / 2 * 2 for n in sizes_l])  # centroid x of voxels 0..n-1 at 2 mm
    assert m.centroid_x_mm == pytest.approx(cx.mean(), rel=1e-5)
    assert m.centroid_spread_mm == pytest.approx(np.abs(cx - cx.mean()).mean(), rel=1e-5)
    # p map along x: voxels 0-3: 1, 4-5: 2/3, 6-7: 1/3 -> weighted 2*(4 + 4/3 + 2/3) = 12
    assert m.pmap_weighted_volume_mm3 == pytest.approx(12.0, rel=1e-5)
    assert m.volume_p25_mm3 == 16 and m.volume_p50_mm3 == 12
    # pairwise Dice: sizes 4,6,8 nested -> 2*4/10, 2*4/12, 2*6/14
    want = np.array([0.8, 8 / 12, 12 / 14])
    assert m.dice_mean == pytest.approx(want.mean(), rel=1e-5)
    dp = pd.read_csv(res.tables["dice_pairwise"], dtype={"brain_a": str, "brain_b": str})
    got = dp[dp.area == "hOc1_left"].dice.to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # leave-one-out for B0 (4 voxels): others B1 (6), B2 (8) -> p=1 on 0-5, 0.5 on 6-7
    loo = pd.read_csv(res.tables["loo_cv"], dtype={"brain": str})
    r0 = loo[(loo.area == "hOc1_left") & (loo.brain == "B0")].set_index("threshold").dice
    assert r0[0.25] == pytest.approx(2 * 4 / 12) and r0[1.0] == pytest.approx(2 * 4 / 10)
    # asymmetry (reference space): L = 8,12,16 ; R = 4,8,8
    asy = pd.read_csv(res.tables["asymmetry"])
    ar = asy[(asy.area == "hOc1") & (asy.space == SPACE)].iloc[0]
    lv, rv = np.array([8, 12, 16.0]), np.array([4, 8, 8.0])
    ai = (lv - rv) / ((lv + rv) / 2)
    from scipy import stats

    t = stats.ttest_rel(lv, rv)
    assert ar.ai_mean == pytest.approx(ai.mean(), rel=1e-5)
    assert ar.t_statistic == pytest.approx(t.statistic, rel=1e-5)
    assert ar.p_value == pytest.approx(t.pvalue, rel=1e-5)
    # an area nobody has: volumes 0, no centroid, Dice undefined
    e = s[(s.area == "hOc2_left") & (s.space == SPACE)].iloc[0]
    assert e.volume_mean_mm3 == 0 and e.n_brains == 0 and math.isnan(e.dice_mean)

    # reading through the atlas, filtered by region (a parent selects its leaves)
    (out / "regions.json").parent.mkdir(exist_ok=True)
    sp = aggregate_space(files, SPACE, AREAS, tree, out)
    write_atlas_metadata(out, name="s", version="1", regions=tree, spaces=[sp.maps])
    st = load_atlas(out).statistics("hOc1")
    assert set(st["area_summary"].area) == {"hOc1_left", "hOc1_right"}
    assert set(st["asymmetry"].area) == {"hOc1"}
    with pytest.raises(UnknownRegionError):
        load_atlas(out).statistics("hOcc9")


# -- region maps, centroid, sigma queries and locate on a built atlas -------------------------------
@pytest.fixture()
def c_atlas(tmp_path, tree):
    """A C-shaped hOc1_left (centre of mass outside it) and a half-space hOc2_left."""
    grid = Grid((21, 21, 11), (-10.0, -10.0, -5.0), (1.0, 1.0, 1.0))
    a, _, c, _ = ids(tree)
    lab = np.zeros(grid.shape, np.int16)
    x, y = np.meshgrid(np.arange(21) - 10, np.arange(21) - 10, indexing="ij")
    ring = (x**2 + y**2 <= 64) & (x**2 + y**2 >= 25) & ~((x > 0) & (np.abs(y) < 4))
    lab[ring, :] = a
    lab[:, :, :5][~ring[..., None].repeat(5, axis=2)] = c  # lower half (z < 0) outside the ring
    atlas, _, _ = build(tmp_path, tree, [lab, lab], grid)
    return atlas, lab, grid


def test_region_mask_centroid_inside_volume_bbox(c_atlas, tree):
    atlas, lab, grid = c_atlas
    info = atlas.region_info("hOc1_left")
    mask = lab == tree.get("hOc1_left").id
    assert info["n_voxels"] == int(mask.sum()) and info["volume_mm3"] == float(mask.sum())
    cen = np.array(info["centroid_mm"])
    idx, inside = grid.nearest_voxel(cen)
    assert inside[0] and mask[tuple(idx[0])]  # the centroid lies in the region
    com = np.argwhere(mask).mean(axis=0) + np.array(grid.origin)
    assert not mask[tuple(np.rint(com - np.array(grid.origin)).astype(int))]  # a C: COM outside
    assert info["bbox_mm"] == [[-8.0, -8.0, -5.0], [6.0, 8.0, 5.0]]  # the C opens towards +x
    # parents merge their children (MPM mask and thresholded map)
    both = atlas.region_mask("occipital_lobe").values
    assert np.array_equal(both, lab > 0)
    assert np.array_equal(atlas.region_mask("hOc1", threshold=0.5).values, mask)
    np.testing.assert_array_equal(inside_centroid(np.array([[0.0, 0, 0], [2, 0, 0], [9, 0, 0]])),
                                  [2.0, 0, 0])


def test_sigma_queries_are_gaussian(c_atlas, tree):
    atlas, lab, grid = c_atlas
    # deep inside the half-space region (z well below 0, away from the ring): everything is hOc2
    [q] = atlas.query([[-9, 9, -4]], sigma_mm=0.3)
    assert q["regions"][0]["key"] == "hOc2_left" and q["regions"][0]["probability"] == 1.0
    # on a plane boundary between hOc2 (z <= -1) and nothing (z >= 0), at z = -0.5: by symmetry
    # of the Gaussian half of the mass is on either side (the ring is more than 3 sigma away)
    ds = atlas.gaussian_at([[-9.5, 9.5, -0.5]], 1.0)
    i = list(ds.key.values).index("hOc2_left")
    # the point is 0.5 mm from the grid's corner in x and y: mass outside the volume
    # counts as 0, reported in volume_fraction
    vf = float(ds.volume_fraction[0])
    assert 0.5 < vf < 0.9
    assert float(ds.mass_inside[0, i]) == pytest.approx(vf / 2, abs=1e-9)
    assert float(ds.probability[0, i]) == pytest.approx(vf / 2, abs=1e-9)
    # brute-force reference on the voxel grid: weights exp(-d^2/2s^2) within 3 sigma
    p = np.array([2.3, -3.7, 0.6])
    s = 1.5
    X, Y, Z = np.meshgrid(*grid.coords().values(), indexing="ij")
    d2 = (X - p[0]) ** 2 + (Y - p[1]) ** 2 + (Z - p[2]) ** 2
    w = np.where(d2 <= 9 * s * s, np.exp(-d2 / (2 * s * s)), 0)
    w /= w.sum()
    pm = atlas.probability_map("hOc1_left").values
    ds = atlas.gaussian_at(p, s)
    j = list(ds.key.values).index("hOc1_left")
    assert float(ds.probability[0, j]) == pytest.approx(float((w * pm).sum()), abs=1e-9)
    in_a = lab == tree.get("hOc1_left").id
    assert float(ds.mass_inside[0, j]) == pytest.approx(float(w[in_a].sum()), abs=1e-9)
    # levels with sigma: the lobe is the union
    lobe = atlas.gaussian_at(p, s, level="lobe")
    assert float(lobe.mass_inside[0, 0]) == pytest.approx(float(w[lab > 0].sum()), abs=1e-9)
    with pytest.raises(InputError, match="> 0"):
        atlas.query([0, 0, 0], sigma_mm=0)
    with pytest.raises(InputError, match="absurdly large"):
        atlas.query([0, 0, 0], sigma_mm=80)
    with pytest.raises(InputError, match="unknown level"):
        atlas.query([0, 0, 0], level="galaxy")
    [far] = atlas.query([[500, 0, 0]], sigma_mm=2)
    assert far["outside"] is True and far["regions"] == []


def test_sigma_kernel_is_a_sphere_not_a_cube(tmp_path, tree):
    grid = Grid((7, 7, 7), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    lab = np.zeros(grid.shape, np.int16)
    lab[5, 5, 5] = tree.get("hOc1_left").id  # a voxel at (2, 2, 2) from the query: 3.46 mm
    atlas, _, _ = build(tmp_path, tree, [lab], grid)
    near = atlas.gaussian_at([[3, 3, 3]], 0.8)  # 3 sigma = 2.4 mm: the cube would reach it
    assert float(np.nansum(near.probability.values)) == 0
    far = atlas.gaussian_at([[3, 3, 3]], 1.2)  # 3 sigma = 3.6 mm: inside the sphere
    w = math.exp(-12 / (2 * 1.2**2))
    ax = np.arange(-3, 4)
    d2 = (ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
    total = np.exp(-d2 / (2 * 1.2**2))[d2 <= 3.6**2].sum()
    j = list(far.key.values).index("hOc1_left")
    assert float(far.probability[0, j]) == pytest.approx(w / total, rel=1e-9)


class FakeGraph:
    """Moves points by +100 mm in x from the primary space to BigBrain."""

    def map_points(self, pts, a, b):
        pts = np.asarray(pts, float)
        if a == b:
            return pts.copy()
        return pts + (100.0 if b == "BigBrain" else -100.0) * np.array([1, 0, 0])


class FakeReconstruction:
    def section_at(self, pts):
        pts = np.asarray(pts)
        return (np.full(len(pts), 1201), pts[:, 2] * 10, pts[:, 0] * 10)


class FakeReconstructionArray:
    """The (n, 3) array form, NaN beyond the sections (x > 95 mm here)."""

    def section_at(self, pts):
        pts = np.asarray(pts)
        out = np.stack([np.full(len(pts), 7.0), pts[:, 2], pts[:, 0]], axis=1)
        out[pts[:, 0] > 95] = np.nan
        return out


def test_locate_through_graph_and_sections(c_atlas, tmp_path):
    atlas = c_atlas[0]
    [r] = atlas.locate([[-7, 0, 2]], to="BigBrain", graph=FakeGraph(),
                       reconstruction=FakeReconstruction())
    assert r["area"]["key"] == "hOc1_left"
    t = r["targets"]["BigBrain"]
    assert t["point"] == [93.0, 0.0, 2.0]
    assert t["area"] is None and t["inside"] is None  # no maps in BigBrain in this atlas
    assert t["section"] == {"number": 1201, "row": 20.0, "col": 930.0}
    [r] = atlas.locate([[-7, 0, 2]], to="BigBrain", graph=FakeGraph())
    assert "no reconstruction" in r["targets"]["BigBrain"]["section"]["unavailable"]
    a, b, c = atlas.locate([[-7, 0, 2], [-4, 1, 1], [-3, 0, 0]], to=["BigBrain"], graph=FakeGraph(),
                           reconstruction=FakeReconstructionArray())
    assert a["targets"]["BigBrain"]["section"] == {"number": 7, "row": 2.0, "col": 93.0}
    assert "outside" in b["targets"]["BigBrain"]["section"]["unavailable"]
    assert c["targets"]["BigBrain"]["point"] == [97.0, 0.0, 0.0]
    # the primary space itself as a target: identity through the graph, the MPM label there
    [d] = atlas.locate([[-7, 0, 2]], to=SPACE, graph=FakeGraph())
    assert d["targets"][SPACE]["area"]["key"] == "hOc1_left" and d["targets"][SPACE]["inside"]
    with pytest.raises(UnknownSpaceError):
        atlas.locate([[0, 0, 0]], to="Mars", graph=FakeGraph())
    with pytest.raises(InputError, match="NaN"):
        atlas.locate([[0, np.nan, 0]], graph=FakeGraph())


def test_incomplete_built_atlas(c_atlas):
    atlas, _, _ = c_atlas
    with pytest.raises(AtlasDirectoryError, match="no statistics"):
        atlas.statistics()
    import shutil

    shutil.rmtree(atlas.path / "store.zarr" / SPACE / "index")
    fresh = load_atlas(atlas.path)  # no index: the dense chunked read answers the same
    pts = np.random.default_rng(0).uniform(-11, 11, size=(200, 3))
    np.testing.assert_array_equal(fresh.probabilities_at(pts).values, atlas.probabilities_at(pts).values)


def test_text_forms(c_atlas, tree, tmp_path):
    from atlasbuilder.atlas import format_located, format_statistics

    atlas, lab, grid = c_atlas
    text = format_located(atlas.locate([[-7, 0, 2]], to="BigBrain", graph=FakeGraph(),
                                       reconstruction=FakeReconstruction()))
    assert "hOc1_left" in text and "-> BigBrain (93.00, 0.00, 2.00)" in text and "section 1201" in text
    files = {f"B{n}": save(tmp_path / f"s{n}.nii.gz", lab, grid) for n in range(2)}
    compute_statistics(atlas.path, tree, AREAS, {SPACE: files})
    text = format_statistics(load_atlas(atlas.path).statistics("hOc1"))
    assert "per area" in text and "hOc1_left" in text and "hOc2_left" not in text
