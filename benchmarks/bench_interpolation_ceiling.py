"""How well can labels between sections be interpolated at all on the demo cohort?

Issue 5 asks for Dice >= 0.9 on left-out sections. This benchmark measures the ceiling of that
figure on the cohort's *true* 3-D labels (``truth/subjects/<id>/labels_subject.nii.gz``, 1 mm):
no misplacement, no distortion, no segmentation error. The true coronal plane at each kept
section's position stands in for its labels; the planes in between are predicted and scored
against the true plane there (Dice per area, pooled over planes and brains):

* ``nearest``: the nearer kept plane's labels;
* ``shape``: the reconstruction's shape-based rule (signed distances interpolated linearly,
  :func:`atlasbuilder.reconstruction._interp_labels`);
* ``area``: the reconstruction's default, ``shape`` keeping each area's size (the interpolated
  area of the two planes; shapes grow by at most half the section distance,
  ``_interp_labels(..., grow_mm=...)``, ``reconstruct(keep_area=True)``);
* ``oracle-cortex``: ``shape``, then restricted to the true area-bearing cortex of the plane and
  filled there with the nearest predicted label: what a perfect grey-matter guide could add.

Two protocols:

* ``left-out``: every other present section is left out (the gap doubles: 4 mm on the full demo,
  6 mm on the quick one), as in ``bench_reconstruction_demo.py``;
* ``between``: every present section is kept and the plane midway between neighbours is scored
  (what the reconstruction fills at the cohort's own spacing).

Usage::

    python benchmarks/bench_interpolation_ceiling.py [--cohort DIR] [--subjects B01 B02 B03]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _pairs(ys: list[float], protocol: str) -> list[tuple[float, float, float]]:
    """(kept y before, kept y after, scored y) for each scored plane."""
    if protocol == "between":
        return [(a, b, 0.5 * (a + b)) for a, b in itertools.pairwise(ys)]
    keep, left = ys[0::2], ys[1::2]
    out = []
    for y in left:
        i = int(np.searchsorted(keep, y))
        if 0 < i < len(keep):
            out.append((keep[i - 1], keep[i], y))
    return out


def score(cohort: Path, subjects: list[str], protocol: str) -> dict[str, dict[int, float]]:
    import nibabel as nib
    from scipy import ndimage

    from atlasbuilder.reconstruction import _interp_labels, _sdt

    sums: dict[tuple[str, int], list[int]] = {}
    sizes: dict[str, list[int]] = {}
    for sid in subjects:
        t = cohort / "truth" / "subjects" / sid
        img = nib.load(t / "labels_subject.nii.gz")
        lab = np.asarray(img.dataobj).astype(np.int32)
        aff = img.affine
        px = float(abs(aff[0, 0]))
        ys = [s["y_mm"] for s in json.loads((t / "sections.json").read_text())["sections"]
              if not s["missing"]]

        def plane(y: float, lab: np.ndarray = lab, aff: np.ndarray = aff) -> np.ndarray:
            j = round(float((y - aff[1, 3]) / aff[1, 1]))
            return lab[:, min(max(j, 0), lab.shape[1] - 1), :]

        grow = 0.5 * float(np.median(np.diff(ys)))  # half the section distance, as reconstruct()
        for ya, yb, y in _pairs(ys, protocol):
            w = (y - ya) / (yb - ya)
            pa, pb, true = plane(ya), plane(yb), plane(y)
            sd_a = {int(v): _sdt(pa == v, px) for v in np.unique(pa) if v}
            sd_b = {int(v): _sdt(pb == v, px) for v in np.unique(pb) if v}
            pred = _interp_labels(sd_a, sd_b, w, pa.shape)
            kept = _interp_labels(sd_a, sd_b, w, pa.shape, grow_mm=grow)
            filled = pred
            if (pred > 0).any():
                idx = ndimage.distance_transform_edt(pred == 0, return_distances=False,
                                                     return_indices=True)
                filled = pred[tuple(idx)]
            guesses = {"nearest": pa if w < 0.5 else pb, "shape": pred, "area": kept,
                       "oracle-cortex": np.where(true > 0, filled, 0)}
            for name, p in guesses.items():
                sz = sizes.setdefault(name, [0, 0])
                sz[0] += int((p > 0).sum())
                sz[1] += int((true > 0).sum())
                for v in np.union1d(np.unique(true), np.unique(p)):
                    if v == 0:
                        continue
                    s = sums.setdefault((name, int(v)), [0, 0])
                    s[0] += 2 * int(((p == v) & (true == v)).sum())
                    s[1] += int((p == v).sum() + (true == v).sum())
    out: dict[str, dict[int, float]] = {}
    for (name, v), (num, den) in sorted(sums.items()):
        if den:
            out.setdefault(name, {})[v] = num / den
    for name, (pred_px, true_px) in sizes.items():
        out.setdefault(name, {})["size"] = pred_px / max(true_px, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", type=Path, default=None)
    ap.add_argument("--subjects", nargs="*", default=["B01", "B02", "B03"])
    args = ap.parse_args()
    from bench_reconstruction_demo import _default_cohort

    cohort = args.cohort or _default_cohort()
    print(f"cohort {cohort}, brains {' '.join(args.subjects)}")
    for protocol in ("left-out", "between"):
        res = score(cohort, args.subjects, protocol)
        print(f"\n{protocol}: mean Dice over areas (per area label value); size: area pixels "
              "predicted / true")
        for name in ("nearest", "shape", "area", "oracle-cortex"):
            per = dict(res.get(name, {}))
            size = per.pop("size", float("nan"))
            cells = " ".join(f"{v}:{d:.2f}" for v, d in per.items())
            print(f"  {name:<14} {np.mean(list(per.values())):.3f}  size {size:.2f}   {cells}")


if __name__ == "__main__":
    main()
