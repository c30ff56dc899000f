"""Registration accuracy on the quick demo cohort, scored against the cohort's truth.

For each brain: its whole-brain reference volume (the manifest's ``subjects[i].reference`` when
the cohort has one; otherwise the 2009c template pulled back through the brain's true transform,
``anatomy(x) = template(to_target(x))``, on the grid of ``truth/subjects/<id>/labels_subject``)
is registered to MNI152NLin2009cAsym with :func:`atlasbuilder.registration.register_subject`,
and compared with ``truth/subjects/<id>/transform.npz`` (``to_target(x) = y + u(y)``,
``y = affine @ x``):

* point error ``|found(x) - to_target(x)|`` over the brain's grey-matter (area-label) voxels and
  over all brain voxels: median, 95th percentile (targets 1.5 mm and 3 mm);
* round-trip error median (target 0.1 mm), Jacobian minimum inside the brain (> 0);
* Dice per area of the true subject labels warped with the found transform (genericLabel)
  against the true labels in MNI (target mean >= 0.7);
* seconds per brain per space.

``--bigbrain`` also compares two ways to BigBrain: direct (subject -> BigBrain template) and
composed (subject -> MNI plus one MNI -> BigBrain template registration), by Dice against the
true labels in BigBrain space.

Run::

    nice python benchmarks/bench_registration_demo.py [--preset syn] [--subjects B01] [--bigbrain]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def truth_to_target(npz: Path):
    """The true subject -> MNI point map of a demo brain (see the cohort's truth README)."""
    from scipy import ndimage

    d = np.load(npz)
    aff, u = d["affine"], d["displacement"].astype(np.float64)
    origin, spacing = d["origin"], d["spacing"]

    def to_target(x: np.ndarray) -> np.ndarray:
        y = x @ aff[:3, :3].T + aff[:3, 3]
        vox = ((y - origin) / spacing).T
        return y + np.stack([ndimage.map_coordinates(u[c], vox, order=1, mode="nearest")
                             for c in range(3)], axis=1)

    return to_target


def subject_reference(cohort: Path, sid: str, manifest) -> tuple:
    """(reference volume, true labels in subject space, origin of the volume)."""
    from scipy import ndimage

    from atlasbuilder.spaces import get_space
    from atlasbuilder.volumes import from_array, grid_of, read_nifti

    space = f"subject:{sid}"
    labels = read_nifti(cohort / "truth/subjects" / sid / "labels_subject.nii.gz", space, name="labels")
    subj = manifest.subject(sid)
    if getattr(subj, "reference", None):
        ref = read_nifti(manifest.resolve(subj.reference), space, name="image", dtype="float32")
        return ref, labels, "manifest reference"
    tmpl = get_space("MNI152NLin2009cAsym").load_template()
    tg = grid_of(tmpl)
    g = grid_of(labels)
    to_target = truth_to_target(cohort / "truth/subjects" / sid / "transform.npz")
    pts = np.stack(np.meshgrid(*g.coords().values(), indexing="ij"), -1).reshape(-1, 3)
    vox = ((to_target(pts) - np.asarray(tg.origin)) / np.asarray(tg.spacing)).T
    img = ndimage.map_coordinates(tmpl["template"].values, vox, order=1, cval=0.0).reshape(g.shape)
    return from_array(img.astype(np.float32), g, space, name="image"), labels, "template pulled back"


def dice_per_area(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    out = {}
    for k in sorted((set(np.unique(a)) | set(np.unique(b))) - {0}):
        x, y = a == k, b == k
        s = x.sum() + y.sum()
        out[int(k)] = float(2 * (x & y).sum() / s) if s else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="default: the manifest's stages.registration.preset")
    ap.add_argument("--resolution", type=float, default=None, help="override the preset's resolution_mm")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--subjects", nargs="*", default=None)
    ap.add_argument("--cohort", default=None)
    ap.add_argument("--bigbrain", action="store_true")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    from atlasbuilder.manifest import load_manifest
    from atlasbuilder.registration import (
        TransformGraph,
        brain_mask,
        register_subject,
        register_templates,
        registration_qa,
    )
    from atlasbuilder.synthetic.population import default_cache_dir
    from atlasbuilder.volumes import read_nifti

    cohort = Path(args.cohort) if args.cohort else sorted((default_cache_dir() / "cohorts").glob("demo-*"))[0]
    manifest = load_manifest(cohort / "manifest.yaml")
    preset = args.preset or manifest.stages.registration.preset
    threads = args.threads or manifest.stages.registration.threads
    res = "preset" if args.resolution is None else args.resolution
    sids = args.subjects or [s.id for s in manifest.subjects]
    mni = "MNI152NLin2009cAsym"
    from atlasbuilder.spaces import get_space

    template = get_space(mni).load_template()
    fmask = brain_mask(template)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-reg-"))
    bb_tr = None
    for sid in sids:
        ref, labels, how = subject_reference(cohort, sid, manifest)
        t0 = time.perf_counter()
        tr = register_subject(ref, mni, template, work / sid / mni, preset=preset, threads=threads, seed=0,
                              resolution_mm=res)
        secs = time.perf_counter() - t0
        to_target = truth_to_target(cohort / "truth/subjects" / sid / "transform.npz")
        g = labels.labels
        coords = np.stack(np.meshgrid(*[g[a].values for a in "xyz"], indexing="ij"), -1)
        rng = np.random.default_rng(0)
        gm = coords[np.asarray(g.values) > 0]
        rg = ref[next(iter(ref.data_vars))]
        rcoords = np.stack(np.meshgrid(*[rg[a].values for a in "xyz"], indexing="ij"), -1)
        brain = rcoords[np.asarray(brain_mask(ref)["mask"].values) > 0]
        gm = gm[rng.choice(len(gm), min(len(gm), 20000), replace=False)]
        brain = brain[rng.choice(len(brain), min(len(brain), 20000), replace=False)]
        err_gm = np.linalg.norm(tr.map_points(gm) - to_target(gm), axis=1)
        err_brain = np.linalg.norm(tr.map_points(brain) - to_target(brain), axis=1)
        qa = registration_qa(tr, brain_mask(ref), fmask, work / f"{sid}_qa.png", moving_image=ref,
                             fixed_image=template)
        truth_mni = read_nifti(cohort / "truth/subjects" / sid / f"labels_{mni}.nii.gz", mni, name="labels")
        warped = tr.warp(labels, truth_mni, interpolation="label")
        dice = dice_per_area(np.asarray(warped.labels.values), np.asarray(truth_mni.labels.values))
        sizes = {k: int((np.asarray(truth_mni.labels.values) == k).sum()) for k in dice}
        big = [v for k, v in dice.items() if sizes[k] >= 100]
        row = {"subject": sid, "reference": how, "preset": preset, "seconds": round(secs, 1),
               "gm_median_mm": float(np.median(err_gm)), "gm_p95_mm": float(np.percentile(err_gm, 95)),
               "brain_median_mm": float(np.median(err_brain)),
               "brain_p95_mm": float(np.percentile(err_brain, 95)),
               **{k: round(v, 4) for k, v in qa.items()},
               "dice_mean": float(np.nanmean(list(dice.values()))),
               "dice_mean_areas_ge_100_voxels": float(np.nanmean(big)), "dice": dice}
        if args.bigbrain:
            bbt = manifest.template_paths()["BigBrain"]
            bb_labels = read_nifti(cohort / "truth/subjects" / sid / "labels_BigBrain.nii.gz", "BigBrain",
                                   name="labels")
            t1 = time.perf_counter()
            direct = register_subject(ref, "BigBrain", bbt, work / sid / "BigBrain", preset=preset,
                                      threads=threads, seed=0, resolution_mm=res,
                                      templates={"BigBrain": bbt})
            row["bigbrain_direct_seconds"] = round(time.perf_counter() - t1, 1)
            if bb_tr is None:
                t1 = time.perf_counter()
                bb_tr = register_templates(mni, "BigBrain", work / "mni_bigbrain", preset=preset,
                                           threads=threads, seed=0, templates={"BigBrain": bbt},
                                           resolution_mm=2.0 if res == "preset" else float(res))
                row["mni_to_bigbrain_template_seconds"] = round(time.perf_counter() - t1, 1)
            graph = TransformGraph([tr, bb_tr])
            d_direct = dice_per_area(np.asarray(direct.warp(labels, bb_labels, interpolation="label")
                                                .labels.values), np.asarray(bb_labels.labels.values))
            d_comp = dice_per_area(np.asarray(graph.warp(labels, "BigBrain", bb_labels, interpolation="label")
                                              .labels.values), np.asarray(bb_labels.labels.values))
            row["bigbrain_direct_dice_mean"] = float(np.nanmean(list(d_direct.values())))
            row["bigbrain_composed_dice_mean"] = float(np.nanmean(list(d_comp.values())))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "dice"}), flush=True)
        print("  Dice per area (voxels in truth):", {k: f"{v:.3f} ({sizes[k]})" for k, v in dice.items()},
              flush=True)
    keys = ["seconds", "gm_median_mm", "gm_p95_mm", "brain_median_mm", "brain_p95_mm",
            "roundtrip_median_mm", "jacobian_min", "dice_mean", "dice_mean_areas_ge_100_voxels"]
    print("mean over brains:", {k: round(float(np.mean([r[k] for r in rows])), 3) for k in keys})
    if args.bigbrain:
        bk = ["bigbrain_direct_dice_mean", "bigbrain_composed_dice_mean", "bigbrain_direct_seconds"]
        print("BigBrain:", {k: round(float(np.mean([r[k] for r in rows])), 3) for k in bk},
              "MNI -> BigBrain template (once, s):", rows[0].get("mni_to_bigbrain_template_seconds"))
    print("QA figures in", work)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
