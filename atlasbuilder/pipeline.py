"""``atlasbuilder build``: the one place that knows the order of the stages.

A build validates the manifest, takes a lock on the output directory, runs each stage that this
version of atlasbuilder provides, and writes the atlas directory (see :mod:`atlasbuilder.atlas`).
Stages never import one another; they exchange plain objects and files through this module.

Stages, in order (see ``STAGES``)::

    synthesize      generate the demo cohort (synthetic manifests only)
    segmentation    CNN: train on annotated sections, map every section
    reconstruction  sections -> 3-D labels in each brain's own space
    registration    each brain -> the reference spaces (ANTs)
    aggregation     probability maps, maximum probability map, statistics
    exports         NIfTI bundle, siibra configuration, report

A stage that this version does not provide yet is reported as ``pending`` in the summary and in
``provenance.json``; the atlas directory is still written (hierarchy, spaces, provenance), so
everything downstream of the build can be developed against it.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AtlasBuilderError, OutputExistsError, StageError

log = logging.getLogger("atlasbuilder")

__all__ = ["STAGES", "StageResult", "build"]


@dataclass
class StageResult:
    """What one stage did: ``status`` is ``done``, ``skipped`` or ``pending``."""

    name: str
    status: str
    seconds: float = 0.0
    items: int = 0
    note: str = ""


@dataclass
class BuildContext:
    """What stages read and write: the manifest, the output directory, and their products."""

    manifest: Any
    output: Path
    progress: bool = True
    products: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    run: Callable[[BuildContext], StageResult] | None  # None: not provided by this version
    applies: Callable[[Any], bool] = lambda manifest: True


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
    ctx.products["data_manifest"] = load_manifest(path)
    ctx.products["cohort_dir"] = path.parent
    note = f"{'cached' if hit else 'generated'}: {path.parent}"
    return StageResult("synthesize", "done", items=settings.subjects, note=note)


STAGES: tuple[Stage, ...] = (
    Stage("synthesize", "generate the demo cohort", _synthesize, lambda m: m.is_synthetic),
    Stage("segmentation", "map areas in every section (CNN)", None),
    Stage("reconstruction", "stack sections into 3-D per brain", None),
    Stage("registration", "register brains to the reference spaces (ANTs)", None),
    Stage("aggregation", "probability maps, MPM and statistics", None),
    Stage("exports", "NIfTI bundle, siibra configuration, report", None),
)


def _is_build_directory(path: Path) -> bool:
    """True when ``path`` holds the output of an earlier build (which a build may update)."""
    prov = path / "provenance.json"
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
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build an atlas from a manifest into an atlas directory.

    Parameters
    ----------
    manifest
        Manifest file, or the name of a built-in one (``"demo"``).
    output
        Atlas directory (default: ``./<atlas name>``). An earlier build's directory is updated
        in place; any other non-empty directory is refused unless ``force``.
    quick
        Use the manifest's quick settings (small cohort, fast stages).
    force
        Write into a non-empty directory that is not an earlier build's output.
    progress
        Show progress and the summary table on stderr.

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
        A stage failed (the message names the stage, brain and section).
    """
    from . import __version__
    from .manifest import BUILTIN_MANIFESTS, builtin_manifest_path, load_manifest
    from .storage import directory_lock, sha256_file

    t_start = time.perf_counter()
    mpath = Path(manifest)
    if not mpath.exists() and str(manifest) in BUILTIN_MANIFESTS:
        mpath = builtin_manifest_path(str(manifest))
    m = load_manifest(mpath)
    if quick:
        m = m.quick()
    out = Path(output) if output is not None else Path.cwd() / m.atlas.name
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory")
    if (out.exists() and any(p.name != ".lock" for p in out.iterdir())
            and not _is_build_directory(out) and not force):
        raise OutputExistsError(
            f"output {out} is not empty and is not an atlasbuilder build directory "
            "(use --force to write into it anyway)"
        )
    tree = m.load_hierarchy()
    results: list[StageResult] = []
    with directory_lock(out):
        log.info("building %s %s from %s%s into %s", m.atlas.name, m.atlas.version, mpath,
                 " (quick)" if quick else "", out)
        ctx = BuildContext(manifest=m, output=out, progress=progress)
        for stage in STAGES:
            if not stage.applies(m):
                results.append(StageResult(stage.name, "skipped", note="not needed"))
                continue
            if stage.run is None:
                results.append(StageResult(
                    stage.name, "pending",
                    note=f"not provided by atlasbuilder {__version__} yet"))
                log.debug("stage %-15s pending: %s is not provided by atlasbuilder %s yet",
                            stage.name, stage.description, __version__)
                continue
            t0 = time.perf_counter()
            log.info("stage %s: %s", stage.name, stage.description)
            try:
                res = stage.run(ctx)
            except AtlasBuilderError:
                raise
            except Exception as exc:  # a bug or a library failure: name the stage, keep the cause
                raise StageError(f"stage {stage.name} failed: {type(exc).__name__}: {exc}") from exc
            res.seconds = time.perf_counter() - t0
            log.info("stage %s done in %.1f s (%s)", stage.name, res.seconds, res.note)
            results.append(res)
        inputs: dict[str, Any] = {"manifest": {"path": str(mpath.absolute()),
                                               "sha256": sha256_file(mpath)}}
        hsrc = m.hierarchy_source()
        if isinstance(hsrc, Path):
            inputs["hierarchy"] = {"path": str(hsrc), "sha256": sha256_file(hsrc)}
        else:
            inputs["hierarchy"] = {"builtin": hsrc}
        provenance = {
            "command": "build",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "atlasbuilder": __version__,
            "quick": quick,
            "inputs": inputs,
            "parameters": m.model_dump(mode="json"),
            "stages": [r.__dict__ for r in results],
            "seconds": round(time.perf_counter() - t_start, 3),
            "versions": _versions(),
            "platform": platform.platform(),
        }
        _write_build_metadata(out, m, tree, provenance, ctx)
    _summary(results, time.perf_counter() - t_start, progress)
    return out


def _write_build_metadata(out: Path, m: Any, tree: Any, provenance: dict[str, Any],
                          ctx: BuildContext) -> None:
    from .atlas import write_atlas_metadata
    from .errors import InputError
    from .spaces import get_space

    templates: dict[str, str | None] = {}
    for name in m.spaces.reference:
        try:
            templates[name] = str(get_space(name, templates=m.template_paths()).template_path())
        except InputError:
            templates[name] = None  # e.g. the demo's BigBrain before synthesis provides it
    write_atlas_metadata(
        out, name=m.atlas.name, version=m.atlas.version, regions=tree,
        spaces=ctx.products.get("space_maps", []), space_templates=templates,
        reference_spaces=list(m.spaces.reference), provenance=provenance,
        extra={"source": "build", "areas": list(m.areas), "description": m.atlas.description},
    )


def _summary(results: list[StageResult], total: float, progress: bool) -> None:
    if not progress:
        return
    lines = [f"{'stage':<16}{'status':<10}{'time':>8}{'items':>7}  note"]
    for r in results:
        lines.append(f"{r.name:<16}{r.status:<10}{r.seconds:>7.1f}s{r.items:>7}  {r.note}")
    lines.append(f"{'total':<16}{'':<10}{total:>7.1f}s")
    log.info("\n".join(lines))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("atlasbuilder", "numpy", "nibabel", "xarray", "zarr", "pydantic", "torch",
                "antspyx", "siibra", "dask"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
