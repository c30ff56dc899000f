"""Overhead of :func:`atlasbuilder.registration.register` over a direct ``ants.registration`` call.

Both run in this process, single-threaded, with exactly the same antsRegistration parameters
(:func:`atlasbuilder.registration.ants_arguments`), alternating, on the same pair: the 2009c
template at ``--resolution`` mm (fixed) and the same template moved by a known affine and a
smooth warp (moving). The direct call gets its input files already written (its timing is the
ANTs call alone); ``register`` pays for checking and writing the inputs, the atomic output
directory, ``transform.json`` and loading the result. Prints each wall time and CPU time (this
process, all threads) and the ratios of the medians (target <= 1.05); on a shared machine
these swing by tens of percent between runs, so it also prints, from each ``register`` call, the
time spent outside its own ANTs call (same run, so free of that noise).

Run::

    nice python benchmarks/bench_registration_overhead.py [--preset synquick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_pair(resolution: float):
    from scipy import ndimage

    from atlasbuilder.spaces import get_space
    from atlasbuilder.volumes import Grid, from_array, grid_of

    t = get_space("MNI152NLin2009cAsym").load_template()
    g = grid_of(t)
    arr = ndimage.zoom(t["template"].values, 1.0 / resolution, order=1).astype(np.float32)
    gr = Grid(arr.shape, g.origin, (resolution,) * 3)
    x = np.stack(np.meshgrid(*gr.coords().values(), indexing="ij"), -1)
    a = np.array([[1.06, 0.03, 0.0], [-0.03, 0.95, 0.02], [0.0, -0.02, 1.02]])
    y = x @ a.T + np.array([4.0, -6.0, 3.0]) + 4.0 * np.sin(x / 25.0)
    mov = ndimage.map_coordinates(arr, np.moveaxis((y - np.asarray(gr.origin)) / resolution, -1, 0), order=1)
    return (from_array(mov.astype(np.float32), gr, "subject:bench", name="image"),
            from_array(arr, gr, "MNI152NLin2009cAsym", name="image"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="synquick")
    ap.add_argument("--resolution", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import nibabel as nib

    from atlasbuilder import registration as R
    from atlasbuilder.volumes import to_nifti

    ants = R._import_ants(1)  # one ITK thread for both (the first import fixes the pool size)
    moving, fixed = make_pair(args.resolution)
    params = R._parameters(args.preset, None)  # the images are already at the resolution
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    f_path, m_path = work / "fixed.nii.gz", work / "moving.nii.gz"
    nib.save(to_nifti(fixed), f_path)
    nib.save(to_nifti(moving), m_path)
    ours, direct, ours_cpu, direct_cpu, added, inner = [], [], [], [], [], []
    for i in range(args.repeats):
        for which in (("direct", "ours") if i % 2 == 0 else ("ours", "direct")):
            out = work / f"{which}{i}"
            t0, c0 = time.perf_counter(), time.process_time()
            if which == "ours":
                tr = R.register(moving, fixed, out, preset=params, threads=1, seed=0,
                                source_space="subject:bench", target_space="MNI152NLin2009cAsym")
                ours.append(time.perf_counter() - t0)
                # the same call's own ANTs time: what the wrapper adds, free of run-to-run noise
                added.append(ours[-1] - tr.info["timing"]["ants_seconds"])
                inner.append(tr.info["timing"]["ants_seconds"])
                ours_cpu.append(time.process_time() - c0)
            else:
                out.mkdir()
                a = R.ants_arguments(str(f_path), str(m_path), str(out) + "/", params, seed=0)
                ants.registration(fixed=a, moving=None)
                direct.append(time.perf_counter() - t0)
                direct_cpu.append(time.process_time() - c0)
            shutil.rmtree(out)
            w, c = (ours, ours_cpu) if which == "ours" else (direct, direct_cpu)
            print(f"{which:6s} run {i}: wall {w[-1]:.2f} s, CPU {c[-1]:.2f} s", flush=True)
    mo, md = statistics.median(ours), statistics.median(direct)
    print(f"preset {args.preset} at {args.resolution} mm, shape {fixed['image'].shape}, 1 thread")
    print(f"median wall: register {mo:.2f} s, direct ants.registration {md:.2f} s, ratio {mo / md:.3f}")
    co, cd = statistics.median(ours_cpu), statistics.median(direct_cpu)
    print(f"median CPU:  register {co:.2f} s, direct ants.registration {cd:.2f} s, ratio {co / cd:.3f}")
    print(f"within each register call: {statistics.median(added):.3f} s around "
          f"{statistics.median(inner):.2f} s of ANTs, ratio "
          f"{statistics.median([(a + i) / i for a, i in zip(added, inner, strict=True)]):.4f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
