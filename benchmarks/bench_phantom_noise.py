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

``--brightness`` adds a diagnostic cohort (cells x1) whose areas differ in overall stain
density (``LaminarProfile.density_gain``: mean cell optical density 0.44 hOc1, 0.20 hOc2,
0.36 hOc3v, 0.24 hOc4v, 0.50 hOc5 against 0.28 for other cortex), against the demo's rule of
equal means. It tells whether the CNN protocol, given areas that differ even in brightness,
reaches the target: the limit of the protocol rather than of the phantom.

Usage::

    python benchmarks/bench_phantom_noise.py --factors 1,4,16 [--brightness] [--work DIR]
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


#: Mean cell optical density per area for ``--brightness`` (the demo's common mean is 0.28).
BRIGHTNESS = {"hOc1": 0.44, "hOc2": 0.20, "hOc3v": 0.36, "hOc4v": 0.24, "hOc5": 0.50}


def _with_brightness(on: bool) -> None:
    """Areas with distinct overall stain densities (``on``), or the demo's equal means."""
    from dataclasses import replace

    from atlasbuilder.synthetic import histology as H

    if not hasattr(H, "_BENCH_PROFILES_FOR"):
        H._BENCH_PROFILES_FOR = H.profiles_for  # type: ignore[attr-defined]
    base = H._BENCH_PROFILES_FOR  # type: ignore[attr-defined]
    if not on:
        H.profiles_for = base
        return

    def profiles_for(keys, seed=0):  # type: ignore[no-untyped-def]
        out = base(keys, seed)
        return {k: replace(p, density_gain=BRIGHTNESS.get(k, H._CELL_MEAN_OD) / H._CELL_MEAN_OD)
                for k, p in out.items()}

    H.profiles_for = profiles_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factors", default="1,4,16")
    ap.add_argument("--work", default=None)
    ap.add_argument("--brightness", action="store_true",
                    help="also a cohort whose areas differ in mean stain density (a diagnostic)")
    args = ap.parse_args()

    from bench_segmentation_protocols import score

    from atlasbuilder.manifest import load_manifest
    from atlasbuilder.segmentation.stage import StageSettings, segment_subject, train_cohort_model
    from atlasbuilder.synthetic.cohort import CohortSettings, generate_cohort

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-contrast-"))
    st = StageSettings()
    rows = []
    variants = [(float(f), False) for f in args.factors.split(",")]
    if args.brightness:
        variants.append((1.0, True))
    for factor, bright in variants:
        _with_cells(factor)  # inherited by the generator's forked workers
        _with_brightness(bright)
        t0 = time.perf_counter()
        name = f"x{factor:g}" + ("-brightness" if bright else "")
        cohort = work / f"cohort-{name}"
        if not (cohort / "manifest.yaml").is_file():
            generate_cohort(cohort, CohortSettings().quick())
        t_syn = time.perf_counter() - t0
        manifest = load_manifest(cohort / "manifest.yaml")
        t1 = time.perf_counter()
        ck = work / f"model-{name}" / "cohort.pt"
        if not ck.exists():
            train_cohort_model(manifest, ck, settings=st, progress=False)
        per = {}
        for s in manifest.subjects:
            out = work / f"model-{name}" / s.id
            segment_subject(manifest, s.id, out, init_checkpoint=ck, settings=st, progress=False)
            per[s.id] = score(cohort, s.id, out)["area"]
        t_seg = time.perf_counter() - t1
        areas = sorted({a for p in per.values() for a in p})
        mean_area = {a: float(np.nanmean([p.get(a, np.nan) for p in per.values()])) for a in areas}
        mean = float(np.mean([np.mean(list(p.values())) for p in per.values()]))
        rows.append((name, mean, mean_area, per, t_syn, t_seg))
        print(f"cells {name}: mean Dice over areas "
              f"{mean:.3f}  per brain " + " ".join(f"{k} {np.mean(list(v.values())):.3f}"
                                                  for k, v in per.items())
              + f"  (synth {t_syn:.0f} s, segmentation {t_seg:.0f} s)", flush=True)
    areas = sorted({a for r in rows for a in r[2]})
    print("\n| cohort (cells per pixel) | " + " | ".join(areas) + " | mean |")
    print("|---" * (len(areas) + 2) + "|")
    for name, mean, mean_area, *_ in rows:
        print(f"| {name} | " + " | ".join(f"{mean_area.get(a, float('nan')):.2f}" for a in areas)
              + f" | {mean:.3f} |")


if __name__ == "__main__":
    main()
