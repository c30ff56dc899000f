"""Tests of the ANTs boundary: directions (points vs image warps), LPS handling, composition,
inverse, caching, determinism and error paths, on small (4 mm) synthetic volumes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from atlasbuilder import registration as R
from atlasbuilder.errors import AtlasBuilderError, InputError, MissingFileError, StageError
from atlasbuilder.volumes import Grid, from_array, grid_of

MNI = "MNI152NLin2009cAsym"
SUBJ = "subject:S1"
# the subject's true point map subject -> MNI: y = A x
A_TRUE = np.array([[1.05, 0.0, 0.0, 6.0], [0.0, 0.97, 0.0, -4.0], [0.0, 0.0, 1.0, 3.0], [0, 0, 0, 1]])


def _coords(g: Grid) -> np.ndarray:
    return np.stack(np.meshgrid(*g.coords().values(), indexing="ij"), -1).reshape(-1, 3)


def _blob(g: Grid, centre, space: str, sigma: float = 6.0):
    x = _coords(g)
    v = np.exp(-np.sum((x - np.asarray(centre)) ** 2, axis=1) / (2 * sigma**2)).reshape(g.shape)
    return from_array(v.astype(np.float32), g, space, name="image")


def _centre(ds) -> np.ndarray:
    g = grid_of(ds)
    v = np.asarray(ds[next(iter(ds.data_vars))].values, dtype=np.float64)
    v = np.where(v > 0.05 * v.max(), v, 0)
    return np.asarray(ndimage.center_of_mass(v)) * np.asarray(g.spacing) + np.asarray(g.origin)


@pytest.fixture(scope="module", autouse=True)
def one_itk_thread():
    """Fix this process's ITK pool at one thread before anything imports ANTs, so that the
    registrations below (threads=1) run in-process; a child process costs an ANTs import."""
    R._import_ants(1)


@pytest.fixture(scope="module")
def pair():
    """(moving in subject:S1, fixed in MNI) at 4 mm; moving(x) = fixed(A_TRUE x)."""
    from atlasbuilder.spaces import get_space

    t = get_space(MNI).load_template()
    g = grid_of(t)
    arr = ndimage.zoom(t["template"].values, 0.25, order=1).astype(np.float32)
    g4 = Grid(arr.shape, g.origin, (4.0, 4.0, 4.0))
    x = _coords(g4)
    y = x @ A_TRUE[:3, :3].T + A_TRUE[:3, 3]
    mov = ndimage.map_coordinates(arr, ((y - np.asarray(g4.origin)) / 4.0).T, order=1).reshape(g4.shape)
    return (from_array(mov.astype(np.float32), g4, SUBJ, name="image"),
            from_array(arr, g4, MNI, name="image"))


@pytest.fixture(scope="module")
def affine_tr(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("reg") / "affine"
    return R.register(pair[0], pair[1], out, preset="affine", source_space=SUBJ, target_space=MNI,
                      resolution_mm=None)


@pytest.fixture(scope="module")
def syn_tr(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("reg") / "syn"
    return R.register(pair[0], pair[1], out, preset="synquick", source_space=SUBJ, target_space=MNI,
                      resolution_mm=None, threads=1, seed=3)


def _write_mat(path: Path, translation_lps, matrix=None) -> str:
    """An ANTs affine file (LPS), as an external tool would have written it."""
    ants = R._import_ants()
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    matrix=np.eye(3) if matrix is None else np.asarray(matrix),
                                    translation=tuple(float(v) for v in translation_lps))
    ants.write_transform(tx, str(path))
    return str(path)


# --- directions and LPS ------------------------------------------------------------------------
def test_lps_convention_of_a_known_ants_affine(tmp_path):
    """A forward file maps target points to source points in LPS: translation (1, 2, 3) LPS as a
    target -> source point map moves source points to target by (+1, +2, -3) RAS; an image
    moves the same way as points."""
    mat = _write_mat(tmp_path / "t.mat", (1.0, 2.0, 3.0))
    tr = R.transform_from_files("subject:S1", MNI, [mat])
    p = np.array([[10.0, -20.0, 5.0], [0.0, 0.0, 0.0]])
    shift = np.array([1.0, 2.0, -3.0])
    np.testing.assert_allclose(tr.map_points(p), p + shift, atol=1e-5)
    np.testing.assert_allclose(tr.inverse().map_points(p), p - shift, atol=1e-5)
    g = Grid((30, 30, 30), (-30.0, -30.0, -30.0), (2.0, 2.0, 2.0))
    moved = tr.warp(_blob(g, (4.0, -6.0, 2.0), SUBJ), g)
    assert moved.attrs["space"] == MNI
    np.testing.assert_allclose(_centre(moved), [5.0, -4.0, -1.0], atol=0.1)


def test_affine_registration_recovers_truth(affine_tr):
    p = np.array([[10.0, -20.0, 5.0], [-30.0, 10.0, 20.0], [20.0, 30.0, -10.0]])
    truth = p @ A_TRUE[:3, :3].T + A_TRUE[:3, 3]
    assert np.abs(affine_tr.map_points(p) - truth).max() < 1.0


@pytest.mark.parametrize("which", ["affine_tr", "syn_tr"])
def test_points_follow_image_warps_both_directions(which, pair, request):
    tr = request.getfixturevalue(which)
    g = grid_of(pair[0])
    for centre in ([10.0, -20.0, 5.0], [-25.0, 15.0, 20.0]):
        # source -> target
        warped = tr.warp(_blob(g, centre, SUBJ), pair[1])
        np.testing.assert_allclose(_centre(warped), tr.map_points([centre])[0], atol=1.0)
        # target -> source
        back = tr.inverse().warp(_blob(g, centre, MNI), pair[0])
        assert back.attrs["space"] == SUBJ
        np.testing.assert_allclose(_centre(back), tr.inverse().map_points([centre])[0], atol=1.0)


def test_round_trip_and_inverse(syn_tr, pair):
    rng = np.random.default_rng(0)
    p = rng.uniform(-40, 40, size=(200, 3))
    there = syn_tr.map_points(p)
    assert np.median(np.linalg.norm(there - p, axis=1)) > 3  # it does move points
    back = syn_tr.inverse().map_points(there)
    assert np.median(np.linalg.norm(back - p, axis=1)) < 0.1
    inv = syn_tr.inverse()
    assert (inv.source, inv.target) == (MNI, SUBJ)
    assert inv.inverse() == syn_tr


def test_label_warp_keeps_labels_and_dtype(affine_tr, pair):
    g = grid_of(pair[0])
    lab = np.zeros(g.shape, np.int16)
    lab[10:20, 10:25, 10:20] = 81
    lab[25:35, 20:30, 15:25] = 90
    out = affine_tr.warp(from_array(lab, g, SUBJ, name="labels"), pair[1], interpolation="label")
    assert out["labels"].dtype == np.int16
    assert set(np.unique(out["labels"].values)) <= {0, 81, 90}
    assert (out["labels"].values == 90).sum() > 0.8 * (lab == 90).sum()
    stack = from_array(np.stack([lab == 81, lab == 90], -1).astype(np.float32), g, SUBJ, name="probability")
    ws = affine_tr.warp(stack, pair[1])
    assert ws["probability"].dims == ("region", "x", "y", "z")
    np.testing.assert_allclose(ws["probability"].isel(region=1).values,
                               affine_tr.warp(from_array((lab == 90).astype(np.float32), g, SUBJ),
                                              pair[1])["image"].values, atol=1e-6)


def test_stack_warp_by_coordinates_equals_one_warp_per_map(syn_tr, pair, tmp_path, monkeypatch):
    """A stack of >= STACK_BY_COORDINATES maps is warped through the source position of every
    target voxel: the same values as one ANTs warp per map (SyN, and a two-hop graph path),
    maps that reach the source image's border included."""
    g = grid_of(pair[0])
    rng = np.random.default_rng(5)
    maps = ndimage.gaussian_filter(rng.random((6, *g.shape)), (0, 2, 2, 2)).astype(np.float32)
    maps[1] = 0
    maps[1][:, :, :3] = 1.0  # a slab on the border of the source grid
    maps[2] = (maps[2] > np.median(maps[2])).astype(np.float32)  # hard edges
    stack = from_array(np.moveaxis(maps, 0, -1), g, SUBJ, name="probability")
    mat = _write_mat(tmp_path / "mni_bb.mat", (3.0, -2.0, 1.0), matrix=np.diag([1.02, 0.98, 1.0]))
    graph = R.TransformGraph()
    graph.add(syn_tr)
    graph.add(R.transform_from_files(MNI, "BigBrain", [mat]))
    assert len(maps) >= R.STACK_BY_COORDINATES
    fast = [syn_tr.warp(stack, pair[1]), graph.warp(stack, "BigBrain", g)]
    monkeypatch.setattr(R, "STACK_BY_COORDINATES", 10**9)
    slow = [syn_tr.warp(stack, pair[1]), graph.warp(stack, "BigBrain", g)]
    for f, sl in zip(fast, slow, strict=True):
        a, b = f["probability"].values, sl["probability"].values
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32
        assert (b[1] > 0.5).sum() > 0  # the border slab reached the target grid
        np.testing.assert_allclose(a, b, atol=1e-4)


# --- the graph -----------------------------------------------------------------------------
def test_graph_composes_and_inverts(syn_tr, pair, tmp_path):
    mat = _write_mat(tmp_path / "mni_bb.mat", (3.0, -2.0, 1.0), matrix=np.diag([1.02, 0.98, 1.0]))
    bb = R.write_transform(R.transform_from_files(MNI, "BigBrain", [mat]), tmp_path / "transforms" / "mni_bb")
    subj_dir = R.write_transform(syn_tr, tmp_path / "brains" / "S1" / "registration" / MNI)
    graph = R.TransformGraph.from_directory(tmp_path)
    assert graph.spaces == ["BigBrain", MNI, SUBJ]
    assert [(t.source, t.target) for t in graph.path(SUBJ, "BigBrain")] == [(SUBJ, MNI), (MNI, "BigBrain")]
    p = np.random.default_rng(1).uniform(-40, 40, size=(50, 3))
    composed = graph.map_points(p, SUBJ, "BigBrain")
    np.testing.assert_allclose(composed, bb.map_points(subj_dir.map_points(p)), atol=1e-4)
    np.testing.assert_allclose(graph.map_points(composed, "BigBrain", SUBJ), p, atol=0.1)
    # one resampling along the path puts an image where the points go
    g = grid_of(pair[0])
    w = graph.warp(_blob(g, [5.0, -10.0, 8.0], SUBJ), "BigBrain", g)
    assert w.attrs["space"] == "BigBrain"
    np.testing.assert_allclose(_centre(w), graph.map_points([5.0, -10.0, 8.0], SUBJ, "BigBrain")[0],
                               atol=1.0)
    np.testing.assert_array_equal(graph.map_points(p, MNI, MNI), p)


def test_graph_without_path_names_both_spaces(syn_tr):
    graph = R.TransformGraph([syn_tr])
    with pytest.raises(R.NoTransformPathError, match=r"subject:S1 to BigBrain"):
        graph.map_points([[0, 0, 0]], SUBJ, "BigBrain")
    with pytest.raises(R.NoTransformPathError, match="MNI152NLin6Asym"):
        graph.path("MNI152NLin6Asym", MNI)


# --- files, atomicity, determinism --------------------------------------------------------------
def test_transform_json_records_the_run(syn_tr):
    doc = json.loads((syn_tr.directory / "transform.json").read_text())
    assert (doc["source"], doc["target"], doc["preset"], doc["seed"]) == (SUBJ, MNI, "synquick", 3)
    assert doc["forward"] == [["1Warp.nii.gz", False], ["0GenericAffine.mat", False]]
    assert doc["inverse"] == [["0GenericAffine.mat", True], ["1InverseWarp.nii.gz", False]]
    assert doc["timing"]["seconds"] > 0 and "antspyx" in doc["versions"]
    assert "--random-seed" in doc["arguments"]


def _arrays(tr: R.Transform) -> list[np.ndarray]:
    out = []
    for p, _ in tr.forward_files + tr.inverse_files:
        ants = R._import_ants()
        out.append(ants.image_read(p).numpy() if p.endswith(".nii.gz")
                   else np.asarray(ants.read_transform(p).parameters))
    return out


def test_deterministic_with_seed_and_one_thread(pair, syn_tr, tmp_path):
    again = R.register(pair[0], pair[1], tmp_path / "again", preset="synquick", source_space=SUBJ,
                       target_space=MNI, resolution_mm=None, threads=1, seed=3)
    for a, b in zip(_arrays(syn_tr), _arrays(again), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_child_process_gives_the_same_result(pair, syn_tr, tmp_path, monkeypatch):
    """The child-process path (asked for another ITK thread count than this process has)."""
    monkeypatch.setattr(R, "_in_process_ok", lambda threads: False)
    child = R.register(pair[0], pair[1], tmp_path / "child", preset="synquick", source_space=SUBJ,
                       target_space=MNI, resolution_mm=None, threads=1, seed=3)
    for a, b in zip(_arrays(syn_tr), _arrays(child), strict=True):
        np.testing.assert_array_equal(a, b)


def test_interrupted_registration_leaves_no_directory(pair, tmp_path, monkeypatch):
    def boom(job, what):
        raise StageError("ANTs failed (simulated)")

    monkeypatch.setattr(R, "_run_job", boom)
    with pytest.raises(StageError):
        R.register(pair[0], pair[1], tmp_path / "out", preset="rigid", source_space=SUBJ, target_space=MNI)
    assert list(tmp_path.iterdir()) == []


def test_ants_arguments_follow_parameters():
    args = R.ants_arguments("f.nii", "m.nii", "p_", R.PRESETS["synquick"], seed=7, fixed_mask="fm.nii")
    text = " ".join(args)
    assert "--random-seed 7" in text and "Rigid[0.1]" in text and "SyN[0.2,3.0,0]" in text
    assert "--convergence [40x20,1e-6,10] --shrink-factors 4x2" in text
    assert "--masks [fm.nii,NULL]" in text
    assert "SyN" not in " ".join(R.ants_arguments("f", "m", "p", R.PRESETS["affine"], seed=0))


# --- templates, cache, precomputed ---------------------------------------------------------------
def test_register_templates_caches_and_copies(pair, tmp_path, monkeypatch):

    from atlasbuilder.volumes import to_nifti

    files = {}
    for name, ds in (("MNI152NLin6Asym", pair[0]), (MNI, pair[1])):
        files[name] = tmp_path / f"{name}.nii.gz"
        nib.save(to_nifti(ds), files[name])
    kw = {"preset": "affine", "resolution_mm": 4.0, "templates": files, "cache_dir": tmp_path / "cache"}
    tr = R.register_templates("MNI152NLin6Asym", MNI, tmp_path / "atlas/transforms/a", **kw)
    assert (tr.source, tr.target) == ("MNI152NLin6Asym", MNI)
    assert len(list((tmp_path / "cache/registration").iterdir())) == 1

    def no_ants(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(R, "register", no_ants)
    again = R.register_templates("MNI152NLin6Asym", MNI, tmp_path / "atlas/transforms/b", **kw)
    p = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(again.map_points(p), tr.map_points(p))
    assert again.directory == tmp_path / "atlas/transforms/b"


def test_precomputed_transforms_from_manifest(tmp_path):
    mat = _write_mat(tmp_path / "bb.mat", (0.0, 0.0, 5.0))
    tr = R.register_templates("BigBrain", MNI, precomputed={"MNI152NLin2009cAsym->BigBrain":
                                                            {"forward": [mat], "inverse": [f"[{mat},1]"]}})
    assert (tr.source, tr.target) == ("BigBrain", MNI)
    np.testing.assert_allclose(tr.map_points([[0.0, 0.0, 0.0]]), [[0.0, 0.0, 5.0]], atol=1e-5)


# --- QA -----------------------------------------------------------------------------------------
def test_registration_qa(syn_tr, pair, tmp_path):
    png = tmp_path / "qa.png"
    qa = R.registration_qa(syn_tr, R.brain_mask(pair[0]), R.brain_mask(pair[1]), png,
                           moving_image=pair[0], fixed_image=pair[1])
    assert qa["dice"] > 0.9
    assert qa["roundtrip_median_mm"] < 0.1
    # the forward point map (MNI -> subject) shrinks volumes by about 1 / det(A_TRUE)
    assert 0 < qa["jacobian_min"] < 1 / np.linalg.det(A_TRUE[:3, :3]) < qa["jacobian_max"] < 1.3
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_brain_mask_otsu_on_noisy_background():
    rng = np.random.default_rng(0)
    g = Grid((20, 20, 20), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    arr = rng.uniform(5, 10, g.shape).astype(np.float32)
    arr[5:15, 5:15, 5:15] = 100
    m = R.brain_mask(from_array(arr, g, SUBJ))
    assert int(m["mask"].values.sum()) == 1000


# --- bad input -----------------------------------------------------------------------------------
def test_bad_transform_directories(tmp_path, syn_tr):
    with pytest.raises(MissingFileError, match="transform directory not found"):
        R.load_transform(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="transform.json"):
        R.load_transform(tmp_path / "empty")
    with pytest.raises(R.TransformSpaceError, match="does not connect BigBrain"):
        R.load_transform(syn_tr.directory, source="BigBrain", target=MNI)
    assert R.load_transform(syn_tr.directory, source=MNI).source == MNI  # oriented as asked


def test_bad_inputs(pair, syn_tr, tmp_path):
    with pytest.raises(InputError, match="unknown registration preset 'fast'"):
        R.register(pair[0], pair[1], tmp_path / "a", preset="fast", source_space=SUBJ, target_space=MNI)
    empty = from_array(np.zeros(grid_of(pair[0]).shape, np.uint8), grid_of(pair[0]), SUBJ, name="mask")
    with pytest.raises(InputError, match="moving_mask: the mask is empty"):
        R.register(pair[0], pair[1], tmp_path / "b", preset="rigid", moving_mask=empty,
                   source_space=SUBJ, target_space=MNI)
    with pytest.raises(R.TransformSpaceError, match="in space 'MNI152NLin2009cAsym', expected 'subject:S1'"):
        syn_tr.warp(pair[1], pair[1])
    with pytest.raises(R.TransformSpaceError, match="moving image"):
        R.register(pair[1], pair[1], tmp_path / "c", source_space=SUBJ, target_space=MNI)
    with pytest.raises(InputError, match="'BigBrain' has no template"):
        R.register_templates(MNI, "BigBrain", tmp_path / "d")
    with pytest.raises(MissingFileError, match="template of space BigBrain"):
        R.register_templates(MNI, "BigBrain", tmp_path / "e", templates={"BigBrain": tmp_path / "x.nii"})
    with pytest.raises(MissingFileError):
        R.transform_from_files(MNI, "BigBrain", [tmp_path / "missing.mat"])
    assert not any(p.name in "abcde" for p in tmp_path.iterdir())
    assert issubclass(R.NoTransformPathError, AtlasBuilderError)


def test_register_subject_uses_brain_masks(pair, tmp_path):
    tr = R.register_subject(pair[0], MNI, pair[1], tmp_path / "B", preset="affine", resolution_mm=None)
    assert (tr.source, tr.target) == (SUBJ, MNI)
    assert tr.directory is not None
    doc = json.loads((tr.directory / "transform.json").read_text())
    assert doc["masks"] == {"fixed": True, "moving": True}
    p = np.array([[10.0, -20.0, 5.0]])
    assert np.abs(tr.map_points(p) - (p @ A_TRUE[:3, :3].T + A_TRUE[:3, 3])).max() < 1.0
    with pytest.raises(InputError, match="source_space"):
        R.register_subject(tmp_path / "x.nii.gz", MNI, pair[1], tmp_path / "C")


def test_importing_the_module_does_not_import_ants():
    import subprocess
    import sys

    code = "import sys, atlasbuilder.registration; print('ants' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
