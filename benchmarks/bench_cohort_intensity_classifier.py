"""Brightness alone should not tell the demo cohort's areas apart: an intensity-only baseline.

On a generated cohort (``atlasbuilder synth DIR``), trains pixel classifiers on the annotated
sections of some brains and scores them on the annotated sections of the others (held-out brains).
Features per annotated pixel: raw intensity and Gaussian-smoothed intensity at 0.2, 0.5 and 1 mm
(each section divided by its own mean, so stack-wide staining drift does not help or hurt).
Classifiers (scikit-learn, benchmark only): Gaussian naive Bayes and a random forest. Prints
per-area Dice on the held-out sections and the mean (target <= 0.5), and the chance level of
guessing by area frequency. The CNN of the segmentation stage is the peer that must do far better.

    python benchmarks/bench_cohort_intensity_classifier.py COHORT_DIR [--train-brains 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from atlasbuilder.manifest import load_manifest


def features(img: np.ndarray, px: float) -> np.ndarray:
    x = img.astype(np.float32)
    x /= x.mean()
    return np.stack([x] + [ndimage.gaussian_filter(x, s / px) for s in (0.2, 0.5, 1.0)], axis=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cohort", type=Path)
    ap.add_argument("--train-brains", type=int, default=2)
    ap.add_argument("--samples", type=int, default=60_000)
    args = ap.parse_args()
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.naive_bayes import GaussianNB

    m = load_manifest(args.cohort / "manifest.yaml")
    data = []
    for s in m.subjects:
        px = s.sections.pixel_size_um / 1000
        secs = m.section_files(s.id)
        for n, a in m.annotation_files(s.id).items():
            lab = np.asarray(Image.open(a))
            f = features(tifffile.imread(secs[n]), px)
            sel = lab > 0
            data.append((s.id, f[sel], lab[sel]))
    ids = [s.id for s in m.subjects]
    train_ids = set(ids[: args.train_brains])
    xtr = np.concatenate([d[1] for d in data if d[0] in train_ids])
    ytr = np.concatenate([d[2] for d in data if d[0] in train_ids])
    xte = np.concatenate([d[1] for d in data if d[0] not in train_ids])
    yte = np.concatenate([d[2] for d in data if d[0] not in train_ids])
    rng = np.random.default_rng(0)
    pick = rng.choice(len(ytr), min(args.samples, len(ytr)), replace=False)
    labels = np.unique(np.concatenate([ytr, yte]))
    names = m.subjects[0].annotations.labels
    freq = np.array([np.mean(ytr == v) for v in labels])
    print(f"train brains {sorted(train_ids)}, test brains {sorted(set(ids) - train_ids)}: "
          f"{len(ytr):,} / {len(yte):,} annotated pixels")
    rows = {}
    for name, clf in (("naive Bayes", GaussianNB()),
                      ("random forest", RandomForestClassifier(60, min_samples_leaf=20,
                                                               n_jobs=2, random_state=0))):
        pred = clf.fit(xtr[pick], ytr[pick]).predict(xte)
        rows[name] = [2 * np.sum((pred == v) & (yte == v)) / max(1, np.sum(pred == v) + np.sum(yte == v))
                      for v in labels]
    guess = rng.choice(labels, size=len(yte), p=freq / freq.sum())
    rows["chance (area frequency)"] = [2 * np.sum((guess == v) & (yte == v)) /
                                       max(1, np.sum(guess == v) + np.sum(yte == v)) for v in labels]
    print(f"{'area':<14}" + "".join(f"{k:>26}" for k in rows))
    for i, v in enumerate(labels):
        print(f"{names.get(int(v), v):<14}" + "".join(f"{rows[k][i]:>26.2f}" for k in rows))
    print(f"{'mean Dice':<14}" + "".join(f"{np.mean(rows[k]):>26.2f}" for k in rows)
          + "   (target for the intensity-only classifiers: <= 0.5)")


if __name__ == "__main__":
    main()
