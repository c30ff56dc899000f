"""Sliding-window prediction side by side with MONAI's ``sliding_window_inference``.

Same network (the atlasbuilder U-Net, identical weights), same windows (roi, overlap), same Gaussian
importance map (sigma_scale 0.125), same batch size, on one synthetic ``size x size`` uint8 section
stored as a tiled, compressed TIFF. Each side runs in its own fresh process and goes from the TIFF on
disk to the blended float32 scores ``(K, H, W)`` on disk:

- MONAI: read the TIFF, ``sliding_window_inference`` (whole input and output in memory), ``np.save``;
- atlasbuilder: ``iter_blocks`` reads the TIFF region by region and blends tile-row by tile-row;
  finished rows are written to the ``.npy`` as they come. By default it runs an ``nn.Module`` in
  channels-last layout (``--no-channels-last`` compares without).

Checks the two outputs agree (max abs difference), then prints the throughput ratio (best of
``--repeats`` alternating runs per side: the machine's noise is one-sided) and the peak-memory ratio
(VmHWM of each process, whole and above its resident set just before the timed part, i.e. after all
imports and building the network; once with the default allocator and once with a fixed glibc mmap
threshold, where the peak follows the live data). For reference it also runs ``predict_file``
(labels + uint8 probabilities into zarr), the path the pipeline uses.

MONAI is a peer for this comparison only, not a dependency; install it without touching torch::

    pip install --no-deps monai

Usage::

    python benchmarks/bench_sliding_window.py [--size 4096] [--roi 256] [--overlap 0.25]
        [--classes 8] [--width 8] [--depth 4] [--batch 4] [--threads 1] [--repeats 3]
        [--no-channels-last]

Set BENCH_VERBOSE=1 to print every run's raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    """Peak resident set of this process (VmHWM). Not ``ru_maxrss``: on Linux that survives exec and
    so reports at least the parent's size at fork."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def make_section(path: Path, size: int, seed: int = 0) -> None:
    """A smooth, textured uint8 section with a background, written as a tiled zlib TIFF."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    tissue = ((yy - 0.5) ** 2 / 0.16 + (xx - 0.5) ** 2 / 0.2) < 1
    texture = 0.5 + 0.25 * np.sin(40 * yy + 9 * np.sin(7 * xx)) * np.cos(31 * xx)
    img = np.where(tissue, texture, 0.92) + rng.normal(0, 0.04, (size, size)).astype(np.float32)
    tifffile.imwrite(path, np.clip(img * 255, 0, 255).astype(np.uint8), tile=(512, 512),
                     compression="zlib")


def build_net(args: argparse.Namespace):  # torch is imported lazily: no return annotation
    """The benchmarked network: scale the raw uint8 values, then the atlasbuilder U-Net."""
    import torch

    from atlasbuilder.segmentation.networks import UNet

    class Scale(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - 128.0) / 64.0

    torch.manual_seed(0)
    net = UNet(1, args.classes, depth=args.depth, width=args.width, norm="batch")
    return torch.nn.Sequential(Scale(), net).eval()


def child(args: argparse.Namespace) -> None:
    """One side, in a fresh process; prints its timings and memory as JSON."""
    import tifffile
    import torch
    import zarr  # noqa: F401 - imported before the base is measured, like MONAI on its side

    from atlasbuilder.segmentation.prediction import SlidingWindow, iter_blocks, open_section, predict_file

    if args.child == "monai":
        from monai.inferers import sliding_window_inference

    torch.set_num_threads(args.threads)
    net = build_net(args)
    net.load_state_dict(torch.load(args.weights, weights_only=True))
    tif, out = Path(args.input), Path(args.output)
    base = rss_mb()
    result: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    if args.child == "monai":
        x = torch.from_numpy(tifffile.imread(tif)).float()[None, None]
        with torch.no_grad():
            y = sliding_window_inference(x, (args.roi, args.roi), args.batch, net, overlap=args.overlap,
                                         mode="gaussian", sigma_scale=0.125, padding_mode="constant")
        result["infer_s"] = time.perf_counter() - t0
        np.save(out, y[0].numpy())
    elif args.child == "engine":
        win = SlidingWindow(roi_size=args.roi, overlap=args.overlap, mode="gaussian", sigma_scale=0.125,
                            batch_size=args.batch, padding_mode="constant")
        with open_section(tif) as section, open(out, "wb") as fh:
            _, h, w = section.shape
            np.lib.format.write_array_header_1_0(
                fh, {"descr": "<f4", "fortran_order": False, "shape": (args.classes, h, w)})
            start = fh.tell()
            for blk in iter_blocks(section, net, window=win, channels_last=args.channels_last):
                scores = blk.scores.numpy()
                full_rows = blk.x0 == 0 and blk.x1 == w  # one write per class, else one per row
                for k in range(scores.shape[0]):
                    for r in [0] if full_rows else range(scores.shape[1]):
                        fh.seek(start + 4 * ((k * h + blk.y0 + r) * w + blk.x0))
                        fh.write(scores[k] if full_rows else scores[k, r])
            fh.truncate(start + 4 * args.classes * h * w)
        result["infer_s"] = time.perf_counter() - t0
    else:
        win = SlidingWindow(roi_size=args.roi, overlap=args.overlap, batch_size=args.batch)
        predict_file(tif, out, net, classes=[f"c{k}" for k in range(args.classes)], window=win,
                     channels_last=args.channels_last, overwrite=True)
        result["infer_s"] = time.perf_counter() - t0
    result["total_s"] = time.perf_counter() - t0
    result["cpu_s"] = time.process_time() - c0
    result["base_mb"] = base
    result["peak_mb"] = peak_mb()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["minflt"], result["user_s"], result["sys_s"] = usage.ru_minflt, usage.ru_utime, usage.ru_stime
    print(json.dumps(result))


def run_child(kind: str, args: argparse.Namespace, tif: Path, weights: Path, out: Path,
              env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--input", str(tif), "--weights", str(weights),
           "--output", str(out)]
    for name in ("size", "roi", "overlap", "classes", "width", "depth", "batch", "threads"):
        cmd += [f"--{name}", str(getattr(args, name))]
    cmd.append("--channels-last" if args.channels_last else "--no-channels-last")
    res = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env})
    if os.environ.get("BENCH_VERBOSE"):
        print(kind, res.stdout.strip().splitlines()[-1])
    return json.loads(res.stdout.strip().splitlines()[-1])


def max_abs_diff(a_path: Path, b_path: Path) -> float:
    a, b = np.load(a_path, mmap_mode="r"), np.load(b_path, mmap_mode="r")
    if a.shape != b.shape:
        raise SystemExit(f"shapes differ: {a.shape} vs {b.shape}")
    return max(float(np.abs(a[k] - b[k]).max()) for k in range(a.shape[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--roi", type=int, default=256)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; best is kept")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="atlasbuilder's default: run the network in channels-last layout")
    ap.add_argument("--child", choices=["monai", "engine", "file"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    try:
        import monai
    except ImportError:
        raise SystemExit("MONAI is the peer of this benchmark: pip install --no-deps monai") from None

    import torch

    with tempfile.TemporaryDirectory(prefix="bench_sw_") as tmp_:
        tmp = Path(tmp_)
        tif, weights = tmp / "section.tif", tmp / "weights.pt"
        make_section(tif, args.size)
        torch.save(build_net(args).state_dict(), weights)
        print(f"section {args.size} x {args.size} uint8 (tiled zlib TIFF), U-Net width {args.width} "
              f"depth {args.depth}, {args.classes} classes, roi {args.roi}, overlap {args.overlap}, "
              f"gaussian, batch {args.batch}, {args.threads} thread(s), torch {torch.__version__}, "
              f"monai {monai.__version__}; atlasbuilder runs the network "
              f"{'channels-last (its default)' if args.channels_last else 'in the default layout'}")
        runs: dict[str, list[dict]] = {"monai": [], "engine": []}
        for _ in range(args.repeats):
            runs["monai"].append(run_child("monai", args, tif, weights, tmp / "monai.npy"))
            runs["engine"].append(run_child("engine", args, tif, weights, tmp / "engine.npy"))
        diff = max_abs_diff(tmp / "monai.npy", tmp / "engine.npy")
        f = run_child("file", args, tif, weights, tmp / "pred")
        # glibc keeps freed memory (and the network's transient workspaces) resident in ways that vary
        # from run to run; with a fixed mmap threshold, large buffers go back to the system when freed
        # and the peak RSS follows the live data. Same setting for both sides.
        live = {"MALLOC_MMAP_THRESHOLD_": "131072"}
        mem = {k: run_child(k, args, tif, weights, tmp / f"{k}-mem.npy", env=live)
               for k in ("monai", "engine")}
    m = min(runs["monai"], key=lambda r: r["total_s"])
    e = min(runs["engine"], key=lambda r: r["total_s"])
    mpx = args.size**2 / 1e6
    times = {k: ", ".join(f"{r['total_s']:.1f}" for r in v) for k, v in runs.items()}
    print(f"time: best of {args.repeats} alternating runs per side (all: MONAI {times['monai']} s; "
          f"atlasbuilder {times['engine']} s)")
    print(f"{'':32s}{'time s':>8s}{'Mpx/s':>8s}{'peak RSS MB':>13s}{'- base':>8s}"
          f"{'live peak MB':>14s}{'- base':>8s}")
    for name, r, lm in (("MONAI sliding_window_inference", m, mem["monai"]),
                        ("atlasbuilder iter_blocks", e, mem["engine"]),
                        ("atlasbuilder predict_file", f, None)):
        live_cols = f"{lm['peak_mb']:14.0f}{lm['peak_mb'] - lm['base_mb']:8.0f}" if lm else ""
        print(f"{name:32s}{r['total_s']:8.2f}{mpx / r['total_s']:8.3f}{r['peak_mb']:13.0f}"
              f"{r['peak_mb'] - r['base_mb']:8.0f}{live_cols}")
    print("(base: resident set after importing torch and building the network, before the timed part; "
          "live: MALLOC_MMAP_THRESHOLD_=131072 for both sides, so freed buffers leave the resident set)")
    print(f"max |atlasbuilder - MONAI| = {diff:.3g} (target <= 1e-5)")
    print(f"throughput ratio atlasbuilder / MONAI = {m['total_s'] / e['total_s']:.3f} (target >= 1.0)")

    def ratio(a: dict, b: dict, above_base: bool) -> float:
        return (a["peak_mb"] - a["base_mb"] * above_base) / (b["peak_mb"] - b["base_mb"] * above_base)

    lm, le = mem["monai"], mem["engine"]
    print(f"peak RSS ratio atlasbuilder / MONAI (target <= 0.5): default allocator {ratio(e, m, False):.3f} "
          f"(above base {ratio(e, m, True):.3f}); live {ratio(le, lm, False):.3f} "
          f"(above base {ratio(le, lm, True):.3f})")


if __name__ == "__main__":
    main()
