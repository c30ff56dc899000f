"""The command line: smoke tests, negative coordinates, error lines and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import make_small_atlas_files

from atlasbuilder.cli import main


def run(*args, check_rc=None):
    """The real console entry point in a subprocess (what a user types)."""
    proc = subprocess.run([sys.executable, "-m", "atlasbuilder.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


@pytest.fixture(scope="module")
def small_atlas(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    pm, labels = make_small_atlas_files(d)
    out = d / "atlas"
    assert main(["import", str(pm), str(labels), "-o", str(out), "--space", "MNI152NLin6Asym",
                 "-q"]) == 0
    return out, pm


def test_negative_coordinates_as_typed(small_atlas):
    atlas, pm = small_atlas
    img = nib.load(str(pm))
    x, y, z = nib.affines.apply_affine(img.affine, [4, 2, 1])  # (2, -16, -4): two negatives
    assert y < 0 and z < 0
    for xs in ([f"{x:g}", f"{y:g}", f"{z:g}"], [f"{x:g}", "-1.6e1", "-4."]):
        p = run("query", atlas, *xs, "--json", check_rc=0)
        [ans] = [json.loads(line) for line in p.stdout.splitlines()]
        assert ans["point"] == [x, y, z]
        want = sorted((v / 100 for v in np.asanyarray(img.dataobj)[4, 2, 1] if v >= 5),
                      reverse=True)
        assert [r["probability"] for r in ans["regions"]] == want


def test_query_json_schema_and_min_probability(small_atlas, capsys):
    atlas, _ = small_atlas
    assert main(["query", str(atlas), "2", "-16", "-4", "--json", "--min-probability", "0"]) == 0
    ans = json.loads(capsys.readouterr().out)
    assert set(ans) == {"space", "point", "regions"}
    assert all(set(r) >= {"name", "probability"} for r in ans["regions"])
    assert all(0 <= r["probability"] <= 1 for r in ans["regions"])
    assert main(["query", str(atlas), "500", "0", "0", "--json"]) == 0
    ans = json.loads(capsys.readouterr().out)
    assert ans["regions"] == [] and ans["outside"] is True
    assert main(["query", str(atlas), "500", "0", "0"]) == 0
    assert "outside the atlas volume" in capsys.readouterr().out


def test_query_points_file(small_atlas, tmp_path, capsys):
    atlas, _ = small_atlas
    f = tmp_path / "pts.csv"
    f.write_text("x,y,z\n2,-16,-4\n-1e3,0,0\n0,-10,-2\n")
    assert main(["query", str(atlas), "--points", str(f), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["outside"] is True
    f2 = tmp_path / "nohdr.csv"
    f2.write_text("2,-16,-4\n")
    assert main(["query", str(atlas), "--points", str(f2)]) == 0
    assert "(2, -16, -4)" in capsys.readouterr().out


@pytest.mark.parametrize("args, msg", [
    (["1", "2"], "expected three coordinates"),
    (["1", "2", "3", "--space", "Talairach"], "unknown space 'Talairach'"),
])
def test_query_usage_errors(small_atlas, args, msg):
    atlas, _ = small_atlas
    p = run("query", atlas, *args)
    assert p.returncode == 2
    assert msg in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_query_bad_inputs_exit_2(small_atlas, tmp_path):
    atlas, _ = small_atlas
    p = run("query", atlas, "a", "2", "3")
    assert p.returncode == 2 and "not a number" in p.stderr
    p = run("query", tmp_path / "nope", "1", "2", "3")
    assert p.returncode == 2 and "atlas directory not found" in p.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y,z\n1,2,zz\n")
    p = run("query", atlas, "--points", bad)
    assert p.returncode == 2 and "line 2" in p.stderr and str(bad) in p.stderr
    p = run("query", atlas, "1", "2", "3", "--min-probability", "1.5")
    assert p.returncode == 2 and "0..1" in p.stderr
    p = run("query", atlas, "1", "2", "3", "--points", bad)
    assert p.returncode == 2 and "not both" in p.stderr


def test_import_errors_are_one_line_exit_2(tmp_path):
    pm, labels = make_small_atlas_files(tmp_path)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + bytes(range(200)))
    p = run("import", corrupt, labels, "-o", tmp_path / "o", "--space", "MNI152NLin6Asym")
    assert p.returncode == 2 and "corrupt.nii.gz" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    (tmp_path / "short.csv").write_text("index,name\n0,A\n")
    p = run("import", pm, tmp_path / "short.csv", "-o", tmp_path / "o", "--space", "FSL")
    assert p.returncode == 2 and "1 rows but" in p.stderr
    assert not (tmp_path / "o").exists()


def test_import_cli_and_regions(tmp_path):
    pm, labels = make_small_atlas_files(tmp_path)
    p = run("import", pm, labels, "-o", tmp_path / "a", "--space", "MNI152NLin6Asym",
            check_rc=0)
    assert "imported 3 maps (percent" in p.stderr
    p = run("regions", tmp_path / "a", "--find", "area b", check_rc=0)
    assert "Area B left" in p.stdout and "Area A" not in p.stdout
    p = run("regions", "juelich", "--tree", check_rc=0)
    assert "    Area hOc1 (V1, 17, CalcS)  [hOc1" in p.stdout
    p = run("regions", "juelich", "--find", "hoc9")
    assert p.returncode == 2 and "did you mean" in p.stderr
    p = run("regions", "juelich", "--find", "V5", "--json", check_rc=0)
    assert {r["key"] for r in json.loads(p.stdout)} >= {"hOc5", "hOc5_left"}


def test_spaces_and_help():
    p = run("spaces", check_rc=0)
    assert "MNI152NLin2009cAsym" in p.stdout and "mni_icbm152_t1_tal_nlin_asym_09c" in p.stdout
    assert "BigBrain" in p.stdout
    p = run("--help", check_rc=0)
    for cmd in ("build", "validate", "import", "query", "regions"):
        assert cmd in p.stdout
    p = run("frobnicate")
    assert p.returncode == 2


def test_light_imports():
    """`import atlasbuilder` and `atlasbuilder --help` load no heavy library."""
    heavy = ["torch", "ants", "siibra", "dask", "nilearn.plotting", "matplotlib", "nilearn"]
    code = (
        "import sys, atlasbuilder, atlasbuilder.cli\n"
        "try:\n    atlasbuilder.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip().splitlines()[-1] == "[]"
    # and `import atlasbuilder` alone does not even load numpy (instant start)
    p = subprocess.run([sys.executable, "-c", "import sys, atlasbuilder; "
                        "print('numpy' in sys.modules)"], capture_output=True, text=True,
                       check=True)
    assert p.stdout.strip() == "False"
