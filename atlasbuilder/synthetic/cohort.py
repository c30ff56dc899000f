"""The demo cohort: synthetic brains cut into stained sections, written like real data, with truth.

``generate_cohort(out_dir, ...)`` writes::

    manifest.yaml                 a real-data manifest (subjects, sections, annotations): the build
                                  reads it exactly as it reads real data
    sections/<id>/<id>_s<NNNN>.tif    cell-body-stained sections (uint8, pixel size in the tags)
    annotations/<id>/<id>_s<NNNN>.png expert label images of a few sections per brain
    blockface/<id>.nii.gz         each brain's blockface volume (its own space; ``reference:``)
    reference/                    the reference brain that defines the demo's BigBrain space:
        bigbrain_template.nii.gz  its 1 mm anatomy (the BigBrain template of the demo)
        blockface.nii.gz          its blockface volume (frames its sections in BigBrain space)
        sections/...              its finer sections (the microscopic scale)
    truth/                        kept apart: never read by the build (see truth/README.md)
    contact_sheet.png             (optional) a few sections with annotation contours

Population model and histology live in :mod:`.population` and :mod:`.histology`; this module
cuts, renders, writes and records the truth.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..storage import atomic_directory, atomic_write_text
from .sections import SectionGeometry, cut_plane, write_png, write_tiff

log = logging.getLogger("atlasbuilder")

__all__ = ["COHORT_FORMAT", "CohortSettings", "generate_cohort"]

COHORT_FORMAT = 4
TARGET = "MNI152NLin2009cAsym"
BIGBRAIN = "BigBrain"


@dataclass(frozen=True)
class CohortSettings:
    """What the generator makes. ``quick()`` gives the small, fast variant."""

    subjects: int = 10
    seed: int = 0
    areas: tuple[str, ...] = ("hOc1", "hOc2", "hOc3v", "hOc4v", "hOc5")
    pixel_size_mm: float = 0.2
    section_spacing_mm: float = 2.0
    thickness_um: float = 20.0
    annotated_sections: int = 2
    reference_brain: bool = True
    reference_pixel_size_mm: float = 0.15
    reference_spacing_mm: float = 1.5
    anterior_margin_mm: float = 6.0
    missing_fraction: float = 0.04
    torn_fraction: float = 0.04
    cortex_thickening_mm: int = 2
    blockface_pixel_size_mm: float = 0.5
    section_truth: bool = True
    #: How the FSL template is registered to the target template to place the Juelich maps (a
    #: preset of :data:`.population.REGISTRATION_PRESETS`): ``default`` (2 mm, ~30 s of
    #: single-threaded ANTs, brain-mask Dice 0.973), ``fast`` for quick cohorts (4 mm, ~4 s, 0.969).
    #: Either way the cohort's truth is the maps as placed, so every figure stays self-consistent.
    population_registration: str = "default"
    workers: int = 2

    def quick(self) -> CohortSettings:
        return replace(self, subjects=min(self.subjects, 3), section_spacing_mm=3.0,
                       reference_spacing_mm=3.0, reference_pixel_size_mm=0.2,
                       population_registration="fast")

    def cache_key(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("workers")
        d["format"] = COHORT_FORMAT
        return d


# ---------------------------------------------------------------------------------------------
# one brain


def demo_population(settings: CohortSettings, cache_dir: Path | None, progress: bool) -> Any:
    """The population with its cortex thickened into the white matter.

    The 1 mm template's cortex is 2-3 voxels thick; at the demo's 0.2 mm pixels its six layers
    would be 1-3 px. Thickening the grey matter by ``cortex_thickening_mm`` into the white matter
    (a phantom, done once in the target space so that every truth stays consistent) makes each
    laminar signature several pixels thick.
    """
    from scipy import ndimage

    from . import population as pop

    base = pop.prepare_population(settings.areas, registration=settings.population_registration,
                                  cache_dir=cache_dir, progress=progress)
    if settings.cortex_thickening_mm <= 0:
        return base
    t = base.tissue["tissue"].values.copy()
    gm = t == pop.GREY_MATTER
    near = ndimage.binary_dilation(gm, iterations=int(settings.cortex_thickening_mm))
    t[near & (t == pop.WHITE_MATTER)] = pop.GREY_MATTER
    tissue = base.tissue.copy()
    tissue["tissue"].values[...] = t
    mask = pop.grey_matter_mask(tissue, dilation=1)
    layout = pop.AreaLayoutModel.from_maps(base.maps, mask)  # the population default smoothness
    return replace(base, tissue=tissue, mask=mask, layout=layout)


def _stack_geometry(tissue: np.ndarray, labels: np.ndarray, affine: np.ndarray, spacing_mm: float,
                    px: float, margin_mm: float) -> tuple[np.ndarray, SectionGeometry]:
    """Section planes (y, mm) covering the mapped areas, and the common in-plane frame."""
    area_vox = np.argwhere(labels > 0)
    if area_vox.size == 0:
        raise InputError("the synthetic brain has no mapped area voxels")
    brain = np.argwhere(tissue > 0)
    ymm = lambda j: affine[1, 3] + affine[1, 1] * j  # noqa: E731
    y_lo = ymm(brain[:, 1].min())  # posterior end of the brain
    y_hi = ymm(area_vox[:, 1].max()) + margin_mm
    ys = np.arange(y_lo + spacing_mm / 2, y_hi, spacing_mm)
    # in-plane frame: the tissue in the stack's slab, plus a 4 mm margin
    sel = brain[(ymm(brain[:, 1]) >= y_lo) & (ymm(brain[:, 1]) <= y_hi)]
    x_lo = affine[0, 3] + affine[0, 0] * sel[:, 0].min() - 4
    x_hi = affine[0, 3] + affine[0, 0] * sel[:, 0].max() + 4
    z_lo = affine[2, 3] + affine[2, 2] * sel[:, 2].min() - 4
    z_hi = affine[2, 3] + affine[2, 2] * sel[:, 2].max() + 4
    shape = (math.ceil((z_hi - z_lo) / px) + 1, math.ceil((x_hi - x_lo) / px) + 1)
    return ys, SectionGeometry(x0=float(x_lo), z0=float(z_hi), pixel_size_mm=px, shape=shape)


def _annotated_indices(present: np.ndarray, n: int) -> list[int]:
    """``n`` sections far apart (evenly spread over the middle of the stack), never missing/torn."""
    idx = np.flatnonzero(present)
    if len(idx) < n:
        raise InputError(f"only {len(idx)} intact sections for {n} annotations")
    targets = np.linspace(0, len(idx) - 1, n + 2)[1:-1]
    chosen: list[int] = []
    for t in targets:
        order = np.argsort(np.abs(np.arange(len(idx)) - t), kind="stable")
        chosen.append(int(next(idx[o] for o in order if idx[o] not in chosen)))
    return sorted(chosen)


def _make_brain(job: dict[str, Any]) -> dict[str, Any]:
    """Generate, cut, render and write one brain (runs in a worker process)."""
    from ..volumes import to_nifti
    from . import histology as H

    settings: CohortSettings = job["settings"]
    population = job["population"]
    out: Path = job["out"]
    sid: str = job["id"]
    seed: int = job["seed"]
    px, spacing = job["pixel_size_mm"], job["spacing_mm"]
    # areas in grey matter only: the sections show them there, so the 3-D truth must agree
    ind = population.sample_individual(seed, subject_id=sid, grey_matter_only=True)
    tissue = ind.tissue["tissue"].values
    labels = ind.labels["labels"].values
    affine = _affine(ind.labels)
    ys, geom = _stack_geometry(tissue, labels, affine, spacing, px, settings.anterior_margin_mm)
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, seed, 7]))
    missing, torn = H.section_defects(len(ys), rng, missing=settings.missing_fraction,
                                      torn=settings.torn_fraction)
    annotated = _annotated_indices(~missing & ~torn, job["annotated"]) if job["annotated"] else []
    keys_by_label = {int(k): v.rsplit("_", 1)[0] for k, v in ind.regions.items()}
    profiles = H.profiles_for(sorted(set(keys_by_label.values())), seed=settings.seed)
    step = max(1, round(spacing * 1000 / settings.thickness_um))
    sec_dir = out / job["sections_dir"] / sid
    ann_dir = out / "annotations" / sid
    placements = []
    numbers = []
    for k, y in enumerate(ys):
        number = 1 + k * step
        numbers.append(number)
        name = f"{sid}_s{number:04d}"
        rec: dict[str, Any] = {"number": number, "y_mm": float(y), "missing": bool(missing[k]),
                               "torn": bool(torn[k])}
        if missing[k]:
            placements.append(rec)
            continue
        t2 = cut_plane(tissue, affine, geom, float(y))
        a2 = cut_plane(labels, affine, geom, float(y))
        srng = np.random.default_rng(np.random.SeedSequence([settings.seed, seed, number]))
        img = H.render_section(t2, a2, profiles, keys_by_label, px, srng, label_voxel_mm=1.0)
        # the annotation is the smoothed labels the image was rendered from, moved with the image;
        # only annotated sections need it (smoothing costs as much as rendering)
        # (the tissue goes along too: a tear is placed through tissue)
        # (the true labels of every section are kept in truth/ to score a segmentation with)
        moved: list[np.ndarray] = [t2]
        if k in annotated or job["section_truth"]:
            moved.append(H.smooth_labels(t2, a2, px, label_voxel_mm=1.0)[1].astype(np.uint16))
        img, moved_out, tf = H.apply_artefacts(img, moved, px, srng,
                                                position=k / max(1, len(ys) - 1), tear=bool(torn[k]))
        write_tiff(sec_dir / f"{name}.tif", img, px, section=number, subject=sid)
        if len(moved_out) > 1:
            ann = moved_out[1]
            ann = ann.astype(np.uint16 if ann.max() > 255 else np.uint8)
            if k in annotated:
                write_png(ann_dir / f"{name}.png", ann, px)
            if job["section_truth"]:
                write_png(out / "truth" / "subjects" / sid / "sections" / f"{name}.png", ann, px)
        rec.update({"rotation_deg": tf.rotation_deg, "shift_px": list(tf.shift_px),
                    "distortion_spacing_px": tf.spacing_px, "stain_gain": tf.stain_gain,
                    "annotated": k in annotated})
        ddir = out / "truth" / "subjects" / sid / "distortions"
        ddir.mkdir(parents=True, exist_ok=True)
        np.save(ddir / f"{name}.npy", tf.control_px.astype(np.float32))
        placements.append(rec)
    # truth: labels and tissue in subject and target space, transform fields, placements
    tdir = out / "truth" / "subjects" / sid
    tdir.mkdir(parents=True, exist_ok=True)
    _save_nifti(to_nifti(ind.labels, "labels"), tdir / "labels_subject.nii.gz")
    _save_nifti(to_nifti(ind.labels_target, "labels"), tdir / f"labels_{TARGET}.nii.gz")
    tds = ind.transform.to_dataset()
    # float16 keeps the fields to ~0.01 mm (far below any registration error) at half the size
    np.savez_compressed(tdir / "transform.npz", displacement=tds["displacement"].values.astype(np.float16),
                        inverse_displacement=tds["inverse_displacement"].values.astype(np.float16),
                        affine=ind.transform.affine, origin=np.asarray(ind.transform.grid.origin),
                        spacing=np.asarray(ind.transform.grid.spacing))
    atomic_write_text(tdir / "sections.json", json.dumps({
        "subject": sid, "plane": "coronal", "geometry": geom.to_dict(), "sections": placements,
        "transform": {k: v for k, v in tds.attrs.items() if k != "space"},
        "convention": "clean pixel (row, col) -> subject mm: x = x0 + col*px, z = z0 - row*px, "
                      "y = y_mm; the stored image shows the clean section moved by the section's "
                      "rigid misplacement and B-spline distortion (distortions/<name>.npy)",
    }, indent=1))
    bf_path = out / job["blockface_out"]
    _save_nifti(_blockface(ind.anatomy, tissue, affine, ys[0], spacing, settings.blockface_pixel_size_mm),
                bf_path)
    anatomy_path = None
    if job.get("anatomy_out"):
        anatomy_path = out / job["anatomy_out"]
        anatomy_path.parent.mkdir(parents=True, exist_ok=True)
        _save_nifti(to_nifti(ind.anatomy, "image"), anatomy_path)
    return {"id": sid, "seed": seed, "numbers": numbers, "missing": [n for n, m in
            zip(numbers, missing, strict=True) if m],
            "annotated": [numbers[k] for k in annotated], "regions": ind.regions,
            "n_sections": int((~missing).sum()), "shape": list(geom.shape)}


def _blockface(anatomy: Any, tissue: np.ndarray, affine: np.ndarray, y_first: float, spacing_mm: float,
               px: float) -> Any:
    """The brain's blockface volume: one photograph of the block face per imaged section position.

    Slice ``k`` lies at ``y_first + k * spacing_mm`` (the plane of section number
    ``1 + k * spacing``) and covers the whole brain, so it continues anterior of the sectioned slab.
    The photographs are undistorted and in register (a fixed camera): the 3-D reference that
    sections are aligned to and that defines the brain's own space. Contrast is MRI-like (the
    individual's anatomy), with white matter bright.
    """
    import nibabel as nib

    img = np.asarray(next(iter(anatomy.data_vars.values())).values, dtype=np.float32)
    brain = np.argwhere(tissue > 0)
    lo = affine[:3, 3] + np.diag(affine)[:3] * brain.min(axis=0) - 4
    hi = affine[:3, 3] + np.diag(affine)[:3] * brain.max(axis=0) + 4
    ys = np.arange(y_first, hi[1], spacing_mm)
    geom = SectionGeometry(x0=float(lo[0]), z0=float(hi[2]), pixel_size_mm=px,
                           shape=(math.ceil((hi[2] - lo[2]) / px) + 1, math.ceil((hi[0] - lo[0]) / px) + 1))
    planes = [cut_plane(img, affine, geom, float(y), order=1) for y in ys]
    vol = np.stack(planes, axis=0)  # (y, row, col) with rows going down in z
    vol = np.transpose(vol[:, ::-1, :], (2, 0, 1))  # -> (x, y, z) with z increasing
    scale = 254.0 / max(float(np.percentile(vol[vol > 0], 99.5)), 1e-6) if (vol > 0).any() else 1.0
    data = np.clip(np.rint(vol * scale), 0, 255).astype(np.uint8)
    z_lo = geom.z0 - (geom.shape[0] - 1) * px
    aff = np.diag([px, spacing_mm, px, 1.0])
    aff[:3, 3] = [geom.x0, ys[0], z_lo]
    out = nib.Nifti1Image(data, aff)
    out.header.set_xyzt_units("mm")
    return out


def _affine(ds: Any) -> np.ndarray:
    from ..volumes import grid_of

    return grid_of(ds).affine


def _save_nifti(img: Any, path: Path) -> None:
    """Deterministic gzip (no timestamp in the header) written atomically."""
    from ..storage import atomic_write_bytes, nifti_gz_bytes

    atomic_write_bytes(path, nifti_gz_bytes(img))


# ---------------------------------------------------------------------------------------------
# the cohort


def generate_cohort(out_dir: str | Path, settings: CohortSettings | None = None, *,
                    cache_dir: str | Path | None = None, progress: bool = False,
                    contact_sheet: bool = False, force: bool = False) -> Path:
    """Generate the demo cohort into ``out_dir`` (atomically) and return its manifest path.

    Parameters
    ----------
    out_dir
        Directory to create (must not exist unless ``force``).
    settings
        What to generate (default :class:`CohortSettings`).
    cache_dir
        Where the one-off template registration is cached (default: the user cache).
    progress
        Show a progress bar over brains.
    contact_sheet
        Also write ``contact_sheet.png``: sections with their annotation contours.
    """
    from .population import TARGET_SPACE

    s = settings or CohortSettings()
    if s.subjects < 1:
        raise InputError(f"subjects must be >= 1, got {s.subjects}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force and (not out_dir.is_dir() or any(out_dir.iterdir())):
        from ..errors import OutputExistsError

        # say so before the minutes of work, not after (atomic_directory checks again at the end)
        raise OutputExistsError(f"output {out_dir} already exists and is not empty "
                                "(use --force to replace it)")
    t0 = time.perf_counter()
    pop = demo_population(s, Path(cache_dir) if cache_dir else None, progress)
    if pop.space != TARGET_SPACE:
        raise InputError(f"the demo cohort is generated in {TARGET_SPACE}, not {pop.space}")
    ids = [f"B{i + 1:02d}" for i in range(s.subjects)]
    seeds = [int(x) for x in np.random.SeedSequence(s.seed).generate_state(s.subjects + 1)]
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=force) as tmp:
        jobs = [{"settings": s, "population": pop, "out": tmp, "id": sid, "seed": seed,
                 "pixel_size_mm": s.pixel_size_mm, "spacing_mm": s.section_spacing_mm,
                 "annotated": s.annotated_sections, "sections_dir": "sections",
                 "section_truth": s.section_truth, "blockface_out": f"blockface/{sid}.nii.gz"}
                for sid, seed in zip(ids, seeds[:-1], strict=True)]
        if s.reference_brain:  # first: the largest job starts while the others queue
            jobs.insert(0, {"settings": s, "population": pop, "out": tmp, "id": "BigBrain",
                         "seed": seeds[-1], "pixel_size_mm": s.reference_pixel_size_mm,
                         "spacing_mm": s.reference_spacing_mm, "annotated": 0,
                         "sections_dir": "reference/sections", "section_truth": False,
                         "blockface_out": "reference/blockface.nii.gz",
                         "anatomy_out": "reference/bigbrain_template.nii.gz"})
        results = _run(jobs, s.workers, progress)
        brains = [r for r in results if r["id"] != "BigBrain"]
        ref = next((r for r in results if r["id"] == "BigBrain"), None)
        _write_truth_maps(tmp, pop, [b["id"] for b in brains], ref is not None, s.workers)
        _write_manifest(tmp, s, brains, ref)
        _write_truth_readme(tmp, s)
        if contact_sheet:
            write_contact_sheet(tmp, brains[0]["id"], tmp / "contact_sheet.png")
        atomic_write_text(tmp / "cohort.json", json.dumps(
            {"settings": s.cache_key(), "seconds": round(time.perf_counter() - t0, 1),
             "subjects": brains, "reference": ref}, indent=1, default=str))
    return out_dir / "manifest.yaml"


def _run(jobs: list[dict[str, Any]], workers: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="synthesizing brains", unit="brain", disable=not progress)
    results: list[dict[str, Any]] = []
    if workers <= 1 or len(jobs) == 1:
        for j in jobs:
            results.append(_make_brain(j))
            bar.update()
    else:
        import multiprocessing as mp

        # fork shares the prepared population with the workers without pickling it
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
            for r in ex.map(_make_brain, jobs):
                results.append(r)
                bar.update()
    bar.close()
    return results


def _write_truth_maps(out: Path, pop: Any, ids: Sequence[str], with_bigbrain: bool,
                      workers: int = 1) -> None:
    """True probability maps and MPMs of the cohort per reference space (one process per space
    when ``workers`` > 1)."""
    from ..volumes import grid_of

    tgrid = grid_of(pop.template)
    keys = {int(i): str(k) for i, k in zip(pop.layout.region_ids, pop.layout.region_keys, strict=True)}
    jobs = [(out, ids, space, tgrid, keys) for space in ([TARGET, BIGBRAIN] if with_bigbrain
                                                         else [TARGET])]
    if workers <= 1 or len(jobs) == 1:
        for j in jobs:
            _truth_space(j)
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("fork")) as ex:
        list(ex.map(_truth_space, jobs))


def _truth_space(job: tuple[Path, Sequence[str], str, Any, dict[int, str]]) -> None:
    """One space's true maps: each brain's target-space labels (seen in the reference brain's
    space for BigBrain), then the fraction of brains per area and the MPM."""
    import nibabel as nib

    from ..volumes import Grid

    out, ids, space, tgrid, keys = job
    labels = [np.asanyarray(_load(out / "truth" / "subjects" / i / f"labels_{TARGET}.nii.gz").dataobj)
              for i in ids]
    grid = tgrid
    if space == BIGBRAIN:
        ref_img: Any = nib.load(str(out / "truth" / "subjects" / "BigBrain" / "labels_subject.nii.gz"))
        aff = np.asarray(ref_img.affine)
        grid = Grid((int(ref_img.shape[0]), int(ref_img.shape[1]), int(ref_img.shape[2])),
                    (float(aff[0, 3]), float(aff[1, 3]), float(aff[2, 3])),
                    (float(aff[0, 0]), float(aff[1, 1]), float(aff[2, 2])))
        tr = np.load(out / "truth" / "subjects" / "BigBrain" / "transform.npz")
        pts = np.stack(np.meshgrid(*grid.coords().values(), indexing="ij"), -1).reshape(-1, 3)
        idx, inside = tgrid.nearest_voxel(_to_target(tr, pts))
        bb = []
        for i, lab in zip(ids, labels, strict=True):
            v = np.where(inside, lab[idx[:, 0], idx[:, 1], idx[:, 2]], 0)
            bb.append(v.reshape(grid.shape).astype(np.int16))
            _save_nifti(nib.Nifti1Image(bb[-1], grid.affine),
                        out / "truth" / "subjects" / i / f"labels_{BIGBRAIN}.nii.gz")
        labels = bb
    n = len(labels)
    stack = np.stack(labels)
    pdir = out / "truth" / "pmaps" / space
    pdir.mkdir(parents=True, exist_ok=True)
    probs = []
    for rid, key in keys.items():
        p = (stack == rid).sum(axis=0).astype(np.float32) / n
        probs.append(p)
        _save_nifti(nib.Nifti1Image(p, grid.affine), pdir / f"{key}.nii.gz")
    P = np.stack(probs)
    ids_arr = np.asarray(list(keys))
    mpm = np.where(P.max(axis=0) > 0, ids_arr[P.argmax(axis=0)], 0).astype(np.int16)
    mdir = out / "truth" / "mpm"
    mdir.mkdir(parents=True, exist_ok=True)
    _save_nifti(nib.Nifti1Image(mpm, grid.affine), mdir / f"{space}.nii.gz")
    atomic_write_text(mdir / f"{space}.tsv", "index\tkey\n" + "".join(
        f"{rid}\t{key}\n" for rid, key in keys.items()))


def _load(path: Path) -> Any:
    import nibabel as nib

    return nib.load(str(path))


def _to_target(tr: Any, pts: np.ndarray) -> np.ndarray:
    """Subject -> target points with a saved transform (see IndividualTransform.to_target)."""
    from scipy import ndimage

    aff = tr["affine"]
    y = pts @ aff[:3, :3].T + aff[:3, 3]
    f = (y - tr["origin"]) / tr["spacing"]
    disp = np.stack([ndimage.map_coordinates(tr["displacement"][c].astype(np.float32), f.T, order=1, mode="nearest")
                     for c in range(3)], axis=1)
    return y + disp


def _write_manifest(out: Path, s: CohortSettings, brains: list[dict[str, Any]],
                    ref: dict[str, Any] | None) -> None:
    import yaml

    subjects = []
    for b in brains:
        labels = {int(k): v for k, v in sorted(b["regions"].items())}
        subjects.append({
            "id": b["id"],
            "hemispheres": ["left", "right"],
            "sections": {"files": f"sections/{b['id']}/*.tif", "plane": "coronal",
                         "thickness_um": s.thickness_um, "pixel_size_um": s.pixel_size_mm * 1000,
                         "spacing": max(1, round(s.section_spacing_mm * 1000 / s.thickness_um)),
                         "missing": b["missing"]},
            "annotations": {"files": f"annotations/{b['id']}/*.png", "labels": labels},
            "reference": f"blockface/{b['id']}.nii.gz",
            "shrinkage": 1.0,
        })
    spaces: dict[str, Any] = {"reference": [TARGET, BIGBRAIN] if ref else [TARGET]}
    if ref:
        spaces["templates"] = {BIGBRAIN: "reference/bigbrain_template.nii.gz"}
        spaces["sections"] = {BIGBRAIN: {
            "files": "reference/sections/BigBrain/*.tif", "plane": "coronal",
            "thickness_um": s.thickness_um, "pixel_size_um": s.reference_pixel_size_mm * 1000,
            "spacing": max(1, round(s.reference_spacing_mm * 1000 / s.thickness_um)),
            "missing": ref["missing"], "reference": "reference/blockface.nii.gz"}}
    manifest = {
        "format_version": 1,
        "atlas": {"name": "demo-visual-atlas", "version": "0.1",
                  "description": f"Synthetic demo cohort of {len(brains)} brains (seed {s.seed})"},
        "hierarchy": "juelich",
        "areas": list(s.areas),
        "spaces": spaces,
        "seed": s.seed,
        "subjects": subjects,
    }
    header = ("# Generated by `atlasbuilder synth`: the demo cohort, written like real data.\n"
              "# The truth to score a build against is in truth/ (never read by the build).\n")
    atomic_write_text(out / "manifest.yaml", header + yaml.safe_dump(manifest, sort_keys=False))


def _write_truth_readme(out: Path, s: CohortSettings) -> None:
    atomic_write_text(out / "truth" / "README.md", f"""# Truth of the synthetic demo cohort

Generated with seed {s.seed}; never read by `atlasbuilder build`. Use it to score a build.

| file | what it holds |
| --- | --- |
| `pmaps/<space>/<region-key>.nii.gz` | the cohort's true probability map of each hemisphere area (fraction of brains, float32) in `{TARGET}` and `{BIGBRAIN}` |
| `mpm/<space>.nii.gz`, `mpm/<space>.tsv` | the true maximum probability map (region id per voxel, 0 none; ties to the lower id) and its label table (columns index, key) |
| `subjects/<id>/labels_subject.nii.gz` | the brain's true 3-D area labels (region ids) in its own space (`subject:<id>`, 1 mm), on its grey-matter voxels only, as the sections show them |
| `subjects/<id>/labels_{TARGET}.nii.gz` | the same labels in the target space (exact: the layout was drawn there) |
| `subjects/<id>/labels_{BIGBRAIN}.nii.gz` | the same labels in the demo's BigBrain space (the reference brain's own space) |
| `subjects/<id>/transform.npz` | the true point maps: `to_target(x) = y + displacement(y)` with `y = affine @ x` (subject mm -> target mm), `to_subject(t) = inv(affine) @ (t + inverse_displacement(t))`; fields (component, x, y, z; float16) in mm on the grid `origin` + `spacing` * index. Images move the other way. |
| `subjects/<id>/sections.json` | where each section lies: plane `y_mm`, the in-plane frame (`x0_mm`, `z0_mm`, pixel size: clean pixel (row, col) is at x = x0 + col*px, z = z0 - row*px), its rigid misplacement (`rotation_deg` about the image centre, `shift_px` (row, col)), stain gain, missing/torn flags, which sections are annotated |
| `subjects/<id>/distortions/<section>.npy` | the B-spline control displacements (pixels) of each section's nonlinear distortion |
| `subjects/<id>/sections/<section>.png` | the true area labels (region ids) of every present section, in the stored (misplaced, distorted) image's pixels: what a perfect segmentation returns |

Each brain's `blockface/<id>.nii.gz` (named by the manifest's `reference`) is in the brain's own
space, the frame of `labels_subject.nii.gz`: slice k is the undistorted block face photographed
before cutting section number 1 + k*spacing (y = y of slice 0 + k*spacing*thickness), covering the
whole brain at {s.blockface_pixel_size_mm} mm in-plane.

The reference brain (`subjects/BigBrain`) defines the demo's BigBrain space: its 1 mm anatomy is
`reference/bigbrain_template.nii.gz` and its finer sections are under `reference/sections/`.
Cortex was thickened by {s.cortex_thickening_mm} mm into the white matter (a phantom) so the six
layers are several pixels thick at {s.pixel_size_mm} mm pixels.
""")


def write_contact_sheet(out: Path, sid: str, path: Path, n: int = 6) -> None:
    """A PNG of ``n`` sections of one brain, annotated ones with their label contours."""
    import tifffile
    from PIL import Image

    from .histology import contact_sheet

    files = sorted((out / "sections" / sid).glob("*.tif"))
    ann = {p.stem: p for p in (out / "annotations" / sid).glob("*.png")}
    picks = [f for f in files if f.stem in ann]
    rest = [f for f in files if f.stem not in ann]
    picks += [rest[i] for i in np.linspace(0, len(rest) - 1, max(0, n - len(picks))).astype(int)]
    picks = sorted(picks)[:n]
    images = [tifffile.imread(p) for p in picks]
    labels = [np.asarray(Image.open(ann[p.stem])) if p.stem in ann else np.zeros_like(im, np.uint8)
              for p, im in zip(picks, images, strict=True)]
    contact_sheet(images, labels, path)


def cached_cohort(settings: CohortSettings, *, cache_dir: str | Path | None = None,
                  progress: bool = False) -> tuple[Path, bool]:
    """The demo cohort for ``settings``, generated once and cached.

    Returns the cohort's manifest and whether it came from the cache. The cache entry is keyed by
    a hash of the settings and this generator's format; an interrupted generation leaves no entry
    (it is written atomically) and is simply redone.
    """
    import hashlib

    from .population import default_cache_dir

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha256(json.dumps(settings.cache_key(), sort_keys=True).encode()).hexdigest()[:16]
    out = root / "cohorts" / f"demo-{key}"
    manifest = out / "manifest.yaml"
    if manifest.is_file() and (out / "cohort.json").is_file():
        return manifest, True
    generate_cohort(out, settings, cache_dir=root, progress=progress, force=out.exists())
    return manifest, False
