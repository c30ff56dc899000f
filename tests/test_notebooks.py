"""Every notebook in notebooks/ runs top to bottom without error and shows a figure.

The demo notebooks (01, 02) read the quick demo atlas from ``ATLASBUILDER_DEMO_ATLAS``; the suite
points it to the atlas the session builds once (``quick_demo_atlas`` in conftest.py), so their
build call is an all-cache rerun. The kernel inherits this process's environment, including the
suite's cache directory (``XDG_CACHE_HOME``), so 03 takes the quick cohort from the same cache.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
# notebooks that read the quick demo atlas
USES_DEMO_ATLAS = {"01_build_demo_atlas", "02_query_regions"}


def _run(path: Path, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, request, monkeypatch):
    if path.stem in USES_DEMO_ATLAS:
        atlas_dir = request.getfixturevalue("quick_demo_atlas")
        monkeypatch.setenv("ATLASBUILDER_DEMO_ATLAS", str(atlas_dir))
    nb = _run(path, tmp_path)
    errors = [o for o in _outputs(nb) if o.get("output_type") == "error"]
    assert not errors, [f"{e.get('ename')}: {e.get('evalue')}" for e in errors]
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert images, "the notebook should show its figure"
    if path.stem in USES_DEMO_ATLAS:
        # the notebook used the session's atlas instead of building a new one in its directory
        assert not (tmp_path / "demo-atlas").exists()


def test_there_are_notebooks():
    assert NOTEBOOKS
    names = {p.stem for p in NOTEBOOKS}
    assert {"01_build_demo_atlas", "02_query_regions", "03_inference_engine"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_saved_without_outputs(path):
    """Outputs come from the test run, never from the file (a stale picture would pass)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, cell.source[:60]
