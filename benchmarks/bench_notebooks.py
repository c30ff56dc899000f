"""How long the three demo notebooks take together (issue 8: at most 5 minutes, atlas built).

Builds the quick demo atlas first (or takes ``--atlas DIR``, an existing one; the build is not
timed), then executes ``01_build_demo_atlas``, ``02_query_regions`` and ``03_inference_engine``
top to bottom in fresh kernels, as the test suite does, and prints each one's wall time and the
total against the 300 s budget. Run it on a quiet machine: the figure is wall time.

    python benchmarks/bench_notebooks.py [--atlas demo-atlas]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
DEMO = ("01_build_demo_atlas", "02_query_regions", "03_inference_engine")
BUDGET_S = 300.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--atlas", type=Path, default=None, help="an existing quick demo atlas")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-notebooks-"))
    atlas = args.atlas
    if atlas is None:
        from atlasbuilder.pipeline import build

        atlas = build(ROOT / "data_manifests" / "demo.yaml", work / "demo-atlas", quick=True,
                      progress=False)
    os.environ["ATLASBUILDER_DEMO_ATLAS"] = str(Path(atlas).absolute())
    seconds = {}
    for name in DEMO:
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        cwd = work / name
        cwd.mkdir()
        t0 = time.perf_counter()
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(cwd)}}).execute()
        seconds[name] = time.perf_counter() - t0
        print(f"{name:<24} {seconds[name]:6.1f} s", flush=True)
    total = sum(seconds.values())
    verdict = "met" if total <= BUDGET_S else "NOT met"
    print(f"{'total':<24} {total:6.1f} s   budget {BUDGET_S:.0f} s: {verdict}")


if __name__ == "__main__":
    main()
