"""The walking skeleton of `atlasbuilder build`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from atlasbuilder import load_atlas
from atlasbuilder.errors import AtlasDirectoryError, ManifestError, OutputExistsError
from atlasbuilder.pipeline import STAGES, build

DEMO = Path(__file__).resolve().parent.parent / "data_manifests" / "demo.yaml"


def test_demo_build_writes_an_atlas_directory(tmp_path):
    out = build(DEMO, tmp_path / "demo", quick=True, progress=False)
    atlas = load_atlas(out)
    assert atlas.name == "demo-visual-atlas"
    assert atlas.meta["areas"] == ["hOc1", "hOc2", "hOc3v", "hOc4v", "hOc5"]
    assert atlas.regions.get("V1").key == "hOc1"
    spaces = json.loads((out / "spaces.json").read_text())
    assert [s["name"] for s in spaces] == ["MNI152NLin2009cAsym", "BigBrain"]
    assert spaces[0]["template"].endswith("mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz")
    prov = atlas.provenance
    assert prov["command"] == "build" and prov["quick"] is True
    assert prov["parameters"]["synthetic"]["subjects"] == 3  # the quick cohort
    assert len(prov["inputs"]["manifest"]["sha256"]) == 64
    assert [s["name"] for s in prov["stages"]] == [s.name for s in STAGES]
    # stages this version lacks are reported, not faked
    assert {s["status"] for s in prov["stages"]} <= {"done", "pending", "skipped"}
    with pytest.raises(AtlasDirectoryError, match="no probability maps yet"):
        atlas.query([0, 0, 0])
    synth = prov["stages"][0]
    assert synth["name"] == "synthesize" and synth["status"] == "done" and synth["items"] == 3
    # a rebuild into its own output directory is allowed, and takes the cohort from the cache
    build(DEMO, out, quick=True, progress=False)
    assert load_atlas(out).provenance["stages"][0]["note"].startswith("cached")


def test_build_refuses_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not an atlasbuilder build directory"):
        build(DEMO, tmp_path, progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_build_bad_manifest_lists_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("MNI152NLin2009cAsym", "MNI2009").replace(
        "hOc5]", "hOc9]"))
    with pytest.raises(ManifestError) as err:
        build(bad, tmp_path / "out", progress=False)
    assert len(err.value.problems) == 2
    assert not (tmp_path / "out").exists()


def test_second_concurrent_build_refuses(tmp_path):
    """Another process holding the directory's lock makes a build refuse clearly."""
    out = tmp_path / "atlas"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from atlasbuilder.storage import directory_lock\n"
         f"with directory_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        p = subprocess.run([sys.executable, "-m", "atlasbuilder.cli", "build", str(DEMO), "-o",
                            str(out), "--quick"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2
        assert "is being written by pid" in p.stderr
    finally:
        holder.kill()
        holder.wait()


def test_build_cli_quick_and_builtin_name(tmp_path):
    p = subprocess.run([sys.executable, "-m", "atlasbuilder.cli", "build", "demo", "-o",
                        str(tmp_path / "a"), "--quick"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "pending" in p.stderr and "atlas written to" in p.stderr
    p = subprocess.run([sys.executable, "-m", "atlasbuilder.cli", "validate", str(DEMO)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "valid" in p.stdout
