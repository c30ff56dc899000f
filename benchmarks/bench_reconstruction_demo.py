"""Reconstruction of the demo cohort's brains against the cohort's truth.

For each brain (blockface reference, true section labels as the ``labels`` input):

* **misplacement**: every present section's pixel -> mm map against the truth's rigid placement
  (clean-pixel frame, rotation about the image centre, shift; ``truth/subjects/<id>/sections.json``),
  over the tissue pixels; median and 95th percentile in mm and in pixels of the reconstruction grid;
  also against the full truth map including the B-spline distortion (which a rigid/affine map cannot
  follow);
* **interpolation**: labels given for every other present section only; the label volume is sampled at
  the true mm position (full truth map) of each left-out section's pixels and compared with that
  section's true labels (Dice per area pooled over left-out sections, their mean, and the Dice of
  "any area"); sections past the last labelled one are left out of the score (extrapolated);
* seconds per brain (each run on its own).

Usage::

    python benchmarks/bench_reconstruction_demo.py [--cohort DIR] [--subjects B01 B02] [--affine]
        [--no-mi] [--voxel 0.5] [--out /tmp/recon-bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _default_cohort() -> Path:
    found = sorted((Path.home() / ".cache/atlasbuilder/cohorts").glob("demo-*/manifest.yaml"))
    if not found:
        sys.exit("no demo cohort under ~/.cache/atlasbuilder/cohorts (run `atlasbuilder synth` first)")
    return found[0].parent


def _truth_maps(truth: dict, number: int, shape: tuple[int, int], dist_dir: Path, name: str):
    """The truth's rigid and full (rigid + distortion) stored-pixel -> (x, z) mm maps."""
    from atlasbuilder.synthetic.histology import SectionTransform

    g = truth["geometry"]
    s = next(s for s in truth["sections"] if s["number"] == number)
    tf = SectionTransform(shape=shape, pixel_size_mm=g["pixel_size_mm"], rotation_deg=s["rotation_deg"],
                          shift_px=tuple(s["shift_px"]), spacing_px=s["distortion_spacing_px"],
                          control_px=np.load(dist_dir / f"{name}.npy"))
    c = tf.center
    th = np.deg2rad(s["rotation_deg"])
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])

    def to_mm(p: np.ndarray) -> np.ndarray:
        px = g["pixel_size_mm"]
        return np.stack([g["x0_mm"] + p[:, 1] * px, g["z0_mm"] - p[:, 0] * px], 1)

    def rigid(q: np.ndarray) -> np.ndarray:
        return to_mm((q - c - np.asarray(s["shift_px"])) @ rot + c)

    def full(q: np.ndarray) -> np.ndarray:
        return to_mm(tf.inverse(q))

    return rigid, full, s["y_mm"]


def run_brain(cohort: Path, sid: str, out: Path, args: argparse.Namespace) -> dict:
    from PIL import Image

    from atlasbuilder.manifest import load_manifest
    from atlasbuilder.reconstruction import reconstruct

    man = load_manifest(cohort / "manifest.yaml")
    subj = man.subject(sid)
    files = man.section_files(sid)
    truth = json.loads((cohort / f"truth/subjects/{sid}/sections.json").read_text())
    tdir = cohort / f"truth/subjects/{sid}"
    labels = {n: np.asarray(Image.open(tdir / "sections" / f"{p.stem}.png")) for n, p in files.items()}
    common = dict(pixel_size_um=subj.sections.pixel_size_um, thickness_um=subj.sections.thickness_um,
                  spacing=subj.sections.spacing,
                  reference=None if subj.reference is None else man.resolve(subj.reference),
                  voxel_size_mm=args.voxel, alignment="affine" if args.affine else "rigid",
                  shrinkage=subj.shrinkage, missing=subj.sections.missing, space=f"subject:{sid}",
                  refine_mi=not args.no_mi, progress=False)

    t0 = time.perf_counter()
    rec = reconstruct(files, out / f"{sid}-all", labels=labels, **common)
    t_all = time.perf_counter() - t0

    # misplacement against the truth
    vs = args.voxel
    d_rigid, d_full = [], []
    for n, p in files.items():
        if rec.sections[n].matrix is None:  # no tissue in the image (beyond the pole): not placed
            continue
        lab = labels[n]
        q = np.argwhere(lab > 0).astype(float)
        if len(q) < 50:  # sections beyond the areas: score their tissue instead
            from atlasbuilder.reconstruction import _read_section, _section_tissue

            q = np.argwhere(_section_tissue(_read_section(p, subj.sections.pixel_size_um), 0.2))[::25]
            q = q.astype(float)
        rigid, full, y_true = _truth_maps(truth, n, lab.shape, tdir / "distortions", p.stem)
        mine = rec.section_to_mm(n, q[:, 0], q[:, 1])
        assert abs(mine[0, 1] - y_true) < 1e-6, (n, mine[0, 1], y_true)
        d_rigid.append(np.linalg.norm(mine[:, [0, 2]] - rigid(q), axis=1))
        d_full.append(np.linalg.norm(mine[::10, [0, 2]] - full(q[::10]), axis=1))
    per_section = [float(np.median(d)) for d in d_rigid]
    dr, dfull = np.concatenate(d_rigid), np.concatenate(d_full)

    # leave every other section's labels out
    present = sorted(n for n in files if rec.sections[n].matrix is not None)
    kept = present[::2]
    left = [n for n in present[1::2] if n < kept[-1]]
    t0 = time.perf_counter()
    # the same images: reuse the alignment (the labels do not change it)
    rec2 = reconstruct(files, out / f"{sid}-half", labels={n: labels[n] for n in kept},
                       alignment_from=out / f"{sid}-all", guide_labels=not args.no_guide,
                       label_transfer=args.transfer, **common)
    t_half = time.perf_counter() - t0
    import nibabel as nib

    img: Any = nib.load(rec2.labels_path)
    vol = np.asarray(img.dataobj)
    inter: dict[int, float] = {}
    total: dict[int, float] = {}
    inter2: dict[int, float] = {}
    total2: dict[int, float] = {}
    any_i = any_t = 0.0
    for n in left:
        lab = labels[n]
        rr, cc = np.nonzero(np.ones(lab.shape[:2], dtype=bool)[::2, ::2])
        q = np.stack([rr * 2, cc * 2], 1).astype(float)
        truth_lab = lab[::2, ::2].ravel()
        _, full, y_true = _truth_maps(truth, n, lab.shape, tdir / "distortions", files[n].stem)
        xz = full(q)
        pts = np.stack([xz[:, 0], np.full(len(q), y_true), xz[:, 1]], 1)
        idx, inside = rec2.grid.nearest_voxel(pts)
        got = np.where(inside, vol[idx[:, 0], idx[:, 1], idx[:, 2]], 0)
        for v in np.union1d(np.unique(truth_lab), np.unique(got)):
            if v == 0:
                continue
            a, b = truth_lab == v, got == v
            inter[v] = inter.get(v, 0.0) + 2.0 * float(np.sum(a & b))
            total[v] = total.get(v, 0.0) + float(a.sum() + b.sum())
        # read back through our own placement of the section (isolates the interpolation)
        idx2, inside2 = rec2.grid.nearest_voxel(rec2.section_to_mm(n, q[:, 0], q[:, 1]))
        got2 = np.where(inside2, vol[idx2[:, 0], idx2[:, 1], idx2[:, 2]], 0)
        for v in np.union1d(np.unique(truth_lab), np.unique(got2)):
            if v == 0:
                continue
            a, b = truth_lab == v, got2 == v
            inter2[v] = inter2.get(v, 0.0) + 2.0 * float(np.sum(a & b))
            total2[v] = total2.get(v, 0.0) + float(a.sum() + b.sum())
        any_i += 2.0 * float(np.sum((truth_lab > 0) & (got > 0)))
        any_t += float(np.sum(truth_lab > 0) + np.sum(got > 0))
    dice = {int(v): inter[v] / total[v] for v in sorted(inter) if total[v] > 0}
    dice2 = {int(v): inter2[v] / total2[v] for v in sorted(inter2) if total2[v] > 0}
    return {"subject": sid, "sections": len(files), "left_out_scored": len(left),
            "seconds_all": round(t_all, 1), "seconds_half": round(t_half, 1),
            "misplacement_median_mm": float(np.median(dr)),
            "misplacement_median_px": float(np.median(dr) / vs),
            "misplacement_p95_mm": float(np.percentile(dr, 95)),
            "section_median_max_mm": float(np.max(per_section)),
            "vs_full_truth_median_mm": float(np.median(dfull)),
            "dice_per_area": {k: round(v, 3) for k, v in dice.items()},
            "dice_mean": float(np.mean(list(dice.values()))) if dice else float("nan"),
            "dice_mean_own_placement": float(np.mean(list(dice2.values()))) if dice2 else float("nan"),
            "dice_any_area": any_i / any_t if any_t else float("nan"),
            "residuals": [round(s.residual, 3) for s in rec.sections.values() if s.matrix is not None]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, default=None)
    ap.add_argument("--subjects", nargs="*", default=None)
    ap.add_argument("--affine", action="store_true")
    ap.add_argument("--no-mi", action="store_true")
    ap.add_argument("--no-guide", action="store_true", help="pure shape-based label interpolation")
    ap.add_argument("--transfer", choices=("shape", "register"), default="shape",
                    help="labels of left-out sections: the neighbours' shapes, or their labels warped "
                         "onto the section's image")
    ap.add_argument("--voxel", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=Path("/tmp/recon-bench"))
    args = ap.parse_args()
    cohort = args.cohort or _default_cohort()
    from atlasbuilder.manifest import load_manifest

    sids = args.subjects or [s.id for s in load_manifest(cohort / "manifest.yaml").subjects]
    rows = []
    for sid in sids:
        r = run_brain(cohort, sid, args.out, args)
        rows.append(r)
        print(f"{sid}: misplacement median {r['misplacement_median_mm']:.3f} mm = "
              f"{r['misplacement_median_px']:.2f} px of {args.voxel} mm "
              f"(p95 {r['misplacement_p95_mm']:.3f} mm, "
              f"worst section median {r['section_median_max_mm']:.3f} mm; vs truth with distortion "
              f"{r['vs_full_truth_median_mm']:.3f} mm) | left-out Dice mean {r['dice_mean']:.3f} "
              f"(own placement {r['dice_mean_own_placement']:.3f}) "
              f"any-area {r['dice_any_area']:.3f} over {r['left_out_scored']} sections | "
              f"{r['seconds_all']:.1f} s (all), {r['seconds_half']:.1f} s (half labels)", flush=True)
        print("   Dice per area:", r["dice_per_area"], flush=True)
    print(json.dumps({"cohort": str(cohort), "args": {k: str(v) for k, v in vars(args).items()},
                      "brains": rows}, indent=1))


if __name__ == "__main__":
    main()
