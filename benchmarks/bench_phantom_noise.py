"""Does the CNN's Dice follow the phantom's cell noise? (issue 4: the 0.85 target)

The demo phantom normalises every area's laminar profile to the same mean cell density and the
same laminar contrast, so areas differ only by the *shape* of their profiles, and that shape
competes with the cell noise: at 0.2 mm pixels each pixel holds a few Poisson-drawn cell bodies
(a cell's central optical density ``histology._CELL_PEAK_OD`` = 0.12 sets how few). This benchmark
regenerates the quick demo cohort (3 brains, same seed, same geometry, same mean intensities and
laminar profiles) with ``factor`` x as many, proportionally fainter, cells per pixel (relative
shot noise / sqrt(factor)), then runs the build's segmentation protocol on it (one cohort model
on all brains' annotated sections, fine-tuned per brain, the package's default settings) and
scores every non-annotated section against the truth, as ``bench_segmentation_protocols.py``
does.

It changes nothing in the package: the cohorts go to a temporary directory and the cell scale is
set for this process only. It tells whoever owns the demo how distinct the areas' signatures
must be for the CNN to reach the issue's target.

Usage::

    python benchmarks/bench_phantom_noise.py --factors 1,4,16 [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _with_cells(factor: float) -> None:
    """``factor`` x as many cells per pixel, each ``factor`` x fainter (same mean optical density)."""
    from atlasbuilder.synthetic import histology as H

    if not hasattr(H, "_BENCH_PEAK_OD"):
        H._BENCH_PEAK_OD = H._CELL_PEAK_OD  # type: ignore[attr-defined]
    H._CELL_PEAK_OD = H._BENCH_PEAK_OD / factor  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factors", default="1,4,16")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()

    from bench_segmentation_protocols import score

    from atlasbuilder.manifest import load_manifest
    from atlasbuilder.segmentation.stage import StageSettings, segment_subject, train_cohort_model
    from atlasbuilder.synthetic.cohort import CohortSettings, generate_cohort

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-contrast-"))
    st = StageSettings()
    rows = []
    for factor in [float(f) for f in args.factors.split(",")]:
        _with_cells(factor)  # inherited by the generator's forked workers
        t0 = time.perf_counter()
        cohort = work / f"cohort-x{factor:g}"
        if not (cohort / "manifest.yaml").is_file():
            generate_cohort(cohort, CohortSettings().quick())
        t_syn = time.perf_counter() - t0
        manifest = load_manifest(cohort / "manifest.yaml")
        t1 = time.perf_counter()
        ck = work / f"model-x{factor:g}" / "cohort.pt"
        if not ck.exists():
            train_cohort_model(manifest, ck, settings=st, progress=False)
        per = {}
        for s in manifest.subjects:
            out = work / f"model-x{factor:g}" / s.id
            segment_subject(manifest, s.id, out, init_checkpoint=ck, settings=st, progress=False)
            per[s.id] = score(cohort, s.id, out)["area"]
        t_seg = time.perf_counter() - t1
        areas = sorted({a for p in per.values() for a in p})
        mean_area = {a: float(np.nanmean([p.get(a, np.nan) for p in per.values()])) for a in areas}
        mean = float(np.mean([np.mean(list(p.values())) for p in per.values()]))
        rows.append((factor, mean, mean_area, per, t_syn, t_seg))
        print(f"cells x{factor:g}: mean Dice over areas "
              f"{mean:.3f}  per brain " + " ".join(f"{k} {np.mean(list(v.values())):.3f}"
                                                  for k, v in per.items())
              + f"  (synth {t_syn:.0f} s, segmentation {t_seg:.0f} s)", flush=True)
    areas = sorted({a for r in rows for a in r[2]})
    print("\n| cells per pixel | " + " | ".join(areas) + " | mean |")
    print("|---" * (len(areas) + 2) + "|")
    for factor, mean, mean_area, *_ in rows:
        print(f"| x{factor:g} | " + " | ".join(f"{mean_area.get(a, float('nan')):.2f}" for a in areas)
              + f" | {mean:.3f} |")


if __name__ == "__main__":
    main()
