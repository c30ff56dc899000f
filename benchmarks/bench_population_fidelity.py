"""Does the synthetic population reproduce the Juelich maps? (Area frequency over many brains.)

Samples the target-space area labels of ``--brains`` brains (the same layouts as
``sample_individual(seed).labels_target`` for seeds 0..n-1; no anatomy), counts each area's
frequency per voxel and correlates it (Pearson r) with the source Juelich map brought into the
target space (MNI152NLin2009cAsym), per hemisphere leaf. Printed per area:

* ``r_src``: r with the source map ``p`` within the area's support in the target space restricted
  to the area mask (grey matter dilated by 1 voxel) -- the acceptance figure (>= 0.95);
* ``r_eff``: r with the effective map ``q`` (``p`` renormalised where the maps sum above 1), which
  the sampler reproduces exactly in expectation; next to it ``ceiling``, the r expected from
  binomial noise alone with this many brains, ``sqrt(var q / (var q + mean q(1-q) / n))`` -- the
  peer this benchmark compares against (ratio ``r_eff / ceiling``);
* ``r_all``: r with ``p`` over the whole support (including voxels outside the mask, where the
  frequency is 0 by design), and ``mass``: the share of ``p``'s mass inside the mask.

The first run registers the templates (about a minute, then cached). Usage::

    python benchmarks/bench_population_fidelity.py [--brains 200] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from atlasbuilder.synthetic.population import DEFAULT_AREAS, prepare_population


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brains", type=int, default=200)
    ap.add_argument("--areas", nargs="+", default=list(DEFAULT_AREAS))
    ap.add_argument("--smoothness-mm", type=float, default=6.0)
    ap.add_argument("--registration", default="default")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--demo", action="store_true",
                    help="the demo cohort's population (cortex thickened by 2 mm, see cohort.py)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    if args.demo:
        from pathlib import Path

        from atlasbuilder.synthetic.cohort import CohortSettings, demo_population

        pop = demo_population(CohortSettings(areas=tuple(args.areas)),
                              Path(args.cache_dir) if args.cache_dir else None, False)
    else:
        pop = prepare_population(args.areas, smoothness_mm=args.smoothness_mm,
                                 registration=args.registration, cache_dir=args.cache_dir)
    t_prep = time.perf_counter() - t0
    reg = json.loads(pop.maps.attrs["registration"])
    model = pop.layout
    box = model.box
    k = len(model.region_ids)
    counts = np.zeros((k, *model.cumulative.shape[1:]), dtype=np.int32)
    t1 = time.perf_counter()
    for seed in range(args.brains):
        lab = pop.sample_layout(seed, crop=True)
        for j, rid in enumerate(model.region_ids):
            counts[j] += lab == rid
    t_sample = time.perf_counter() - t1
    n = args.brains
    freq_box = counts / n
    p_full = np.asarray(pop.maps["probability"].transpose("region", "x", "y", "z").values)
    mask_full = np.asarray(pop.mask["mask"].values)
    q_box = model.probabilities()

    print(f"registration: {reg.get('settings')}  brain-mask Dice {reg.get('brain_mask_dice', 1.0):.4f}"
          f"  (computed in {reg.get('seconds', 0.0):.1f} s when first cached)")
    print(f"population prepared in {t_prep:.1f} s; {n} brains' labels sampled in {t_sample:.1f} s "
          f"({1000 * t_sample / n:.0f} ms per brain, box {tuple(q_box.shape[1:])} voxels)")
    print(f"\n{'area':<13}{'support':>9}{'r_src':>8}{'r_eff':>8}{'ceiling':>9}{'ratio':>7}"
          f"{'r_all':>8}{'mass':>7}")
    worst = 1.0
    for j, key in enumerate(model.region_keys):
        p = p_full[j]
        freq = np.zeros(p.shape)
        freq[box] = freq_box[j]
        q = np.zeros(p.shape)
        q[box] = q_box[j]
        sup = (p > 0) & mask_full
        r_src = pearson(freq[sup], p[sup])
        r_eff = pearson(freq[sup], q[sup])
        qs = q[sup]
        ceiling = float(np.sqrt(qs.var() / (qs.var() + (qs * (1 - qs)).mean() / n)))
        allsup = p > 0
        r_all = pearson(freq[allsup], p[allsup])
        mass = float(p[sup].sum() / p.sum())
        worst = min(worst, r_src)
        print(f"{key:<13}{int(sup.sum()):>9}{r_src:>8.3f}{r_eff:>8.3f}{ceiling:>9.3f}"
              f"{r_eff / ceiling:>7.3f}{r_all:>8.3f}{mass:>7.2f}")
    print(f"\nsmallest r_src = {worst:.3f} ({'meets' if worst >= 0.95 else 'FAILS'} r >= 0.95); "
          f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
