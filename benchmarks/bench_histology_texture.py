"""Can brightness alone tell the synthetic areas apart? (It should not; texture and laminae should.)

Renders sections of the folded-ribbon phantom (:func:`atlasbuilder.synthetic.histology.ribbon_phantom`)
with different seeds, positions in the stack (staining drift) and misplacements, then fits
intensity-only pixel classifiers on some sections and scores them on held-out ones. Features per
grey-matter pixel: raw intensity and Gaussian-smoothed intensity at 0.2, 0.5 and 1 mm. Classifiers
(scikit-learn, benchmark only): Gaussian naive Bayes and a random forest. Prints, in one run:

1. per-area mean intensity in grey matter and the largest relative difference (target <= 5 %);
2. per-area Dice on held-out sections and the mean (target <= 0.5 for the pixel classifiers),
   next to the chance level of guessing by area frequency. For scale, the same forest with its
   class probabilities pooled over nearby grey matter, and a forest that is also handed each
   pixel's true cortical depth (pooled and not): the laminar pattern is there to be learnt, but a
   network has to infer depth and area from context;
3. render time per megapixel of :func:`render_section` and :func:`apply_artefacts`.

Usage::

    python benchmarks/bench_histology_texture.py [--pixel-size 0.2] [--train 4] [--test 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from atlasbuilder.synthetic.histology import (
    GREY_MATTER,
    apply_artefacts,
    cortical_depth,
    profiles_for,
    render_section,
    ribbon_phantom,
    smooth_labels,
)


def features(image: np.ndarray, pixel_size_mm: float) -> np.ndarray:
    """Raw and Gaussian-smoothed intensity at 0.2, 0.5 and 1 mm, shape (H, W, 4)."""
    x = image.astype(np.float32)
    feats = [x] + [ndimage.gaussian_filter(x, s / pixel_size_mm) for s in (0.2, 0.5, 1.0)]
    return np.stack(feats, axis=-1)


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    p, t = pred == label, truth == label
    denom = p.sum() + t.sum()
    return float(2 * (p & t).sum() / denom) if denom else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pixel-size", type=float, default=0.2)
    ap.add_argument("--train", type=int, default=4)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--samples", type=int, default=40_000, help="training pixels (subsample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-mm", type=float, default=2.0, help="pooling radius (sigma) in mm")
    args = ap.parse_args()

    from sklearn.ensemble import RandomForestClassifier
    from sklearn.naive_bayes import GaussianNB

    px = args.pixel_size
    tissue, area, keys = ribbon_phantom(px)
    names = {0: "cortex", **keys}
    labels = sorted(names)
    profiles = profiles_for(list(keys.values()))
    tissue_s, area_s = smooth_labels(tissue, area, px)
    n = args.train + args.test

    sections = []
    t_render = t_art = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        img = render_section(tissue, area, profiles, keys, px, rng=[args.seed, i])
        t1 = time.perf_counter()
        out, (tis, are), _ = apply_artefacts(img, (tissue_s, area_s), px, rng=[args.seed, 1000 + i],
                                            position=i / max(n - 1, 1))
        t2 = time.perf_counter()
        t_render += t1 - t0
        t_art += t2 - t1
        sections.append((img, out, tis, are))
    mpix = tissue.size / 1e6

    print(f"phantom {tissue.shape[0]}x{tissue.shape[1]} px at {px} mm, {n} sections "
          f"({args.train} train, {args.test} held out)")
    print(f"render_section : {t_render / n / mpix:6.3f} s/Mpx   "
          f"apply_artefacts: {t_art / n / mpix:6.3f} s/Mpx")

    # 1. brightness per area: on clean renders (no stack drift), grey matter of each area
    means = np.array([[img[(tissue_s == GREY_MATTER) & (area_s == lab)].mean() for lab in labels]
                      for img, *_ in sections])
    per_section = (means.max(1) - means.min(1)) / means.mean(1)
    avg = means.mean(0)
    print("\nmean grey-matter intensity per area (clean renders, averaged over sections):")
    for lab, m in zip(labels, avg, strict=True):
        print(f"  {names[lab]:8s} {m:7.2f}")
    print(f"  max relative difference: {100 * (avg.max() - avg.min()) / avg.mean():.2f} % "
          f"(averaged sections); worst single section {100 * per_section.max():.2f} %  [target <= 5 %]")

    # 2. intensity-only classifiers, trained and tested on the artefacted sections
    def stack(idx: range) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for i in idx:
            _, out, tis, are = sections[i]
            gm = tis == GREY_MATTER
            depth = cortical_depth(tis, px)[gm]
            xs.append(np.column_stack([features(out, px)[gm], depth]))
            ys.append(are[gm])
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = stack(range(args.train))
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(y_train), size=min(args.samples, len(y_train)), replace=False)
    freq = np.bincount(y_train, minlength=max(labels) + 1)[labels] / len(y_train)
    chance = dict(zip(labels, freq, strict=True))  # Dice of guessing at the areas' frequencies

    def forest() -> RandomForestClassifier:
        return RandomForestClassifier(n_estimators=100, min_samples_leaf=20, n_jobs=-1,
                                      random_state=args.seed)

    intensity_only, with_depth = slice(0, 4), slice(0, 5)
    models = {"naive Bayes": (GaussianNB(), intensity_only), "random forest": (forest(), intensity_only),
              "RF + depth": (forest(), with_depth)}
    for clf, cols in models.values():
        clf.fit(x_train[pick, cols], y_train[pick])

    def pooled(prob: np.ndarray, gm: np.ndarray) -> np.ndarray:
        """Class probabilities averaged over grey matter within ~``--pool-mm`` (what context buys)."""
        sigma = args.pool_mm / px
        norm = ndimage.gaussian_filter(gm.astype(np.float32), sigma)[gm]
        out = np.empty_like(prob)
        for c in range(prob.shape[1]):
            img = np.zeros(gm.shape, np.float32)
            img[gm] = prob[:, c]
            out[:, c] = ndimage.gaussian_filter(img, sigma)[gm] / norm
        return out

    columns = ["naive Bayes", "random forest", f"RF pooled {args.pool_mm:g}mm", "RF + depth",
               f"RF+depth pooled {args.pool_mm:g}mm"]
    scores: dict[str, list[dict[int, float]]] = {k: [] for k in columns}
    for i in range(args.train, n):
        x_test, y_test = stack(range(i, i + 1))
        gm = sections[i][2] == GREY_MATTER
        preds = {}
        for name, (clf, cols) in models.items():
            prob = clf.predict_proba(x_test[:, cols])
            preds[name] = clf.classes_[prob.argmax(1)]
            if name != "naive Bayes":
                key = "RF pooled" if name == "random forest" else "RF+depth pooled"
                preds[f"{key} {args.pool_mm:g}mm"] = clf.classes_[pooled(prob, gm).argmax(1)]
        for name in columns:
            scores[name].append({lab: dice(preds[name], y_test, lab) for lab in labels})
    results = {k: {lab: float(np.mean([s[lab] for s in v])) for lab in labels} for k, v in scores.items()}

    print("\nheld-out Dice per area, averaged over held-out sections. Pixel features: raw intensity and")
    print("intensity smoothed at 0.2/0.5/1 mm; 'pooled' averages class probabilities over grey matter")
    print("nearby; '+ depth' is also handed the true cortical depth (the laminar pattern is there to")
    print("be learnt; a network has to infer depth from context):")
    print(f"  {'area':8s}" + "".join(f"{k:>22s}" for k in columns) + f"{'chance':>9s}")
    for lab in labels:
        print(f"  {names[lab]:8s}" + "".join(f"{results[k][lab]:22.3f}" for k in columns)
              + f"{chance[lab]:9.3f}")
    mean = {k: float(np.mean(list(results[k].values()))) for k in columns}
    print(f"  {'mean':8s}" + "".join(f"{mean[k]:22.3f}" for k in columns)
          + f"{np.mean(list(chance.values())):9.3f}")
    best = max(mean["naive Bayes"], mean["random forest"])
    print(f"\nintensity-only pixel classifier, best mean Dice: {best:.3f}  [target <= 0.5]")


if __name__ == "__main__":
    main()
