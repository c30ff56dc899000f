"""Demo cohort generation: wall time, disk use and per-area intensity spread.

Runs ``atlasbuilder synth`` as a user would (a fresh process each), for the quick cohort (3
brains + reference) and the default cohort (10 brains + reference), with the one-off template
registration already cached (say ``--cold`` to time it too, with an empty cache). Targets on a
2-core machine: quick <= 60 s, default <= 4 min, default on disk < 1 GB.

    python benchmarks/bench_synth.py [--skip-default] [--cold]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run(outdir: Path, *args: str, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "atlasbuilder.cli", "synth", str(outdir), "-q", *args],
                   check=True, env=env)
    return time.perf_counter() - t


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def intensity_spread(cohort: Path) -> float:
    """Largest relative deviation of an area's mean intensity (annotated sections, each section
    divided by its own annotated mean so stack-wide stain drift does not count)."""
    import tifffile
    from PIL import Image

    from atlasbuilder.manifest import load_manifest

    m = load_manifest(cohort / "manifest.yaml")
    tot: dict[int, float] = {}
    cnt: dict[int, int] = {}
    for s in m.subjects:
        secs = m.section_files(s.id)
        for n, a in m.annotation_files(s.id).items():
            img = tifffile.imread(secs[n]).astype(float)
            lab = np.asarray(Image.open(a))
            img /= img[lab > 0].mean()
            for v in np.unique(lab[lab > 0]):
                sel = lab == v
                tot[int(v)] = tot.get(int(v), 0.0) + float(img[sel].sum())
                cnt[int(v)] = cnt.get(int(v), 0) + int(sel.sum())
    means = np.array([tot[v] / cnt[v] for v in tot if cnt[v] >= 2000])
    return float(np.abs(means / means.mean() - 1).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--cold", action="store_true", help="also time a run with an empty cache")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        env = dict(os.environ)
        rows = []
        if args.cold:
            env_cold = {**env, "XDG_CACHE_HOME": str(tmp_p / "cold-cache")}
            rows.append(("quick, empty cache (incl. registration)",
                         run(tmp_p / "cold", "--quick", env=env_cold), du(tmp_p / "cold")))
        # warm the template registration cache, untimed
        run(tmp_p / "warm", "--quick", "--subjects", "1", "--no-reference", env=env)
        rows.append(("quick (3 brains + reference)", run(tmp_p / "quick", "--quick", env=env),
                     du(tmp_p / "quick")))
        spread = intensity_spread(tmp_p / "quick")
        if not args.skip_default:
            rows.append(("default (10 brains + reference)", run(tmp_p / "default", env=env),
                         du(tmp_p / "default")))
            spread = intensity_spread(tmp_p / "default")
    print(f"{'cohort':<42}{'wall (s)':>10}{'disk (MB)':>11}")
    for name, sec, size in rows:
        print(f"{name:<42}{sec:>10.1f}{size / 1e6:>11.1f}")
    print(f"largest per-area mean intensity deviation: {100 * spread:.1f} % (target <= 5 %)")


if __name__ == "__main__":
    main()
