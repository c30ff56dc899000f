"""Segmentation protocols on the demo cohort, scored against the truth (issue 4).

Protocols (each brain has 2 annotated sections; Dice is measured on all its NON-annotated sections
against ``truth/subjects/<id>/sections/<name>.png``, mean over the areas present):

- ``scratch``   (a): per brain from scratch on its annotated sections;
- ``pretrain``  (b): per brain, fine-tuned from a masked-inpainting model pretrained on the brain's
  unannotated sections (:func:`atlasbuilder.segmentation.pretrain`);
- ``transfer``  (c): a cohort model trained on the annotated sections of the OTHER brains
  (leave-one-out), mapping the brain as it is (fine-tuned on the brain's own annotations only
  with ``--set transfer_iterations=N``: by default the build does not, see
  :mod:`atlasbuilder.segmentation.stage`);
- ``build``        : the build's protocol (``auto``): ``cohort_models`` cohort models (seeds 0, 1,
  ...; trained one after the other here) on ALL brains' annotations, mapping each brain together
  (what ``atlasbuilder segment`` does; ``--set cohort_models=1`` for one). ``transfer`` and
  ``dense`` train as many. No atlas prior here unless ``--prior-build DIR`` names a full demo
  build whose placements and registrations give every brain its prior (the build's needs every
  brain placed and registered); score a build's own segmentation with ``--build``.
- ``selftrain``    : ``build``, then one round of self-training per brain: the brain's pixels
  predicted with at least ``--pseudo-threshold`` confidence on its non-annotated sections become
  pseudo-labels (the rest is ignored), the brain's model is fine-tuned on them and its annotations
  for ``--pseudo-steps`` more steps and predicts again. Compare it with ``build`` given as many
  fine-tuning steps (``--set finetune_iterations=...``): on the quick cohort both gained the same.
- ``dense``        : a diagnostic, not a protocol: a cohort model trained on the TRUE labels of
  every ``--dense-every``-th section of the brains NOT in ``--brains`` (far more annotations than
  any lab has), mapping each scored brain as the build does (without its own annotations). It
  measures what the network can learn from the demo's textures given plenty of examples;
  ``--brains`` is required. Default demo, brains B09 and B10, the build's settings and atlas prior
  (``--prior-build``), one model (``--set cohort_models=1``), every section of the other 8 brains
  (``--dense-every 1``, 275 sections): 0.782 with the build's 2500 steps, 0.812 with 5000, 0.829
  with 10000 (24 min of training), against 0.741 for one model of the build's 2 annotated
  sections a brain (``--protocols build`` with the same options: 20 sections in all; 0.749 for
  the build's two models).

``--annotated N`` gives each brain N annotated sections: 1 keeps the first of its 2; more adds
sections annotated with their true labels, spread over the areas' extent (``_more_annotations``).
Default demo, all 10 brains, one model of the build's settings and 2500 steps, with the build's
prior (``--protocols build --set cohort_models=1 --prior-build DIR``): 2 a brain 0.727, 4 a brain
0.747, 8 a brain 0.752. At the build's training budget more annotations soon stop paying, as they
do in ``dense`` above; with many of them, more steps pay.

Usage::

    nice python benchmarks/bench_segmentation_protocols.py --cohort quick --protocols build
    nice python benchmarks/bench_segmentation_protocols.py --cohort default --protocols build
    nice python benchmarks/bench_segmentation_protocols.py --cohort quick \
        --protocols scratch,pretrain,transfer --brains B01,B02,B03
    nice python benchmarks/bench_segmentation_protocols.py --cohort default --protocols dense \
        --brains B09,B10
    nice python benchmarks/bench_segmentation_protocols.py --cohort default --protocols dense \
        --brains B09,B10 --dense-every 1 --set cohort_models=1 --prior-build demo-atlas-full
    nice python benchmarks/bench_segmentation_protocols.py --cohort quick --protocols build,selftrain \
        --set cohort_models=1
    python benchmarks/bench_segmentation_protocols.py --build demo-atlas-full   # a build's maps

``--build DIR`` trains nothing: it scores the segmentation of every brain of an atlas built from a
demo manifest (``atlasbuilder build data_manifests/demo.yaml -o DIR``, the atlas prior and all)
against the truth of the cohort it was built from.

Prints a per-brain and per-area table and minutes per brain, and how much of what is wrong lies at
the areas' borders (the share of wrongly labelled pixels within 1 / 2 / 3 px of a true border, and
the Dice of the truth with every area's border moved in by 1 / 2 / 3 px: the full demo build of
``docs/demo_accuracy.md`` 50 / 64 / 73 % and 0.930 / 0.857 / 0.782), and the brain-area maps
whose area the scored sections show in less than 100 mm^3 (the truth's volume), with the mean
without them; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

SMALL_MM3 = 100.0
"""Brain-area maps whose area the scored sections show in less than this volume (the truth's) are
listed apart, with the mean without them: fragments of a thin area that score 0 when missed."""


def _input_error(message: str) -> NoReturn:
    """Exit 2 with a one-line error (bad arguments or input), as argparse does for usage errors."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _truth(cohort: Path, sid: str, name: str) -> np.ndarray:
    import imageio.v3 as iio

    path = cohort / "truth" / "subjects" / sid / "sections" / (Path(name).stem + ".png")
    return np.asarray(iio.imread(path))


def score(cohort: Path, sid: str, out_dir: Path) -> dict[str, dict[str, float]]:
    """Per-area Dice (pooled over the brain's non-annotated sections), predicted / true area size,
    per-section mean Dice, and two measures of how much is at the areas' borders: how many of the
    wrongly labelled pixels lie within 1, 2, 3 px (4-connected steps) of a border of the true labels
    (``near``), and the Dice of the truth itself with every area's border moved in by 1, 2, 3 px
    (``shifted``: what a map whose borders were all off by that much would score)."""
    from scipy import ndimage

    from atlasbuilder.segmentation.stage import _read_info, load_section_labels

    cross = ndimage.generate_binary_structure(2, 1)
    steps = (1, 2, 3)
    wrong = 0.0
    near = dict.fromkeys(steps, 0.0)
    shift_inter: dict[int, dict[int, float]] = {k: {} for k in steps}
    shift_total: dict[int, dict[int, float]] = {k: {} for k in steps}

    info = _read_info(out_dir)
    keys = {c["region_id"]: c["key"] for c in info["classes"] if c["region_id"]}
    labels = load_section_labels(out_dir)
    inter: dict[int, float] = {}
    total: dict[int, float] = {}
    npred: dict[int, float] = {}
    ntrue: dict[int, float] = {}
    per_section = []
    for rec in info["sections"]:
        if rec["annotated"]:
            continue
        truth = _truth(cohort, sid, rec["file"])
        pred = labels[rec["number"]]
        ds = []
        for r in keys:
            p, t = pred == r, truth == r
            i, s = float((p & t).sum()), float(p.sum() + t.sum())
            inter[r] = inter.get(r, 0.0) + i
            total[r] = total.get(r, 0.0) + s
            npred[r] = npred.get(r, 0.0) + float(p.sum())
            ntrue[r] = ntrue.get(r, 0.0) + float(t.sum())
            if t.any():
                ds.append(2 * i / s)
                eroded, n_true = t, float(t.sum())
                for k in steps:  # k px in: one more 1-px erosion of the last
                    eroded = ndimage.binary_erosion(eroded, cross)
                    e = float(eroded.sum())
                    shift_inter[k][r] = shift_inter[k].get(r, 0.0) + e
                    shift_total[k][r] = shift_total[k].get(r, 0.0) + e + n_true
        if ds:
            per_section.append(float(np.mean(ds)))
        border = np.zeros(truth.shape, bool)
        for v in np.unique(truth):
            m = truth == v
            border |= m & ~ndimage.binary_erosion(m, cross, border_value=1)
        dist = ndimage.distance_transform_cdt(~border, metric="taxicab")
        bad = pred.astype(np.int64) != truth.astype(np.int64)
        wrong += float(bad.sum())
        for k in steps:
            near[k] += float((bad & (dist <= k)).sum())
    area = {keys[r]: 2 * inter[r] / total[r] for r in keys if total.get(r)}
    voxel = _pixel_mm3(cohort, sid)
    true_mm3 = {keys[r]: ntrue.get(r, 0.0) * voxel for r in keys if total.get(r)}
    mean = float(np.mean(per_section)) if per_section else float("nan")
    size = {keys[r]: npred[r] / ntrue[r] for r in keys if ntrue.get(r)}
    shifted = {str(k): float(np.mean([2 * shift_inter[k][r] / shift_total[k][r] for r in shift_inter[k]]))
               for k in steps if shift_inter[k]}
    return {"area": area, "size": size, "section_mean": {"mean": mean},
            "near": {str(k): near[k] / wrong if wrong else float("nan") for k in steps},
            "shifted": shifted, "true_mm3": true_mm3}


def _pixel_mm3(cohort: Path, sid: str) -> float:
    """The volume one section pixel stands for, as the segmentation stage reckons the areas'
    volumes (``min_area_mm3``): from the cohort manifest's pixel size, spacing and thickness."""
    from atlasbuilder.manifest import load_manifest
    from atlasbuilder.segmentation.stage import _subject

    return float(_subject(load_manifest(cohort / "manifest.yaml"), sid).pixel_mm3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", default="quick", choices=["quick", "default"])
    ap.add_argument("--protocols", default="build")
    ap.add_argument("--brains", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--annotated", type=int, default=2,
                    help="annotated sections per brain: 1 keeps the first of the cohort's 2; more "
                         "adds sections annotated with their true labels (default 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, oversubscribed CPU 2 threads ran ~10x slower)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--build", default=None, metavar="DIR",
                    help="score the segmentation of an atlas built from a demo manifest instead")
    ap.add_argument("--prior-build", default=None, metavar="DIR",
                    help="give the cohort models and the brains the atlas prior (FSL Juelich maps) "
                         "placed by this full demo build's placements and registrations")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a StageSettings field, "
                         "e.g. --set positions=True --set mirror=False (repeatable)")
    ap.add_argument("--work", default=None, help="keep outputs here (default: a temporary directory)")
    ap.add_argument("--dense-every", type=int, default=3,
                    help="dense protocol: train on every k-th section of the other brains (default 3)")
    ap.add_argument("--pseudo-threshold", type=float, default=0.9,
                    help="selftrain: least predicted probability of a pseudo-labelled pixel (default 0.9)")
    ap.add_argument("--pseudo-steps", type=int, default=300,
                    help="selftrain: fine-tuning steps on annotations + pseudo-labels (default 300)")
    args = ap.parse_args()
    if args.build:
        results = {"build": _score_build(Path(args.build))}
        _table(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    if not 0 < args.pseudo_threshold <= 1 or args.pseudo_steps < 1:
        ap.error("--pseudo-threshold must be in (0, 1] and --pseudo-steps at least 1")
    if "dense" in args.protocols.split(",") and not args.brains:
        ap.error("the dense protocol trains on the brains not scored: give --brains")
    if args.dense_every < 1:
        ap.error("--dense-every must be at least 1")
    if args.prior_build and not set(args.protocols.split(",")) <= {"build", "dense"}:
        ap.error("--prior-build works with the build and dense protocols")

    import torch

    from atlasbuilder.manifest import load_manifest
    from atlasbuilder.segmentation.stage import StageSettings, segment_subject, train_cohort_model
    from atlasbuilder.synthetic.cohort import CohortSettings, cached_cohort

    torch.set_num_threads(args.threads)
    cs = CohortSettings()
    if args.cohort == "quick":
        cs = cs.quick()
    mpath, _ = cached_cohort(cs, progress=False)
    cohort = Path(mpath).parent
    manifest = load_manifest(mpath)
    if args.annotated < 1:
        ap.error("--annotated must be at least 1")
    if args.annotated < 2:
        manifest = _fewer_annotations(manifest, args.annotated)
    elif args.annotated > 2:
        manifest = _more_annotations(manifest, cohort, args.annotated, ap.error)
    ids = args.brains.split(",") if args.brains else [s.id for s in manifest.subjects]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-seg-"))
    st = StageSettings()
    for kv in args.set:
        key, _, value = kv.partition("=")
        if not hasattr(st, key):
            _input_error(f"--set {kv}: StageSettings has no field {key!r}")
        st = replace(st, **{key: _value(value, getattr(st, key))})
    print(f"settings: {st}", flush=True)
    priors = None
    if args.prior_build:
        priors = _priors(Path(args.prior_build), manifest, st, ap.error)
    results: dict[str, dict] = {}
    for protocol in args.protocols.split(","):
        t0 = time.perf_counter()
        res: dict = {"brains": {}, "minutes": {}}
        base = work / protocol
        if protocol == "selftrain":
            base = work / "build"  # the build protocol's models and predictions are its start
        if protocol == "selftrain" and st.cohort_models > 1:
            _input_error("selftrain fine-tunes one model: run it with --set cohort_models=1")
        # the protocols with cohort models train st.cohort_models of them (seeds 0, 1, ...), one
        # after the other (the build trains them at the same time on separate workers)
        models = [base / ("cohort_model.pt" if i == 0 else f"cohort_model-{i + 1}.pt")
                  for i in range(st.cohort_models)]
        if protocol in ("build", "dense", "selftrain"):
            tc = time.perf_counter()
            for seed, ck in enumerate(models):
                if not ck.exists() and protocol in ("build", "selftrain"):
                    train_cohort_model(manifest, ck, settings=st, seed=seed, progress=False,
                                       priors=priors)
                elif not ck.exists():
                    dense = load_manifest(_dense_manifest(cohort, base / "manifest", args.dense_every))
                    train_cohort_model(dense, ck, exclude=ids, settings=st, seed=seed, progress=True,
                                       priors=priors)
            res["cohort_model_min"] = (time.perf_counter() - tc) / 60
        for sid in ids:
            tb = time.perf_counter()
            out = base / sid
            if protocol in ("build", "dense", "selftrain"):
                segment_subject(manifest, sid, out, init_checkpoint=models, settings=st, progress=False,
                                prior=priors[sid] if priors else None)
                if protocol == "selftrain":
                    out = _self_train(manifest, sid, out, work / "selftrain" / sid, st,
                                      args.pseudo_threshold, args.pseudo_steps)
            elif protocol == "scratch":
                segment_subject(manifest, sid, out, settings=replace(st, protocol="scratch"),
                                progress=False)
            elif protocol == "transfer":
                cks = [base / (f"cohort_without_{sid}.pt" if i == 0 else f"cohort_without_{sid}-{i + 1}.pt")
                       for i in range(st.cohort_models)]
                for seed, ck in enumerate(cks):
                    if not ck.exists():
                        train_cohort_model(manifest, ck, exclude=[sid], settings=st, seed=seed,
                                           progress=False)
                segment_subject(manifest, sid, out, init_checkpoint=cks, settings=st, progress=False)
            elif protocol == "pretrain":
                ck = base / f"pretrained_{sid}.pt"
                if not ck.exists():
                    _pretrain(manifest, sid, ck, st)
                segment_subject(manifest, sid, out, init_checkpoint=ck,
                                settings=replace(st, protocol="finetune",
                                                 finetune_iterations=st.scratch_iterations,
                                                 finetune_lr=st.scratch_lr), progress=False)
            else:
                _input_error(f"unknown protocol {protocol}")
            res["minutes"][sid] = (time.perf_counter() - tb) / 60
            res["brains"][sid] = score(cohort, sid, out)
            a = res["brains"][sid]["area"]
            print(f"{protocol:9s} {sid}: mean Dice over areas {np.mean(list(a.values())):.3f} "
                  f"({res['minutes'][sid]:.2f} min)", flush=True)
        res["total_min"] = (time.perf_counter() - t0) / 60
        results[protocol] = res
    _table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _priors(build: Path, manifest: Any, st: Any, fail: Any) -> dict[str, Any]:
    """Every brain's atlas prior as the build at ``build`` placed it (FSL Juelich maps), made as
    the build makes it."""
    from atlasbuilder.pipeline import _atlas_prior, juelich_prior_atlas

    for s in manifest.subjects:
        placed = build / "brains" / s.id / "placement" / "reconstruction.json"
        if not placed.is_file():
            fail(f"--prior-build {build}: no placement of brain {s.id} ({placed} not found); "
                 f"give a full build of the same demo cohort (make demo-full)")
    atlas = str(juelich_prior_atlas())
    pair = str(build / "transforms" / "MNI152NLin6Asym__MNI152NLin2009cAsym")
    return {s.id: _atlas_prior(manifest, st, s.id, atlas, str(build / "brains" / s.id / "placement"),
                               [str(build / "brains" / s.id / "registration"), pair])
            for s in manifest.subjects}


def _value(text: str, old: Any) -> Any:
    """``--set`` text as the type of the field's default (``none`` for None; a field whose
    default is None takes an int, a float or text)."""
    if text.lower() == "none":
        return None
    if isinstance(old, bool):
        return text.lower() in ("1", "true", "yes")
    if old is not None:
        return type(old)(text)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _dense_manifest(cohort: Path, out: Path, every: int) -> Path:
    """A copy of the cohort's manifest (symlinked data) whose brains have every ``every``-th
    section annotated with its true labels."""
    import os
    import shutil

    if (out / "manifest.yaml").is_file():
        return out / "manifest.yaml"
    out.mkdir(parents=True, exist_ok=True)
    for entry in cohort.iterdir():
        if entry.name not in ("annotations", "manifest.yaml"):
            os.symlink(entry.resolve(), out / entry.name)
    for sdir in sorted((cohort / "truth" / "subjects").iterdir()):
        files = sorted((sdir / "sections").glob("*.png")) if (sdir / "sections").is_dir() else []
        (out / "annotations" / sdir.name).mkdir(parents=True)
        for f in files[::every]:
            os.symlink(f.resolve(), out / "annotations" / sdir.name / f.name)
    shutil.copy(cohort / "manifest.yaml", out / "manifest.yaml")
    return out / "manifest.yaml"


def _fewer_annotations(manifest: Any, n: int) -> Any:
    """A manifest copy whose brains keep only their first ``n`` annotated sections."""
    subs = []
    for s in manifest.subjects:
        files = manifest.annotation_files(s.id)
        keep = [str(p) for p in list(files.values())[:n]]
        subs.append(s.model_copy(update={"annotations": s.annotations.model_copy(update={"files": keep})}))
    return manifest.model_copy(update={"subjects": subs})


def _more_annotations(manifest: Any, cohort: Path, n: int, fail: Any) -> Any:
    """A manifest copy whose brains have ``n`` annotated sections: their own, then sections
    annotated with their true labels, each the farthest (in section numbers) from those annotated
    already among the sections that show at least a fifth of the most area pixels any section of
    the brain shows, as a lab spreads its annotations over the areas' extent."""
    subs = []
    for s in manifest.subjects:
        files = dict(manifest.annotation_files(s.id))
        truth = {k: cohort / "truth" / "subjects" / s.id / "sections" / (p.stem + ".png")
                 for k, p in manifest.section_files(s.id).items()}
        area = {k: int((_truth(cohort, s.id, t.name) > 0).sum()) for k, t in truth.items() if t.is_file()}
        most = max(area.values(), default=0)
        showing = [k for k in sorted(area) if k not in files and area[k] >= 0.2 * most > 0]
        while len(files) < n and showing:
            far = max(showing, key=lambda k: (min(abs(k - a) for a in files), -k))
            files[far] = truth[far]
            showing.remove(far)
        if len(files) < n:
            fail(f"--annotated {n}: brain {s.id} has only {len(files)} sections that show enough "
                 f"of the areas")
        keep = [str(files[k]) for k in sorted(files)]
        subs.append(s.model_copy(update={"annotations": s.annotations.model_copy(update={"files": keep})}))
    return manifest.model_copy(update={"subjects": subs})


def _pretrain(manifest: Any, sid: str, path: Path, st: Any) -> None:
    from atlasbuilder.segmentation.pretraining import PretrainingConfig, pretrain
    from atlasbuilder.segmentation.stage import _frame_of_array, _read_image, _subject, position_channels
    from atlasbuilder.segmentation.training import save_checkpoint

    sub = _subject(manifest, sid)
    imgs = []
    for n, p in sub.sections.items():
        if n in sub.annotations:
            continue
        img = _read_image(p)
        if st.positions:
            img = np.concatenate([img, position_channels(img.shape[1:], _frame_of_array(img),
                                                         sub.positions[n])])
        imgs.append(img)
    cfg = PretrainingConfig(patch_size=st.patch_size, width=st.width, depth=st.depth, context=st.context,
                            input_pool=st.input_pool, input_mode=st.input_mode,
                            max_iterations=st.scratch_iterations // 2)
    model, _ = pretrain(imgs, config=cfg, progress=False)
    save_checkpoint(model, path)


def _self_train(manifest: Any, sid: str, first: Path, out: Path, st: Any, threshold: float,
                steps: int) -> Path:
    """One round of self-training from the brain's segmentation in ``first`` (see the module
    docstring); writes its predictions and a ``segmentation.json`` that :func:`score` reads to
    ``out`` and returns ``out``."""
    from atlasbuilder.segmentation.prediction import SlidingWindow, predict_file
    from atlasbuilder.segmentation.stage import (
        _read_image,
        _read_info,
        _subject,
        _training_inputs,
        load_section_probabilities,
    )
    from atlasbuilder.segmentation.training import train

    if st.positions:
        _input_error("the selftrain protocol does not add position channels to the pseudo-labelled "
                         "sections: run it without --set positions=True")
    if (out / "segmentation.json").is_file():
        return out
    sub = _subject(manifest, sid)
    images, annotations, _ = _training_inputs(sub, st)
    # class index + 1 for every pixel (0: ignored), for the annotations and the pseudo-labels alike
    lut = np.zeros(max(sub.mapping) + 1, np.int32)
    for value, key in sub.mapping.items():
        lut[value] = sub.classes.index(key) + 1 if key is not None else 0
    labels = [lut[a] for a in annotations]
    for n in sorted(set(sub.sections) - set(sub.annotations)):
        _, probs = load_section_probabilities(first, n)
        images.append(_read_image(sub.sections[n]))
        labels.append(np.where(probs.max(0) >= threshold * 100, probs.argmax(0) + 1, 0).astype(np.int32))
    mapping = {0: None, **{i + 1: c for i, c in enumerate(sub.classes)}}
    model, _ = train(images, labels, mapping, classes=sub.classes,
                     config=st.training_config(steps, st.finetune_lr), init=str(first / "model.pt"))
    info = _read_info(first)
    window = SlidingWindow(roi_size=st.window_size, overlap=st.overlap, batch_size=st.predict_batch)
    for rec in info["sections"]:
        store = predict_file(sub.sections[int(rec["number"])], out / "sections", model,
                             classes=sub.classes, window=window)
        rec["prediction"] = str(store.relative_to(out))
    info["note"] = f"self-trained from {first} (pseudo-labels at >= {threshold}, {steps} steps)"
    (out / "segmentation.json").write_text(json.dumps(info, indent=1))
    return out


def _score_build(build: Path) -> dict:
    """Every brain's segmentation in an atlas directory, scored against its demo cohort's truth."""
    res: dict = {"brains": {}, "minutes": {}}
    brains = build / "brains"
    if not brains.is_dir():
        _input_error(f"{build}: not an atlas directory with brains/ (atlasbuilder build -o DIR)")
    for d in sorted(brains.iterdir()):
        seg = d / "segmentation"
        if not (seg / "segmentation.json").is_file():
            continue  # the reference brain, or a brain not segmented
        info = json.loads((seg / "segmentation.json").read_text())
        cohort = Path(info["sections"][0]["source"]).parents[2]  # <cohort>/sections/<id>/<file>
        if not ((cohort / "truth" / "subjects" / d.name).is_dir() and (cohort / "manifest.yaml").is_file()):
            _input_error(f"{seg}: its sections come from {cohort}, which has no truth or manifest.yaml "
                         f"for {d.name} (not a demo cohort)")
        res["brains"][d.name] = score(cohort, d.name, seg)
        res["minutes"][d.name] = float(info["timings_s"]["total"]) / 60
    if not res["brains"]:
        _input_error(f"{build}: no segmented brains under brains/")
    res["total_min"] = sum(res["minutes"].values())
    return res


def _table(results: dict) -> None:
    for protocol, res in results.items():
        brains = res["brains"]
        areas = sorted({a for b in brains.values() for a in b["area"]})
        extra = f", cohort model {res['cohort_model_min']:.2f} min" if "cohort_model_min" in res else ""
        print(f"\n## {protocol}  (total {res['total_min']:.2f} min{extra})")
        print("| brain | " + " | ".join(areas) + " | mean | min/brain |")
        print("|---" * (len(areas) + 3) + "|")
        for sid, b in brains.items():
            vals = [b["area"].get(a, float("nan")) for a in areas]
            print(f"| {sid} | " + " | ".join(f"{v:.2f}" for v in vals)
                  + f" | {np.nanmean(vals):.3f} | {res['minutes'][sid]:.2f} |")
        mean_area = [np.nanmean([b["area"].get(a, np.nan) for b in brains.values()]) for a in areas]
        print("| mean | " + " | ".join(f"{v:.2f}" for v in mean_area)
              + f" | {np.nanmean([np.nanmean(list(b['area'].values())) for b in brains.values()]):.3f} | |")
        size = [np.nanmean([b.get("size", {}).get(a, np.nan) for b in brains.values()]) for a in areas]
        print("| predicted / true size | " + " | ".join(f"{v:.2f}" for v in size) + " | | |")
        near = {k: np.nanmean([b["near"][k] for b in brains.values() if "near" in b])
                for k in ("1", "2", "3")}
        shifted = {k: np.nanmean([b["shifted"].get(k, np.nan) for b in brains.values() if "shifted" in b])
                   for k in ("1", "2", "3")}
        print("\nwrongly labelled pixels within 1 / 2 / 3 px of a true border: "
              + " / ".join(f"{100 * v:.0f} %" for v in near.values())
              + "; the truth with every area's border moved in by 1 / 2 / 3 px scores "
              + " / ".join(f"{v:.3f}" for v in shifted.values()))
        small = [(sid, a, v, b["area"][a]) for sid, b in brains.items()
                 for a, v in b.get("true_mm3", {}).items() if v < SMALL_MM3]
        if small:
            apart = {(sid, a) for sid, a, _, _ in small}
            kept = [np.nanmean([d for a, d in b["area"].items() if (sid, a) not in apart] or [np.nan])
                    for sid, b in brains.items()]
            print(f"{len(small)} of {sum(len(b['area']) for b in brains.values())} brain-area maps show "
                  f"less than {SMALL_MM3:g} mm^3 of the area on the scored sections (truth): "
                  + ", ".join(f"{sid} {a} {v:.0f} mm^3 (Dice {d:.2f})" for sid, a, v, d in small)
                  + f"; the mean without them {np.nanmean(kept):.3f}")


if __name__ == "__main__":
    main()
