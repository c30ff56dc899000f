"""The ANTs boundary: register volumes, keep the transforms, warp volumes and map points.

Everything that knows about ANTs (antspyx), its LPS coordinates and its transform-list
conventions lives in this module. Callers give and get RAS+ mm: volumes as checked
:mod:`xarray` Datasets (:mod:`atlasbuilder.volumes`), points as ``(n, 3)`` arrays.

Directions (points move opposite to images)
-------------------------------------------
A :class:`Transform` goes from a **source** space to a **target** space:

* ``Transform.warp`` moves an *image* from source to target (resampled on a target grid);
* ``Transform.map_points`` moves *points* from source to target.

Registering with the source image as ANTs's *moving* image and the target as its *fixed* image,
the files are kept in ANTs order (the first file of a list is applied first to a point; the list
as a whole is what ``antsApplyTransforms`` takes):

* ``forward`` = ANTs ``fwdtransforms`` ``[1Warp, 0GenericAffine]``: moves **images source ->
  target**, i.e. maps **points target -> source** (each target voxel is looked up in the source);
* ``inverse`` = ANTs ``invtransforms`` ``[0GenericAffine (inverted), 1InverseWarp]``: moves
  **images target -> source**, i.e. maps **points source -> target**.

So ``map_points`` (source -> target) uses ``inverse`` and ``warp`` (source -> target) uses
``forward``; :meth:`Transform.inverse` swaps both the spaces and the lists.
ANTs works in LPS: ``(x, y, z)_LPS = (-x, -y, z)_RAS``; the flip happens only in
:func:`_to_lps`/:func:`_ants_image` here.

A transform directory holds the ANTs files plus ``transform.json`` (source and target space, the
file lists, preset, parameters, timing, versions), written last and atomically: a directory
without it is incomplete (an interrupted run leaves only a hidden ``.*.partial`` directory).

How a subject reaches BigBrain
------------------------------
Through MNI152NLin2009cAsym: one subject -> MNI152NLin2009cAsym registration per brain and one
template registration MNI152NLin2009cAsym <-> BigBrain per build (or the manifest's precomputed
transforms), composed by :class:`TransformGraph` and applied in one resampling. On the quick demo
cohort (``synquick``, 2 cores) the composed route gave a mean area Dice against the true labels in
BigBrain space of 0.779 (B01 0.746, B02 0.799, B03 0.791) against 0.760 for a direct
subject -> BigBrain registration (0.754, 0.817, 0.710), and costs one template registration per
build (16 s) instead of one more nonlinear registration per brain (12-25 s each). With real data
the BigBrain template is histology, whose contrast differs from a blockface/MRI volume far more
than the MRI template's does, and the published MNI <-> BigBrain transforms can be used as they
are (``benchmarks/bench_registration_demo.py --bigbrain``).

Threads and determinism
-----------------------
ITK sizes its thread pool once per process (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``). The first
registration in a process sets it to ``threads`` before ANTs is imported and runs in-process;
a later call asking for a different thread count runs in a child process with its own pool.
With ``threads=1`` and a fixed ``seed`` two runs give identical transforms (more threads sum the
metric in a varying order).

Example
-------
>>> tr = register(subject_ds, template_ds, "out/B01", preset="syn",               # doctest: +SKIP
...               source_space="subject:B01", target_space="MNI152NLin2009cAsym")
>>> tr.map_points([[10.0, -20.0, 5.0]])                                            # doctest: +SKIP
>>> labels_mni = tr.warp(labels_ds, template_ds, interpolation="label")            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import InputError, InvalidImageError, MissingFileError, StageError, UnknownSpaceError
from .spaces import get_space
from .storage import atomic_directory, atomic_write_text, sha256_file
from .volumes import Grid, from_array, grid_of

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "PRESETS",
    "NoTransformPathError",
    "RegistrationParameters",
    "Transform",
    "TransformGraph",
    "TransformSpaceError",
    "ants_arguments",
    "brain_mask",
    "default_cache_dir",
    "load_transform",
    "register",
    "register_subject",
    "register_templates",
    "registration_qa",
    "transform_from_files",
    "write_transform",
]

logger = logging.getLogger(__name__)

TRANSFORM_JSON = "transform.json"
_FORMAT = "atlasbuilder-transform"
_FORMAT_VERSION = 1
_CACHE_VERSION = 1  # bump when a cached template registration's meaning changes
Interpolation = Literal["linear", "nearest", "label"]
_ANTS_INTERP = {"linear": "linear", "nearest": "nearestNeighbor", "label": "genericLabel"}
_LPS = np.array([-1.0, -1.0, 1.0])


class TransformSpaceError(InputError):
    """A transform used for a space pair (or a volume in a space) it does not belong to."""


class NoTransformPathError(InputError, LookupError):
    """No chain of transforms connects two spaces (names both)."""


# ---------------------------------------------------------------------------------------------
# parameters and the antsRegistration command line
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistrationParameters:
    """One registration recipe: which stages, how many iterations, at what resolution.

    Each stage runs on the first levels of the pyramid with shrink factors 4, 2, 1 and smoothing
    sigmas 2, 1, 0 voxels, one level per iteration count given (``(100, 50)``: shrink 4 then 2).
    Linear stages use Mattes mutual information (``bins`` bins; dense by default, or regular
    sampling of ``sampling_rate`` < 1 of the voxels, which is not reproducible); SyN uses dense
    Mattes MI.

    Attributes
    ----------
    stages
        A prefix-closed subset of ``("rigid", "affine", "syn")`` in that order.
    resolution_mm
        Resample both images to this isotropic voxel size before registering (None: as given).
        The transforms still apply to images of any grid.
    initialize
        ``"com"``: align the intensity centres of mass first; ``"geometry"``: the image centres;
        ``"none"``: identity.
    """

    stages: tuple[str, ...] = ("rigid", "affine", "syn")
    rigid_iterations: tuple[int, ...] = (200, 100)
    affine_iterations: tuple[int, ...] = (200, 100)
    syn_iterations: tuple[int, ...] = (60, 40, 5)
    syn_gradient_step: float = 0.2
    syn_update_sigma: float = 3.0
    syn_total_sigma: float = 0.0
    bins: int = 32
    sampling_rate: float = 1.0
    resolution_mm: float | None = 2.0
    initialize: Literal["com", "geometry", "none"] = "com"

    def __post_init__(self) -> None:
        order = ("rigid", "affine", "syn")
        if not self.stages or tuple(s for s in order if s in self.stages) != tuple(self.stages) \
                or any(s not in order for s in self.stages):
            raise InputError(f"stages must be an ordered subset of {order}, got {self.stages!r}")
        for name in ("rigid_iterations", "affine_iterations", "syn_iterations"):
            its = getattr(self, name)
            if not 1 <= len(its) <= 3 or any(int(i) < 0 for i in its):
                raise InputError(f"{name} must hold 1 to 3 non-negative counts, got {its!r}")
        if self.resolution_mm is not None and not self.resolution_mm > 0:
            raise InputError(f"resolution_mm must be positive, got {self.resolution_mm}")
        if self.initialize not in ("com", "geometry", "none"):
            raise InputError(f"initialize must be 'com', 'geometry' or 'none', got {self.initialize!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples as lists)."""
        return {k: list(getattr(self, k)) if isinstance(getattr(self, k), tuple) else getattr(self, k)
                for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegistrationParameters:
        """Inverse of :meth:`to_dict`."""
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


#: Presets from fast to accurate. ``synquick`` stops SyN at twice the resolution.
PRESETS: dict[str, RegistrationParameters] = {
    "rigid": RegistrationParameters(stages=("rigid",), rigid_iterations=(200, 100, 50)),
    "affine": RegistrationParameters(stages=("rigid", "affine"), affine_iterations=(200, 100, 50)),
    "synquick": RegistrationParameters(rigid_iterations=(100, 50), affine_iterations=(100, 50),
                                       syn_iterations=(40, 20)),
    "syn": RegistrationParameters(syn_iterations=(80, 50, 20)),
}


def _parameters(preset: str | RegistrationParameters, resolution_mm: float | str | None = "preset"
                ) -> RegistrationParameters:
    if isinstance(preset, RegistrationParameters):
        p = preset
    elif preset in PRESETS:
        p = PRESETS[preset]
    else:
        raise InputError(f"unknown registration preset {preset!r}; expected one of {sorted(PRESETS)}")
    if resolution_mm != "preset":
        p = replace(p, resolution_mm=resolution_mm)  # type: ignore[arg-type]
    return p


def _pyramid(n: int) -> tuple[str, str]:
    return "x".join(["4", "2", "1"][:n]), "x".join(["2", "1", "0"][:n]) + "vox"


def ants_arguments(fixed: str, moving: str, prefix: str, params: RegistrationParameters, *, seed: int,
                   fixed_mask: str | None = None, moving_mask: str | None = None) -> list[str]:
    """The ``antsRegistration`` command line of ``params`` (what :func:`register` runs).

    Outputs ``<prefix>0GenericAffine.mat`` and, with SyN, ``<prefix>1Warp.nii.gz`` and
    ``<prefix>1InverseWarp.nii.gz``. Exposed so that a direct ``ants.registration(fixed=args,
    moving=None)`` call can be compared with :func:`register` (benchmarks).
    """
    # dense sampling (rate 1): ITK's regular sampling jitters its points at random, and that
    # jitter is not fixed by --random-seed (measured: two runs, same seed, 1 thread, different
    # affines), so a sparse metric would break "same inputs and seed give the same atlas"
    sampling = ("None,1" if params.sampling_rate >= 1
                else f"Regular,{params.sampling_rate}")
    lin = f"MI[{fixed},{moving},1,{params.bins},{sampling}]"
    init = {"com": f"[{fixed},{moving},1]", "geometry": f"[{fixed},{moving},0]",
            "none": None}[params.initialize]
    args = ["--dimensionality", "3", "--float", "1", "--collapse-output-transforms", "1",
            "--output", prefix, "--interpolation", "Linear", "--use-histogram-matching", "0",
            "--winsorize-image-intensities", "[0.005,0.995]", "--random-seed", str(int(seed))]
    if init is not None:
        args += ["--initial-moving-transform", init]
    masks = ([] if fixed_mask is None and moving_mask is None
             else ["--masks", f"[{fixed_mask or 'NULL'},{moving_mask or 'NULL'}]"])
    for stage, kind, its in (("rigid", "Rigid[0.1]", params.rigid_iterations),
                             ("affine", "Affine[0.1]", params.affine_iterations)):
        if stage in params.stages:
            shrink, sigma = _pyramid(len(its))
            args += ["--transform", kind, "--metric", lin,
                     "--convergence", f"[{'x'.join(map(str, its))},1e-6,10]",
                     "--shrink-factors", shrink, "--smoothing-sigmas", sigma, *masks]
    if "syn" in params.stages:
        shrink, sigma = _pyramid(len(params.syn_iterations))
        args += ["--transform",
                 f"SyN[{params.syn_gradient_step},{params.syn_update_sigma},{params.syn_total_sigma:g}]",
                 "--metric", f"MI[{fixed},{moving},1,{params.bins}]",
                 "--convergence", f"[{'x'.join(map(str, params.syn_iterations))},1e-6,10]",
                 "--shrink-factors", shrink, "--smoothing-sigmas", sigma, *masks]
    return [*args, "--verbose", "0"]


# ---------------------------------------------------------------------------------------------
# ANTs in this process or in a child
# ---------------------------------------------------------------------------------------------
_ITK_THREADS: int | None = None  # the ITK pool size this process was started with by us


def _import_ants(threads: int | None = None) -> Any:
    """Import ANTs; the first import fixes this process's ITK thread count (``threads``)."""
    global _ITK_THREADS
    if "ants" not in sys.modules and _ITK_THREADS is None:
        n = int(threads) if threads is not None else (os.cpu_count() or 1)
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(n)
        _ITK_THREADS = n
    elif _ITK_THREADS is None:  # imported before us: trust the environment it was started with
        env = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
        _ITK_THREADS = int(env) if env and env.isdigit() else -1
    import ants

    return ants


def _in_process_ok(threads: int) -> bool:
    """Whether this process's ITK pool has (or can still be given) ``threads`` threads."""
    if _ITK_THREADS is None and "ants" not in sys.modules:
        return True
    if _ITK_THREADS is not None:
        return _ITK_THREADS == threads
    return os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS") == str(threads)


def _run_registration_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Resample the inputs if asked, run antsRegistration, return timing and versions.

    ``job``: ``fixed``, ``moving`` (NIfTI paths), optional ``fixed_mask``/``moving_mask``,
    ``prefix``, ``work`` (a scratch directory), ``parameters`` (dict), ``seed``, ``threads``.
    """
    ants = _import_ants(job["threads"])
    params = RegistrationParameters.from_dict(job["parameters"])
    work = Path(job["work"])
    paths = {k: job.get(k) for k in ("fixed", "moving", "fixed_mask", "moving_mask")}
    t0 = time.perf_counter()
    if params.resolution_mm is not None:
        res = (float(params.resolution_mm),) * 3
        for k, p in list(paths.items()):
            if p is None:
                continue
            img = ants.image_read(p)
            # masks: nearest neighbour (1); images: linear (0)
            small = ants.resample_image(img, res, False, 1 if k.endswith("mask") else 0)
            paths[k] = str(work / f"{k}_lowres.nii.gz")
            ants.image_write(small, paths[k])
    t1 = time.perf_counter()
    args = ants_arguments(str(paths["fixed"]), str(paths["moving"]), job["prefix"], params,
                          seed=int(job["seed"]), fixed_mask=paths["fixed_mask"],
                          moving_mask=paths["moving_mask"])
    ants.registration(fixed=args, moving=None)
    t2 = time.perf_counter()
    return {"resample_seconds": round(t1 - t0, 3), "ants_seconds": round(t2 - t1, 3),
            "arguments": args, "ants_version": str(getattr(ants, "__version__", "?"))}


def _child_main() -> None:  # pragma: no cover - runs in a child process
    job = json.loads(sys.argv[1])
    out = _run_registration_job(job)
    Path(job["work"], "child_result.json").write_text(json.dumps(out))


def _run_job(job: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Run a registration job here when this process's ITK pool has ``threads`` threads (or ANTs
    is not imported yet), else in a child process started with that many threads."""
    threads = int(job["threads"])
    if _in_process_ok(threads):
        try:
            return _run_registration_job(job)
        except (RuntimeError, ValueError, OSError) as exc:
            raise StageError(f"ANTs failed while {what}: {exc}") from None
    code = "from atlasbuilder.registration import _child_main; _child_main()"
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(dict(job))], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise StageError(f"ANTs failed while {what} (exit code {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(Path(job["work"], "child_result.json").read_text())
    return result


# ---------------------------------------------------------------------------------------------
# RAS <-> LPS, volumes <-> ANTs images
# ---------------------------------------------------------------------------------------------
def _to_lps(points: np.ndarray) -> np.ndarray:
    return points * _LPS


def _ants_image(values: np.ndarray, grid: Grid) -> Any:
    """An ANTs image of ``values`` on the RAS grid (LPS origin, direction diag(-1, -1, 1))."""
    ants = _import_ants()
    return ants.from_numpy(np.ascontiguousarray(values, dtype=np.float32),
                           origin=tuple(float(v) for v in _to_lps(np.asarray(grid.origin))),
                           spacing=tuple(float(v) for v in grid.spacing),
                           direction=np.diag(_LPS))


def _the_variable(ds: xr.Dataset | xr.DataArray, what: str) -> xr.DataArray:
    import xarray as xr

    if isinstance(ds, xr.DataArray):
        return ds
    if len(ds.data_vars) != 1:
        raise InvalidImageError(f"{what}: expected one data variable, found {list(ds.data_vars)}")
    return ds[next(iter(ds.data_vars))]


def _as_volume(obj: xr.Dataset | xr.DataArray | str | Path, space: str | None, what: str) -> xr.Dataset:
    """Coerce a path or volume to a checked Dataset in ``space`` (checked when the volume names one)."""
    import xarray as xr

    from .volumes import read_nifti

    if isinstance(obj, str | Path):
        if space is None:
            raise InputError(f"{what}: a NIfTI path needs its space named")
        return read_nifti(obj, space, name="image")
    if isinstance(obj, xr.DataArray):
        obj = obj.to_dataset(name=str(obj.name or "image"))
        obj.attrs.update(obj[next(iter(obj.data_vars))].attrs)
    if not isinstance(obj, xr.Dataset):
        raise InputError(f"{what}: expected an xarray Dataset or a NIfTI path, got {type(obj).__name__}")
    have = obj.attrs.get("space")
    if space is not None and have is not None and get_space(str(have)).name != get_space(space).name:
        raise TransformSpaceError(f"{what} is in space {have!r}, expected {space!r}")
    grid_of(obj)  # checks the coordinates
    return obj


def _checked_path(path: str | Path, what: str) -> Path:
    """An existing, readable 3-D NIfTI file (header checked; the data are read by ANTs)."""
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(p, what)
    try:
        img: Any = nib.load(str(p))
    except (nib.filebasedimages.ImageFileError, OSError, ValueError) as exc:
        raise InvalidImageError(f"{p}: cannot read {what} as NIfTI ({exc})") from None
    if len([n for n in img.shape if n > 1]) < 3 or len(img.shape) > 4:
        raise InvalidImageError(f"{p}: {what} must be a 3-D image, got shape {img.shape}")
    return p.absolute()


def _grid_from(reference: Grid | xr.Dataset | xr.DataArray) -> Grid:
    return reference if isinstance(reference, Grid) else grid_of(reference)


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transform:
    """A transform between two spaces, usable both ways (see the module docstring for directions).

    Attributes
    ----------
    source, target
        Canonical space names: :meth:`map_points` and :meth:`warp` go source -> target.
    forward_files
        ``(path, invert)`` in ANTs order: moves images source -> target (points target -> source).
    inverse_files
        ``(path, invert)`` in ANTs order: moves images target -> source (points source -> target).
    directory
        Where ``transform.json`` lives (None for a transform not yet written).
    info
        The rest of ``transform.json`` (preset, parameters, timing, versions).
    """

    source: str
    target: str
    forward_files: tuple[tuple[str, bool], ...]
    inverse_files: tuple[tuple[str, bool], ...]
    directory: Path | None = None
    info: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def inverse(self) -> Transform:
        """The same transform from target to source."""
        return replace(self, source=self.target, target=self.source,
                       forward_files=self.inverse_files, inverse_files=self.forward_files)

    def _check_files(self, files: Sequence[tuple[str, bool]], what: str) -> None:
        if not files:
            raise TransformSpaceError(f"transform {self.source} -> {self.target} has no files to {what}"
                                      + (f" ({self.directory})" if self.directory else ""))
        for p, _ in files:
            if not Path(p).is_file():
                raise MissingFileError(p, f"transform file of {self.source} -> {self.target}")

    def map_points(self, points: Any) -> np.ndarray:
        """Map ``(n, 3)`` RAS mm points from :attr:`source` to :attr:`target` (float64)."""
        return _map_points([self], points)

    def warp(self, ds: xr.Dataset | xr.DataArray, reference: Grid | xr.Dataset | xr.DataArray, *,
             interpolation: Interpolation = "linear", default: float = 0.0) -> xr.Dataset:
        """Resample a volume of the source space onto a grid of the target space.

        Parameters
        ----------
        ds
            Volume in :attr:`source` (its ``space`` attribute is checked); a leading ``region``
            dim is warped map by map.
        reference
            The target grid, or a target-space volume whose grid to use.
        interpolation
            ``"linear"`` (images, probabilities), ``"nearest"`` or ``"label"`` (ANTs
            genericLabel: label images, each voxel takes the label of largest smoothed weight).
        default
            Value outside the source volume.

        Returns
        -------
        xarray.Dataset
            Same variable name; in :attr:`target`; label/nearest keep the input dtype, linear
            gives float32.
        """
        return _warp([self], ds, reference, interpolation=interpolation, default=default)


def _flags(files: Sequence[tuple[str, bool]]) -> tuple[list[str], list[bool]]:
    return [p for p, _ in files], [bool(i) for _, i in files]


def _map_points(chain: Sequence[Transform], points: Any) -> np.ndarray:
    import pandas as pd

    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 1 and pts.shape == (3,):
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"points must have shape (n, 3) or (3,); got {pts.shape}")
    if not np.isfinite(pts).all():
        raise InputError("points must be finite (no NaN/inf)")
    if pts.shape[0] == 0:
        return pts.copy()
    files: list[tuple[str, bool]] = []
    for tr in chain:  # points source -> target: the lists that move images target -> source
        tr._check_files(tr.inverse_files, "map points")
        files += list(tr.inverse_files)
    ants = _import_ants()
    paths, inv = _flags(files)
    lps = _to_lps(pts)
    df = pd.DataFrame({"x": lps[:, 0], "y": lps[:, 1], "z": lps[:, 2]})
    out = ants.apply_transforms_to_points(3, df, paths, whichtoinvert=inv)
    return _to_lps(out[["x", "y", "z"]].to_numpy(dtype=np.float64))


def _warp(chain: Sequence[Transform], ds: xr.Dataset | xr.DataArray,
          reference: Grid | xr.Dataset | xr.DataArray, *, interpolation: Interpolation,
          default: float = 0.0) -> xr.Dataset:
    if interpolation not in _ANTS_INTERP:
        raise InputError(f"interpolation must be one of {sorted(_ANTS_INTERP)}, got {interpolation!r}")
    source, target = chain[0].source, chain[-1].target
    vol = _as_volume(ds, source, f"volume to warp from {source} to {target}")
    if vol.attrs.get("space") is None:
        raise TransformSpaceError(f"volume to warp from {source} has no 'space' attribute")
    da = _the_variable(vol, "volume to warp")
    if not isinstance(reference, Grid):
        ref_space = reference.attrs.get("space")
        if ref_space is not None and get_space(str(ref_space)).name != get_space(target).name:
            raise TransformSpaceError(f"reference grid is in space {ref_space!r}, expected {target!r}")
    tgrid = _grid_from(reference)
    sgrid = grid_of(da)
    files: list[tuple[str, bool]] = []
    for tr in reversed(chain):  # images source -> target: forward lists, last hop first
        tr._check_files(tr.forward_files, "warp images")
        files += list(tr.forward_files)
    ants = _import_ants()
    paths, inv = _flags(files)
    fixed = _ants_image(np.zeros(tgrid.shape, np.float32), tgrid)
    stack = da.transpose("region", "x", "y", "z").values if "region" in da.dims else da.values[None]
    if interpolation == "linear" and stack.shape[0] >= STACK_BY_COORDINATES:
        out = _warp_stack_by_coordinates(ants, fixed, stack, sgrid, paths, inv, float(default))
    else:
        out = np.empty((stack.shape[0], *tgrid.shape), dtype=np.float32)
        for i, arr in enumerate(stack):
            moving = _ants_image(np.asarray(arr, np.float32), sgrid)
            w = ants.apply_transforms(fixed, moving, paths, interpolator=_ANTS_INTERP[interpolation],
                                      whichtoinvert=inv, defaultvalue=float(default))
            out[i] = w.numpy()
    dtype = da.dtype
    res: np.ndarray
    if interpolation == "linear" or not (np.issubdtype(dtype, np.integer) or dtype is np.dtype(bool)):
        res = out.astype(np.float32, copy=False)
    else:
        res = np.rint(out).astype(dtype)
    data = np.moveaxis(res, 0, -1) if "region" in da.dims else res[0]
    name = str(da.name or "image")
    outds = from_array(data, tgrid, get_space(target).name, name=name,
                       source=f"{vol.attrs.get('source', '')} warped {source} -> {target} ({interpolation})")
    if "region" in da.dims:
        outds = outds.assign_coords({k: v for k, v in da.coords.items() if "region" in v.dims})
    return outds


# a linear warp of this many maps or more goes through the source position of every target voxel
STACK_BY_COORDINATES = 4


def _warp_stack_by_coordinates(ants: Any, fixed: Any, stack: np.ndarray, sgrid: Grid,
                               paths: list[str], inv: list[bool], default: float) -> np.ndarray:
    """Linear warp of a stack of maps: ANTs warps the three source voxel-index images once (a
    trilinear interpolation of a linear function is exact, so each target voxel gets its exact
    source position, clamped at the border as ANTs clamps), then every map is interpolated there.
    The same values as one ANTs warp per map, at three warps' cost instead of one per map."""
    from scipy import ndimage

    pos = []
    for axis in range(3):
        index = np.broadcast_to(np.arange(sgrid.shape[axis], dtype=np.float32).reshape(
            [-1 if a == axis else 1 for a in range(3)]), sgrid.shape)
        w = ants.apply_transforms(fixed, _ants_image(index, sgrid), paths, interpolator="linear",
                                  whichtoinvert=inv, defaultvalue=-1.0)
        pos.append(w.numpy())
    inside = (pos[0] >= 0) & (pos[1] >= 0) & (pos[2] >= 0)  # -1: beyond the source image
    where = np.stack([p[inside] for p in pos]).astype(np.float64)
    out = np.full((stack.shape[0], *inside.shape), default, dtype=np.float32)
    for i, arr in enumerate(stack):
        out[i][inside] = ndimage.map_coordinates(np.asarray(arr, np.float32), where, order=1,
                                                 mode="nearest", prefilter=False)
    return out


def _parse_file_entry(entry: Any, base: Path | None, what: str) -> tuple[str, bool]:
    """``"path"``, ``"[path,1]"`` (ANTs syntax: use the inverse), ``[path, bool]`` or a dict."""
    if isinstance(entry, Mapping):
        path, inv = entry.get("file"), bool(entry.get("invert", False))
    elif isinstance(entry, list | tuple) and len(entry) == 2:
        path, inv = entry[0], bool(entry[1])
    elif isinstance(entry, str | Path):
        s = str(entry).strip()
        if s.startswith("[") and s.endswith("]") and "," in s:
            path, flag = s[1:-1].rsplit(",", 1)
            inv = flag.strip() in ("1", "true", "True")
        else:
            path, inv = s, False
    else:
        raise InputError(f"{what}: cannot read transform file entry {entry!r}")
    p = Path(str(path))
    if base is not None and not p.is_absolute():
        p = base / p
    if not p.is_file():
        raise MissingFileError(p, f"transform file ({what})")
    if inv and not _is_linear(p):
        raise InputError(f"{what}: {p} is a displacement field, which ANTs cannot invert; give its "
                         "inverse warp file instead")
    return str(p), inv


def _is_linear(path: str | Path) -> bool:
    return str(path).endswith((".mat", ".txt"))


def transform_from_files(source: str, target: str, forward: Sequence[Any],
                         inverse: Sequence[Any] = (), *, base: str | Path | None = None,
                         info: Mapping[str, Any] | None = None) -> Transform:
    """A :class:`Transform` from existing ANTs files (e.g. the manifest's ``spaces.transforms``).

    Parameters
    ----------
    source, target
        Space names (aliases allowed).
    forward
        Files moving images source -> target in ANTs order (``antsApplyTransforms -t`` order);
        an entry ``"[file.mat,1]"`` (or ``(file, True)``) uses the inverse of an affine.
    inverse
        Files moving images target -> source. May be omitted when every forward file is linear
        (the inverse is then the inverted affines in reverse order).
    base
        Directory that relative paths are resolved against.

    Raises
    ------
    MissingFileError
        A file does not exist.
    InputError
        No forward files, or a displacement field to be inverted.
    """
    src, tgt = get_space(source).name, get_space(target).name
    b = Path(base) if base is not None else None
    what = f"{src} -> {tgt}"
    if not forward:
        raise InputError(f"transform {what}: no forward transform files")
    fwd = tuple(_parse_file_entry(e, b, what) for e in forward)
    if inverse:
        inv = tuple(_parse_file_entry(e, b, what) for e in inverse)
    elif all(_is_linear(p) for p, _ in fwd):
        inv = tuple((p, not i) for p, i in reversed(fwd))
    else:
        inv = ()
    return Transform(src, tgt, fwd, inv, None, dict(info or {}))


def write_transform(transform: Transform, out_dir: str | Path, *, overwrite: bool = False,
                    copy_files: bool = True) -> Transform:
    """Write a transform as a self-contained directory (files + ``transform.json``), atomically.

    With ``copy_files`` the ANTs files are copied in (names kept, numbered if two collide);
    otherwise ``transform.json`` refers to them by absolute path.

    Returns
    -------
    Transform
        The transform as loaded from ``out_dir``.
    """
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        mapping: dict[str, str] = {}
        if copy_files:
            for p, _ in (*transform.forward_files, *transform.inverse_files):
                if p in mapping:
                    continue
                name = Path(p).name
                while name in mapping.values():
                    name = f"{len(mapping)}_{name}"
                shutil.copyfile(p, tmp / name)
                mapping[p] = name
        entries = {k: [[mapping.get(p, str(Path(p).absolute())), inv] for p, inv in files]
                   for k, files in (("forward", transform.forward_files),
                                    ("inverse", transform.inverse_files))}
        doc = {**transform.info, "format": _FORMAT, "format_version": _FORMAT_VERSION,
               "source": transform.source, "target": transform.target, **entries}
        atomic_write_text(tmp / TRANSFORM_JSON, json.dumps(doc, indent=1))
    return load_transform(out)


def load_transform(directory: str | Path, *, source: str | None = None,
                   target: str | None = None) -> Transform:
    """Load a transform directory written by :func:`register` or :func:`write_transform`.

    Parameters
    ----------
    directory
        Holds ``transform.json``.
    source, target
        When given, the transform must connect these two spaces (either way round; it is
        returned oriented from ``source`` to ``target``).

    Raises
    ------
    MissingFileError
        The directory, its ``transform.json`` or a file it names does not exist.
    InvalidImageError
        ``transform.json`` is not a transform description.
    TransformSpaceError
        The transform connects another pair of spaces.
    """
    d = Path(directory)
    if not d.is_dir():
        raise MissingFileError(d, "transform directory")
    js = d / TRANSFORM_JSON
    if not js.is_file():
        raise MissingFileError(js, "transform description (incomplete or not a transform directory)")
    try:
        doc = json.loads(js.read_text(encoding="utf-8"))
        src, tgt = str(doc["source"]), str(doc["target"])
        fwd, inv = doc["forward"], doc.get("inverse", [])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidImageError(f"{js}: not an atlasbuilder transform description ({exc})") from None
    if doc.get("format") != _FORMAT:
        raise InvalidImageError(f"{js}: format {doc.get('format')!r}, expected {_FORMAT!r}")
    info = {k: v for k, v in doc.items() if k not in ("source", "target", "forward", "inverse")}
    tr = transform_from_files(src, tgt, fwd, inv, base=d, info=info)
    tr = replace(tr, directory=d)
    if source is not None or target is not None:
        want = (get_space(source).name if source else None, get_space(target).name if target else None)
        if (want[0] in (None, tr.source) and want[1] in (None, tr.target)):
            return tr
        if (want[0] in (None, tr.target) and want[1] in (None, tr.source)):
            return tr.inverse()
        raise TransformSpaceError(f"{d}: transform {tr.source} -> {tr.target} does not connect "
                                  f"{want[0] or '*'} and {want[1] or '*'}")
    return tr


# ---------------------------------------------------------------------------------------------
# register
# ---------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    from .storage import package_versions

    return package_versions("atlasbuilder", "antspyx", "numpy", python=True)


def _write_input(vol: xr.Dataset | xr.DataArray, path: Path, *, mask: bool = False) -> None:
    import nibabel as nib

    from .volumes import to_nifti

    da = _the_variable(vol, str(path.name))
    if "region" in da.dims:
        raise InvalidImageError(f"{path.name}: registration takes a 3-D image, got dims {tuple(da.dims)}")
    arr = np.asarray(da.values)
    if mask:
        if not arr.any():
            raise InputError(f"{path.stem.split('.')[0]}: the mask is empty (no nonzero voxel)")
        arr = (arr != 0).astype(np.uint8)
    else:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise InvalidImageError(f"{path.stem.split('.')[0]}: image has NaN or infinite values")
        if not np.any(arr != arr.flat[0]):
            raise InvalidImageError(f"{path.stem.split('.')[0]}: image is constant; nothing to register")
    nib.save(to_nifti(da.copy(data=arr)), str(path))


def register(moving: xr.Dataset | xr.DataArray | str | Path, fixed: xr.Dataset | xr.DataArray | str | Path,
             out_dir: str | Path, *, preset: str | RegistrationParameters = "syn",
             moving_mask: xr.Dataset | xr.DataArray | str | Path | None = None,
             fixed_mask: xr.Dataset | xr.DataArray | str | Path | None = None,
             threads: int = 1, seed: int = 0, source_space: str, target_space: str,
             resolution_mm: float | str | None = "preset", overwrite: bool = False) -> Transform:
    """Register ``moving`` (in ``source_space``) to ``fixed`` (in ``target_space``) with ANTs.

    Parameters
    ----------
    moving, fixed
        3-D volumes (Datasets with one variable, or NIfTI paths); a volume's ``space`` attribute
        must agree with the space named.
    out_dir
        The transform directory to create (ANTs files + ``transform.json``), built under a
        temporary name and renamed when complete.
    preset
        ``"rigid"``, ``"affine"``, ``"synquick"``, ``"syn"`` (:data:`PRESETS`) or parameters.
    moving_mask, fixed_mask
        Optional masks (nonzero = inside) restricting the metric, on the images' grids.
    threads
        ITK threads (1 is reproducible).
    seed
        ANTs's random seed.
    source_space, target_space
        Space names recorded in the transform.
    resolution_mm
        Override the preset's registration resolution (None: the images' own).
    overwrite
        Replace an existing ``out_dir``.

    Returns
    -------
    Transform
        From ``source_space`` to ``target_space``.

    Raises
    ------
    InputError
        Unknown preset, empty mask, constant image, volume in another space, ``threads < 1``.
    OutputExistsError
        ``out_dir`` exists and ``overwrite`` is false.
    StageError
        ANTs failed.
    """
    src, tgt = get_space(source_space).name, get_space(target_space).name
    params = _parameters(preset, resolution_mm)
    if isinstance(threads, bool) or int(threads) < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    # NIfTI paths go to ANTs as they are (checked, not rewritten); volumes are written first
    mov = _checked_path(moving, f"moving image ({src})") if isinstance(moving, str | Path) \
        else _as_volume(moving, src, f"moving image ({src})")
    fix = _checked_path(fixed, f"fixed image ({tgt})") if isinstance(fixed, str | Path) \
        else _as_volume(fixed, tgt, f"fixed image ({tgt})")
    t0 = time.perf_counter()
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite) as tmp, \
            tempfile.TemporaryDirectory(prefix="atlasbuilder-reg-") as work_s:
        work = Path(work_s)
        job: dict[str, Any] = {"fixed": str(work / "fixed.nii.gz"), "moving": str(work / "moving.nii.gz"),
                               "prefix": str(tmp) + "/", "work": str(work),
                               "parameters": params.to_dict(), "seed": int(seed), "threads": int(threads)}
        for key, vol in (("fixed", fix), ("moving", mov)):
            if isinstance(vol, Path):
                job[key] = str(vol)
            else:
                _write_input(vol, work / f"{key}.nii.gz")
        for key, m, space in (("fixed_mask", fixed_mask, tgt), ("moving_mask", moving_mask, src)):
            if m is not None:
                _write_input(_as_volume(m, space, key.replace("_", " ")), work / f"{key}.nii.gz", mask=True)
                job[key] = str(work / f"{key}.nii.gz")
        result = _run_job(job, f"registering {src} to {tgt}")
        fwd: list[list[Any]] = [["0GenericAffine.mat", False]]
        inv: list[list[Any]] = [["0GenericAffine.mat", True]]
        if "syn" in params.stages:
            fwd.insert(0, ["1Warp.nii.gz", False])
            inv.append(["1InverseWarp.nii.gz", False])
        for p, _ in fwd + inv:
            if not (tmp / str(p)).is_file():
                raise StageError(f"ANTs did not write {p} while registering {src} to {tgt}")
        doc = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "source": src, "target": tgt,
               "forward": fwd, "inverse": inv,
               "direction": "forward moves images source->target (maps points target->source); "
                            "inverse moves images target->source (maps points source->target); "
                            "ANTs order, first file applied first to a point",
               "preset": preset if isinstance(preset, str) else "custom",
               "parameters": params.to_dict(), "seed": int(seed), "threads": int(threads),
               "masks": {"fixed": fixed_mask is not None, "moving": moving_mask is not None},
               "inputs": {k: str(v) if isinstance(v, Path) else v.attrs.get("source", "")
                          for k, v in (("moving", mov), ("fixed", fix))},
               "arguments": [a.replace(str(tmp), "<out>").replace(str(work), "<work>")
                             for a in result["arguments"]],
               "timing": {"seconds": round(time.perf_counter() - t0, 3),
                          "ants_seconds": result["ants_seconds"],
                          "resample_seconds": result["resample_seconds"]},
               "versions": {**_versions(), "ants": result["ants_version"]}}
        atomic_write_text(tmp / TRANSFORM_JSON, json.dumps(doc, indent=1))
    return load_transform(out)


# ---------------------------------------------------------------------------------------------
# the transform graph
# ---------------------------------------------------------------------------------------------
class TransformGraph:
    """Spaces as nodes, transforms as edges usable both ways; composes along shortest paths.

    Example
    -------
    >>> g = TransformGraph.from_directory("atlas")                      # doctest: +SKIP
    >>> g.map_points([[0, -80, 5]], "MNI152NLin2009cAsym", "BigBrain")  # doctest: +SKIP
    """

    def __init__(self, transforms: Iterable[Transform] = ()) -> None:
        self._edges: dict[str, list[Transform]] = {}
        for t in transforms:
            self.add(t)

    def add(self, transform: Transform) -> None:
        """Add an edge (both directions). A later transform for the same pair replaces none: the
        first one added is used."""
        self._edges.setdefault(transform.source, []).append(transform)
        self._edges.setdefault(transform.target, []).append(transform.inverse())

    @property
    def spaces(self) -> list[str]:
        """The nodes, sorted."""
        return sorted(self._edges)

    def path(self, a: str, b: str) -> list[Transform]:
        """The transforms (oriented) from ``a`` to ``b`` along a shortest path; ``[]`` if a == b.

        Raises
        ------
        NoTransformPathError
            No path (names both spaces and the known ones).
        """
        sa, sb = _space_name(a), _space_name(b)
        if sa == sb:
            return []
        prev: dict[str, Transform | None] = {sa: None}
        queue = deque([sa])
        while queue:
            node = queue.popleft()
            for t in self._edges.get(node, []):
                if t.target not in prev:
                    prev[t.target] = t
                    queue.append(t.target)
        if sb not in prev:
            raise NoTransformPathError(
                f"no transform path from {sa} to {sb} (spaces with transforms: "
                f"{', '.join(self.spaces) or 'none'})")
        chain: list[Transform] = []
        node = sb
        step = prev[node]
        while step is not None:
            chain.append(step)
            step = prev[step.source]
        return chain[::-1]

    def map_points(self, points: Any, a: str, b: str) -> np.ndarray:
        """Map ``(n, 3)`` RAS mm points from space ``a`` to space ``b``."""
        chain = self.path(a, b)
        if not chain:
            pts = np.asarray(points, dtype=np.float64)
            return pts[None] if pts.shape == (3,) else pts.copy()
        return _map_points(chain, points)

    def warp(self, ds: xr.Dataset | xr.DataArray, b: str, reference: Grid | xr.Dataset | xr.DataArray, *,
             interpolation: Interpolation = "linear", default: float = 0.0) -> xr.Dataset:
        """Warp a volume (its ``space`` attribute is the start) into space ``b`` in one resampling."""
        space = ds.attrs.get("space")
        if space is None:
            raise TransformSpaceError("volume to warp has no 'space' attribute")
        chain = self.path(str(space), b)
        if not chain:
            raise InputError(f"volume is already in {b}; resample it with volumes tools instead")
        return _warp(chain, ds, reference, interpolation=interpolation, default=default)

    @classmethod
    def from_directory(cls, root: str | Path) -> TransformGraph:
        """Every complete transform directory (holding ``transform.json``) under ``root``;
        hidden (e.g. partial) directories are skipped."""
        return cls.from_directories([root])

    @classmethod
    def from_directories(cls, roots: Iterable[str | Path]) -> TransformGraph:
        """:meth:`from_directory` of each root, in one graph."""
        g = cls()
        for root in roots:
            r = Path(root)
            if not r.is_dir():
                raise MissingFileError(r, "directory of transforms")
            for js in sorted(r.rglob(TRANSFORM_JSON)):
                if any(part.startswith(".") for part in js.relative_to(r).parts[:-1]):
                    continue
                g.add(load_transform(js.parent))
        return g


def _space_name(name: str) -> str:
    try:
        return get_space(name).name
    except UnknownSpaceError:
        raise
    except InputError as exc:
        raise UnknownSpaceError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# masks, templates, subjects
# ---------------------------------------------------------------------------------------------
def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def brain_mask(image: xr.Dataset | xr.DataArray) -> xr.Dataset:
    """A brain mask of an image: its nonzero voxels when the background is exactly zero (a
    brain-extracted template), else above an Otsu threshold; holes filled, largest component kept.

    Raises
    ------
    InputError
        The mask would be empty.
    """
    from scipy import ndimage

    da = _the_variable(image, "image")
    arr = np.asarray(da.values, dtype=np.float32)
    nonzero = arr != 0
    if nonzero.mean() < 0.9:  # plenty of exact-zero background: skull-stripped
        mask = nonzero
    else:
        mask = arr > _otsu(arr[np.isfinite(arr)])
    lab, n = ndimage.label(mask)
    if n == 0:
        raise InputError(f"brain mask of {image.attrs.get('source') or 'image'} is empty")
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    mask = ndimage.binary_fill_holes(lab == int(np.argmax(sizes)) + 1)
    return from_array(mask.astype(np.uint8), grid_of(da), str(image.attrs.get("space", "")), name="mask",
                      source=f"brain_mask({image.attrs.get('source', '')})")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/atlasbuilder`` (or ``~/.cache/atlasbuilder``); not created here."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "atlasbuilder"


def _hash(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def register_templates(source_space: str, target_space: str, out_dir: str | Path | None = None, *,
                       resolution_mm: float = 2.0, preset: str | RegistrationParameters = "syn",
                       threads: int = 1, seed: int = 0,
                       templates: Mapping[str, str | Path] | None = None,
                       precomputed: Mapping[str, Any] | None = None, base: str | Path | None = None,
                       cache_dir: str | Path | None = None, overwrite: bool = False) -> Transform:
    """Register the template of ``source_space`` (moving) to that of ``target_space`` (fixed).

    Used for MNI152NLin6Asym <-> MNI152NLin2009cAsym and MNI152NLin2009cAsym <-> BigBrain. The
    result is cached under ``<cache_dir>/registration/<source>__<target>-<hash>`` keyed by the
    templates' bytes, the parameters and the seed (a second call starts no ANTs), then copied to
    ``out_dir`` (e.g. ``<atlas>/transforms/<source>__<target>``) when one is given.

    Parameters
    ----------
    templates
        Template files by space name (the manifest's ``spaces.templates``; BigBrain needs one).
    precomputed
        The manifest's ``spaces.transforms``: ``{"A->B": {"forward": [...], "inverse": [...]}}``
        (or objects with ``forward``/``inverse`` attributes). A matching entry (either direction)
        is used instead of registering.
    base
        Directory that relative paths in ``precomputed`` are resolved against (the manifest's).
    cache_dir
        Default :func:`default_cache_dir` (``$XDG_CACHE_HOME/atlasbuilder``).

    Raises
    ------
    InputError / MissingFileError
        A space has no template or its file is missing.
    """
    src, tgt = get_space(source_space, templates=templates), get_space(target_space, templates=templates)
    for key, entry in (precomputed or {}).items():
        a, _, b = str(key).partition("->")
        pair = (get_space(a.strip()).name, get_space(b.strip()).name)
        if pair in ((src.name, tgt.name), (tgt.name, src.name)):
            fwd = entry["forward"] if isinstance(entry, Mapping) else entry.forward
            inv = (entry.get("inverse", []) if isinstance(entry, Mapping) else entry.inverse) or []
            tr = transform_from_files(pair[0], pair[1], [str(f) for f in fwd], [str(f) for f in inv],
                                      base=base, info={"precomputed": True})
            tr = tr if pair == (src.name, tgt.name) else tr.inverse()
            return write_transform(tr, out_dir, overwrite=overwrite) if out_dir is not None else tr
    fixed_p, moving_p = tgt.template_path(), src.template_path()
    params = _parameters(preset, resolution_mm)
    key = _hash({"v": _CACHE_VERSION, "fixed": sha256_file(fixed_p), "moving": sha256_file(moving_p),
                 "parameters": params.to_dict(), "seed": int(seed)})
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "registration"
    cdir = cache / f"{src.name}__{tgt.name}-{key}"
    if (cdir / TRANSFORM_JSON).is_file():
        logger.info("template registration cache hit: %s", cdir)
        tr = load_transform(cdir, source=src.name, target=tgt.name)
    else:
        tr = register(moving_p, fixed_p, cdir, preset=params, threads=threads, seed=seed,
                      source_space=src.name, target_space=tgt.name, overwrite=True)
    if out_dir is None:
        return tr
    return write_transform(replace(tr, info={**tr.info, "cache_key": key}), out_dir, overwrite=overwrite)


def register_subject(reference_image: xr.Dataset | str | Path, space: str,
                     template: xr.Dataset | str | Path | None, out_dir: str | Path, *,
                     preset: str | RegistrationParameters = "syn", threads: int = 1, seed: int = 0,
                     mask: xr.Dataset | None = None, source_space: str | None = None,
                     templates: Mapping[str, str | Path] | None = None,
                     resolution_mm: float | str | None = "preset", overwrite: bool = False) -> Transform:
    """Register a brain's whole-brain reference volume (blockface/MRI, subject mm) to a template.

    The moving image is the subject's volume, the fixed image the template of ``space``; ANTs
    starts from the intensity centres of mass, then a rigid and an affine stage absorb the
    brains' size (+-8 % in the demo) and small rotations before SyN. The brain mask of each image
    (:func:`brain_mask` unless ``mask`` is given for the subject) restricts the metric.

    A subject reaches BigBrain through MNI152NLin2009cAsym (composed by :class:`TransformGraph`;
    the module docstring gives the reasons and the demo figures).

    Demo figures (``benchmarks/bench_registration_demo.py``, blockface references, 3 brains):
    ``synquick`` point error vs the true transform over grey matter median 0.79 mm, p95 1.86 mm,
    round trip 0.015 mm, min Jacobian 0.58, area Dice mean 0.81, 22-29 s per brain on 2 busy
    cores; ``syn`` median 0.40 mm, p95 1.32 mm, round trip 0.007 mm, min Jacobian 0.40, Dice
    0.85 (0.89 leaving out an area of 2 voxels), 170-415 s per brain on an overloaded machine.

    Parameters
    ----------
    reference_image
        The subject's volume (its ``space`` attribute ``subject:<id>``), or a NIfTI path with
        ``source_space``.
    space
        The reference space to register to.
    template
        The fixed image (default: the space's template, via ``templates`` for BigBrain).
    mask
        A subject brain mask (default: :func:`brain_mask`).

    Returns
    -------
    Transform
        From the subject's space to ``space``.
    """
    tgt = get_space(space, templates=templates)
    src = source_space or (reference_image.attrs.get("space") if not isinstance(reference_image, str | Path)
                           else None)
    if src is None:
        raise InputError("register_subject: name the subject's space (source_space='subject:<id>')")
    mov = _as_volume(reference_image, str(src), f"reference volume of {src}")
    fix = (tgt.load_template() if template is None
           else _as_volume(template, tgt.name, f"template of {tgt.name}"))
    mmask = mask if mask is not None else brain_mask(mov)
    fmask = brain_mask(fix)
    return register(mov, fix, out_dir, preset=preset, moving_mask=mmask, fixed_mask=fmask,
                    threads=threads, seed=seed, source_space=str(src), target_space=tgt.name,
                    resolution_mm=resolution_mm, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# QA
# ---------------------------------------------------------------------------------------------
def _jacobian_range(transform: Transform, fixed_mask: xr.Dataset) -> tuple[float, float]:
    """Min and max, inside the target mask, of the Jacobian determinant of the forward transform
    as a point map (target -> source: displacement field, then affine): the determinant of each
    displacement field (``ants.create_jacobian_determinant_image``, on the field's own grid, the
    mask resampled onto it) times the affines' determinants. Positive everywhere: no folding."""
    ants = _import_ants()
    da = _the_variable(fixed_mask, "fixed mask")
    mask_img = _ants_image((np.asarray(da.values) != 0).astype(np.float32), grid_of(da))
    det = 1.0
    vals: np.ndarray | None = None
    for p, inv in transform.forward_files:
        if _is_linear(p):
            m = np.asarray(ants.read_transform(p).parameters[:9], dtype=np.float64).reshape(3, 3)
            d = float(np.linalg.det(m))
            det *= 1.0 / d if inv else d
        elif vals is None:
            field_img = ants.image_read(p)
            dom = ants.image_clone(field_img.split_channels()[0]) if field_img.components > 1 else field_img
            jac = ants.create_jacobian_determinant_image(dom, p, do_log=False, geom=False)
            inside = ants.resample_image_to_target(mask_img, jac, interp_type="nearestNeighbor").numpy() > 0.5
            vals = jac.numpy()[inside]
        else:
            raise InputError(f"QA of {transform.source} -> {transform.target}: more than one "
                             "displacement field in the transform; Jacobian not computed")
    if vals is None:
        vals = np.ones(int((np.asarray(da.values) != 0).sum()))
    if vals.size == 0:
        raise InputError(f"QA of {transform.source} -> {transform.target}: the target mask is empty")
    vals = vals * det
    return float(vals.min()), float(vals.max())


def registration_qa(transform: Transform, moving_mask_ds: xr.Dataset, fixed_mask_ds: xr.Dataset,
                    out_png: str | Path | None = None, *, moving_image: xr.Dataset | None = None,
                    fixed_image: xr.Dataset | None = None, max_points: int = 4000, seed: int = 0
                    ) -> dict[str, float]:
    """Quality figures of a registration.

    Returns
    -------
    dict
        ``roundtrip_median_mm``/``roundtrip_p95_mm``: ``|inverse(forward(p)) - p|`` over up to
        ``max_points`` brain points of the source mask; ``jacobian_min``/``jacobian_max``: the
        Jacobian determinant of the transform inside the target mask (of the target -> source
        point map that the image warp uses; > 0: no folding; < 1: the source is smaller there);
        ``dice``: the warped source mask against the target mask.
        With ``out_png``, a figure of three orthogonal slices: the target image (or mask) in grey
        and the edges of the warped source image (or mask) in red.

    Raises
    ------
    InputError
        An empty mask; a mask in the wrong space.
    """
    mm = _as_volume(moving_mask_ds, transform.source, "moving mask")
    fm = _as_volume(fixed_mask_ds, transform.target, "fixed mask")
    mda, fda = _the_variable(mm, "moving mask"), _the_variable(fm, "fixed mask")
    mvals = np.asarray(mda.values) != 0
    if not mvals.any() or not np.asarray(fda.values).any():
        raise InputError(f"QA of {transform.source} -> {transform.target}: a mask is empty")
    g = grid_of(mda)
    idx = np.argwhere(mvals)
    rng = np.random.default_rng(seed)
    if len(idx) > max_points:
        idx = idx[np.sort(rng.choice(len(idx), max_points, replace=False))]
    pts = idx * np.asarray(g.spacing) + np.asarray(g.origin)
    back = transform.inverse().map_points(transform.map_points(pts))
    err = np.linalg.norm(back - pts, axis=1)
    jmin, jmax = _jacobian_range(transform, fm)
    wm = transform.warp(mm, fm, interpolation="label")
    w = np.asarray(_the_variable(wm, "warped").values) != 0
    f = np.asarray(fda.values) != 0
    dice = 2.0 * float((w & f).sum()) / float(w.sum() + f.sum())
    out = {"roundtrip_median_mm": float(np.median(err)), "roundtrip_p95_mm": float(np.percentile(err, 95)),
           "jacobian_min": jmin, "jacobian_max": jmax, "dice": dice}
    if out_png is not None:
        shown = transform.warp(moving_image, fm, interpolation="linear") if moving_image is not None else wm
        _overlay_png(fixed_image if fixed_image is not None else fm, shown, Path(out_png),
                     f"{transform.source} -> {transform.target}  Dice {dice:.3f}")
    return out


def _overlay_png(background: xr.Dataset, warped: xr.Dataset, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    bg = np.asarray(_the_variable(background, "background").values, dtype=np.float32)
    wv = np.asarray(_the_variable(warped, "warped").values, dtype=np.float32)
    centre = [int(v) for v in ndimage.center_of_mass(bg > 0)] if (bg > 0).any() else \
        [n // 2 for n in bg.shape]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax_i, (axis, label) in enumerate(((0, "sagittal"), (1, "coronal"), (2, "axial"))):
        b, wsl = np.take(bg, centre[axis], axis=axis).T, np.take(wv, centre[axis], axis=axis).T
        edges = np.hypot(ndimage.sobel(wsl, 0), ndimage.sobel(wsl, 1))
        thr = np.percentile(edges[edges > 0], 80) if (edges > 0).any() else 1.0
        ax = axes[ax_i]
        ax.imshow(b, cmap="gray", origin="lower")
        ax.imshow(np.ma.masked_less(edges, thr), cmap="autumn", origin="lower", alpha=0.8)
        ax.set_title(label)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
