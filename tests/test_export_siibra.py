"""siibra export: loaded offline by siibra (in a subprocess with a timeout), and siibra's answers
(assign, fetch, label lookup) agree with Atlas.query: exactly for the MPM, to float32 precision
for probabilities."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_small_atlas_files

from atlasbuilder.atlas import load_atlas
from atlasbuilder.errors import InputError
from atlasbuilder.export.siibra import parcellation_name, space_id, write_siibra_configuration
from atlasbuilder.importing import import_atlas

pytest.importorskip("siibra")

# Runs in a fresh interpreter: siibra's default configuration needs the network and can hang, so
# use_configuration comes before anything touches a registry, and a dead proxy makes any
# accidental network access fail at once instead of hanging.
SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import siibra
    cfg, parc, space, points_file = sys.argv[1:5]
    siibra.use_configuration(cfg)
    pts = json.load(open(points_file))
    out = {"parcellations": [p.name for p in siibra.parcellations],
           "spaces": [s.id for s in siibra.spaces], "atlases": [a.name for a in siibra.atlases]}
    p = siibra.parcellations[parc]
    out["regions"] = sorted(r.name for r in p if r is not p)
    out["parents"] = {r.name: r.parent.name for r in p if r.parent is not None}
    lab = siibra.get_map(parc, space, "labelled")
    stat = siibra.get_map(parc, space, "statistical")
    img = lab.fetch()
    out["mpm_sum"] = int(np.asarray(img.dataobj, dtype=np.int64).sum())
    out["mpm_affine"] = img.affine.tolist()
    out["labels"] = {str(l): lab.get_region(label=l).name for l in sorted(lab.labels)}
    first = out["labels"][str(min(lab.labels))]
    pimg = stat.fetch(region=first)
    out["pmap_first"] = [first, float(np.asarray(pimg.dataobj, dtype=np.float64).sum())]
    # one PointCloud per map: siibra reads each map volume once, not once per point
    cloud = siibra.PointCloud([tuple(p) for p in pts], space=space)
    answers = [{"mpm": [], "probs": []} for _ in pts]
    for field, m in (("mpm", lab), ("probs", stat)):
        df = m.assign(cloud, lower_threshold=0.0)
        if len(df) == 0:  # an empty assignment has no columns at all
            continue
        for n, r, v in zip(df["input structure"], df["region"], df["map value"]):
            answers[int(n)][field].append([r.name, float(v)])
    for a in answers:
        a["probs"].sort()
    out["answers"] = answers
    print("RESULT" + json.dumps(out))
""")


def run_siibra(cfg: Path, parc: str, space: str, points: np.ndarray, tmp_path: Path,
               timeout: float = 300) -> dict:
    pf = tmp_path / "points.json"
    pf.write_text(json.dumps(points.tolist()))
    script = tmp_path / "siibra_check.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, SIIBRA_CACHEDIR=str(tmp_path / "siibra-cache"), SIIBRA_LOG_LEVEL="ERROR",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", NO_PROXY="")
    proc = subprocess.run([sys.executable, str(script), str(cfg), parc, space, str(pf)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def sample_points(atlas, n: int, seed: int) -> np.ndarray:
    """Points near voxel centres (within 0.3 voxel), half of them inside the MPM's regions."""
    rng = np.random.default_rng(seed)
    sm = atlas.space_maps()
    mpm = atlas.mpm().values
    labelled = np.argwhere(mpm > 0)
    anywhere = rng.integers(0, sm.grid.shape, size=(n - n // 2, 3))
    ijk = np.vstack([labelled[rng.choice(len(labelled), n // 2, replace=False)], anywhere])
    jitter = rng.uniform(-0.3, 0.3, size=ijk.shape) * np.asarray(sm.grid.spacing)
    return nib.affines.apply_affine(sm.grid.affine, ijk) + jitter


def check_agreement(atlas_dir: Path, cfg: Path, points: np.ndarray, tmp_path: Path) -> dict:
    atlas = load_atlas(atlas_dir)
    space = atlas.spaces[0]
    sid = space_id(atlas, space)
    res = run_siibra(cfg, parcellation_name(atlas), sid, points, tmp_path)
    assert res["parcellations"] == [parcellation_name(atlas)]
    assert res["spaces"] == [sid]
    assert sorted(r.name for r in atlas.regions) == res["regions"]
    for r in atlas.regions:  # the hierarchy survived
        parent = atlas.regions.parent(r)
        assert res["parents"][r.name] == (parcellation_name(atlas) if parent is None else parent.name)
    mpm = atlas.mpm().values
    assert res["mpm_sum"] == int(mpm.astype(np.int64).sum())
    np.testing.assert_allclose(res["mpm_affine"], atlas.space_maps().grid.affine)
    names = {r.id: r.name for r in atlas.map_regions()}
    present = set(np.unique(mpm).tolist()) - {0}
    assert {int(k): v for k, v in res["labels"].items()} == names
    first = min(names)
    assert res["pmap_first"][0] == names[first]
    want_sum = float(atlas.probability_map(first).values.astype(np.float64).sum())
    assert res["pmap_first"][1] == pytest.approx(want_sum, rel=1e-6)
    assert present <= set(names)
    answers = atlas.query(points, min_probability=0.0)
    idx, _ = atlas.space_maps().grid.nearest_voxel(points)
    n_labelled = 0
    for n, (mine, theirs) in enumerate(zip(answers, res["answers"], strict=True)):
        label = int(mpm[tuple(idx[n])])
        if label == 0:
            assert theirs["mpm"] == [], n
        else:
            n_labelled += 1
            assert theirs["mpm"] == [[names[label], float(label)]], n
        want = sorted([r["name"], r["probability"]] for r in mine["regions"])
        assert [w[0] for w in want] == [t[0] for t in theirs["probs"]], n
        np.testing.assert_allclose([t[1] for t in theirs["probs"]], [w[1] for w in want],
                                   rtol=1e-6, atol=0)
    assert n_labelled >= 10
    return res


def test_siibra_loads_offline_and_agrees(tmp_path):
    pm, labels = make_small_atlas_files(tmp_path)
    atlas_dir = import_atlas(pm, labels, tmp_path / "atlas", space="MNI152NLin6Asym",
                             name="Small test atlas", version="1.2")
    cfg = write_siibra_configuration(atlas_dir)
    assert cfg == (atlas_dir / "siibra").absolute()
    for doc in cfg.rglob("*.json"):  # only absolute local paths, nothing to download
        text = doc.read_text()
        assert "http://" not in text and "https://" not in text
        for vol in json.loads(text).get("volumes", []):
            assert Path(vol["providers"]["nii"]).is_absolute()
            assert Path(vol["providers"]["nii"]).is_file()
    atlas = load_atlas(atlas_dir)
    points = sample_points(atlas, 24, seed=1)
    check_agreement(atlas_dir, cfg, points, tmp_path)


def test_export_to_another_place_points_there(tmp_path):
    pm, labels = make_small_atlas_files(tmp_path)
    atlas_dir = import_atlas(pm, labels, tmp_path / "atlas", space="MNI152NLin6Asym")
    cfg = write_siibra_configuration(atlas_dir, tmp_path / "elsewhere" / "cfg")
    maps = json.loads(next((cfg / "maps").glob("*-statistical.json")).read_text())
    for vol in maps["volumes"]:
        assert Path(vol["providers"]["nii"]).is_relative_to(cfg)
    # writing again replaces the folder (no stale files)
    (cfg / "stale.json").write_text("{}")
    write_siibra_configuration(atlas_dir, cfg)
    assert not (cfg / "stale.json").exists()


def test_duplicate_region_names_are_refused(tmp_path):
    pm, _ = make_small_atlas_files(tmp_path)
    labels = tmp_path / "dup.csv"
    labels.write_text("index,name\n0,Area A left\n1,Area B left\n2,Area C right\n")
    atlas_dir = import_atlas(pm, labels, tmp_path / "atlas", space="MNI152NLin6Asym")
    atlas = load_atlas(atlas_dir)
    assert len({r.name.lower() for r in atlas.regions}) == len(list(atlas.regions))
    # the check itself: two regions with one name
    from atlasbuilder.export.siibra import _check_unique_names

    regs = list(atlas.regions)
    with pytest.raises(InputError, match="share the name"):
        _check_unique_names([*regs, regs[0]])


@pytest.mark.slow
def test_siibra_agrees_on_the_juelich_atlas(juelich_atlas, tmp_path):
    cfg = write_siibra_configuration(juelich_atlas, tmp_path / "siibra")
    atlas = load_atlas(juelich_atlas)
    points = np.vstack([[[-10.0, -90.0, 0.0], [40.0, -20.0, 50.0]], sample_points(atlas, 22, seed=2)])
    check_agreement(juelich_atlas, cfg, points, tmp_path)
