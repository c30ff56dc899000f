"""Quality-control figure of one brain's segmentation: sections with area contours, confidence.

Written next to the section maps as ``qa.png`` with ``qa.json`` (its caption), so the report
shows it with the other QA figures. Expert annotations are drawn where a section has them; the
per-section mean confidence of the CNN (mean of the winning class probability) is plotted along
the stack, which is where a user looks first for sections to check by eye.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..storage import atomic_write_bytes, atomic_write_text

__all__ = ["write_segmentation_qa"]


def _read_section(path: str | os.PathLike[str]) -> np.ndarray:
    import tifffile

    img = tifffile.imread(str(path))
    return np.asarray(img if img.ndim == 2 else img[..., 0])


def _block(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    return image[:h:factor, :w:factor]


def write_segmentation_qa(out_dir: str | os.PathLike[str], *, max_sections: int = 4,
                          max_pixels: int = 400) -> Path:
    """Draw ``out_dir/qa.png`` (and ``qa.json``) for a finished segmentation directory.

    Parameters
    ----------
    out_dir
        A directory written by :func:`~.stage.segment_subject`.
    max_sections
        Sections shown: the annotated ones first, then predicted ones spread along the stack.
    max_pixels
        Longest side of each shown section (sections are subsampled for the figure only).

    Returns
    -------
    pathlib.Path
        The PNG.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stage import load_section_labels

    out = Path(out_dir)
    info: dict[str, Any] = json.loads((out / "segmentation.json").read_text())
    labels = load_section_labels(out)
    secs = [s for s in info["sections"] if s["number"] in labels]
    annotated = [s for s in secs if s.get("annotated")]
    predicted = [s for s in secs if not s.get("annotated")]
    n_pred = max(0, max_sections - len(annotated))
    if predicted and n_pred:
        idx = np.unique(np.linspace(0, len(predicted) - 1, n_pred + 2)[1:-1].round().astype(int))
        shown = annotated + [predicted[i] for i in idx]
    else:
        shown = annotated[:max_sections]
    names = {c["region_id"]: c["key"] for c in info["classes"] if c["region_id"]}
    ids = sorted(names)
    cmap = plt.get_cmap("tab10" if len(ids) <= 10 else "tab20")
    colour = {rid: cmap(i % cmap.N) for i, rid in enumerate(ids)}
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(3.2 * (len(shown) + 1), 3.6),
                             gridspec_kw={"width_ratios": [1] * len(shown) + [1.3]})
    axes = np.atleast_1d(axes)
    for ax, s in zip(axes[:-1], shown, strict=False):
        img = _read_section(s["source"])
        lab = labels[s["number"]]
        f = max(1, int(np.ceil(max(img.shape) / max_pixels)))
        img_s, lab_s = _block(img, f), _block(lab, f)
        ax.imshow(img_s, cmap="gray", interpolation="nearest")
        for rid in ids:
            m = lab_s == rid
            if m.any():
                ax.contour(m, levels=[0.5], colors=[colour[rid]], linewidths=0.8)
        kind = "expert" if s.get("annotated") else f"CNN, confidence {s['mean_confidence']:.2f}"
        ax.set_title(f"section {s['number']}\n{kind}", fontsize=8)
        ax.set_axis_off()
    ax = axes[-1]
    pos = [s["number"] for s in info["sections"] if "mean_confidence" in s]
    conf = [s["mean_confidence"] for s in info["sections"] if "mean_confidence" in s]
    ax.plot(pos, conf, ".-", lw=0.8, ms=3, color="0.3")
    for s in annotated:
        ax.axvline(s["number"], color="tab:green", lw=0.8, ls="--")
    ax.set_xlabel("section number", fontsize=8)
    ax.set_ylabel("mean confidence", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.tick_params(labelsize=7)
    ax.set_title("confidence along the stack\n(dashed: annotated sections)", fontsize=8)
    handles = [plt.Line2D([], [], color=colour[r], lw=2) for r in ids]
    fig.legend(handles, [names[r] for r in ids], loc="lower center", ncol=min(len(ids), 5),
               fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    png = out / "qa.png"
    atomic_write_bytes(png, buf.getvalue())
    dice = info.get("dice_annotated") or {}
    atomic_write_text(out / "qa.json", json.dumps({
        "caption": f"Segmentation of {info.get('subject')}: area contours on sections "
                   f"(expert where annotated, CNN elsewhere) and the CNN's confidence along the "
                   f"stack; protocol {info.get('protocol')}; Dice on the annotated sections "
                   f"{json.dumps(dice)[:200]}"}, indent=1))
    return png
