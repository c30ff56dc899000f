"""The volume convention: NIfTI at the edges, checked ``xarray.Dataset`` inside.

A volume is an :class:`xarray.Dataset` with one data variable on dims ``("x", "y", "z")`` (a
leading ``"region"`` dim for stacks of maps), 1-D coordinates at voxel centres in mm, RAS+, and the
attributes ``space`` (the reference space's canonical name), ``source`` (where it came from) and
``source_affine`` (the original NIfTI affine, as provenance).

NIfTI files in any axis-aligned orientation are reoriented to RAS+ without resampling. An affine
with rotation or shear cannot be described by 1-D coordinates: it is rejected unless the caller
asks to ``resample`` it onto an axis-aligned grid.

Example
-------
>>> vol = read_nifti("t1.nii.gz", space="MNI152NLin2009cAsym")       # doctest: +SKIP
>>> float(vol.image.sel(x=0, y=-20, z=10, method="nearest"))          # doctest: +SKIP
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import GridMismatchError, InputError, InvalidImageError, MissingFileError

if TYPE_CHECKING:
    import nibabel as nib
    import xarray as xr

__all__ = [
    "Grid",
    "check_same_grid",
    "from_array",
    "grid_of",
    "load_nifti",
    "nearest_voxel",
    "read_nifti",
    "to_nifti",
]

_ROT_TOL = 1e-4  # mm: off-diagonal affine terms above this mean rotation/shear


@dataclass(frozen=True)
class Grid:
    """An axis-aligned RAS+ voxel grid: ``shape`` and voxel-centre coordinates of voxel 0 and
    the spacing (mm) along x, y, z."""

    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel -> RAS mm affine."""
        a = np.eye(4)
        a[:3, :3] = np.diag(self.spacing)
        a[:3, 3] = self.origin
        return a

    def coords(self) -> dict[str, np.ndarray]:
        """Voxel-centre coordinates (mm) along x, y and z."""
        return {
            ax: o + s * np.arange(n)
            for ax, o, s, n in zip("xyz", self.origin, self.spacing, self.shape, strict=True)
        }

    def xarray_coords(self) -> dict[str, Any]:
        """:meth:`coords` as xarray variables that keep the spacing as an attribute, so an axis
        of a single voxel (one section, say) still knows its thickness."""
        import xarray as xr

        return {ax: xr.Variable((ax,), c, attrs={"units": "mm", "spacing": s})
                for (ax, c), s in zip(self.coords().items(), self.spacing, strict=True)}

    def nearest_voxel(self, points_mm: Any) -> tuple[np.ndarray, np.ndarray]:
        """Nearest voxel of each point and whether it lies in the volume.

        Parameters
        ----------
        points_mm
            ``(n, 3)`` (or ``(3,)``) RAS mm coordinates in this grid's space.

        Returns
        -------
        index : ndarray of int64, shape (n, 3)
            Voxel indices (clipped into range for points outside; use ``inside`` to mask them).
        inside : ndarray of bool, shape (n,)
            True where the nearest voxel centre is within the volume. A point exactly half-way
            between two voxel centres goes to the higher index. NaN coordinates are outside.
        """
        pts = np.asarray(points_mm, dtype=np.float64)
        if pts.ndim == 1 and pts.shape == (3,):
            pts = pts[None]
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise InputError(f"points must have shape (n, 3) or (3,); got {pts.shape}")
        f = (pts - np.asarray(self.origin)) / np.asarray(self.spacing)
        # floor(f + 0.5): half-way rounds up, consistently (np.round would round half to even)
        with np.errstate(invalid="ignore"):
            idx_f = np.floor(f + 0.5)
            inside = np.all((idx_f >= 0) & (idx_f < np.asarray(self.shape)), axis=1)
        idx = np.where(np.isfinite(idx_f), idx_f, 0).astype(np.int64)
        np.clip(idx, 0, np.asarray(self.shape) - 1, out=idx)
        return idx, inside


def grid_of(obj: xr.Dataset | xr.DataArray) -> Grid:
    """The :class:`Grid` of a volume (checks that coordinates are uniformly spaced)."""
    shape, origin, spacing = [], [], []
    for ax in "xyz":
        if ax not in obj.coords:
            raise GridMismatchError(f"volume has no {ax!r} coordinate (dims {tuple(obj.dims)})")
        c = np.asarray(obj.coords[ax].values, dtype=np.float64)
        if c.ndim != 1 or c.size == 0:
            raise GridMismatchError(f"coordinate {ax!r} must be 1-D and non-empty")
        step = float(c[1] - c[0]) if c.size > 1 else float(obj.coords[ax].attrs.get("spacing", 1.0))
        if c.size > 1 and (step <= 0 or not np.allclose(np.diff(c), step, atol=1e-5 * abs(step))):
            raise GridMismatchError(f"coordinate {ax!r} is not uniformly increasing (RAS+)")
        shape.append(int(c.size))
        origin.append(float(c[0]))
        spacing.append(step)
    return Grid(tuple(shape), tuple(origin), tuple(spacing))  # type: ignore[arg-type]


def load_nifti(source: str | Path | nib.Nifti1Image, *, what: str = "image") -> nib.Nifti1Image:
    """Open a NIfTI file (or pass an image through), with one clear error for every failure.

    The data are read once here so that truncated or corrupt files fail now, naming the file,
    rather than later inside a computation.

    Raises
    ------
    MissingFileError
        The file does not exist.
    InvalidImageError
        Not a NIfTI/readable image, truncated or corrupt.
    """
    import nibabel as nib

    if isinstance(source, nib.spatialimages.SpatialImage):
        return source
    path = Path(source)
    if not path.exists():
        raise MissingFileError(path, what)
    if path.is_dir():
        raise InvalidImageError(f"{path}: is a directory, expected a NIfTI file ({what})")
    try:
        img: Any = nib.load(str(path))
        # read now (once): truncated/corrupt files fail here, naming the file
        data = np.asanyarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidImageError(f"{path}: cannot read {what} as NIfTI ({msg})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InvalidImageError(
            f"{path}: expected a NIfTI image ({what}), got {type(img).__name__}"
        )
    header = img.header.copy()
    header.set_slope_inter(None, None)  # data are already scaled
    return type(img)(data, img.affine, header)


def read_nifti(
    source: str | Path | nib.Nifti1Image,
    space: str,
    *,
    name: str = "image",
    allow_4d: bool = False,
    allow_nan: bool = False,
    resample: bool = False,
    order: int = 1,
    dtype: Any = None,
) -> xr.Dataset:
    """Read a NIfTI file into a checked volume (RAS+, mm coordinates, ``space`` recorded).

    Parameters
    ----------
    source
        Path or nibabel image.
    space
        Name of the space the image is in (recorded; check it with :mod:`atlasbuilder.spaces`).
    name
        Name of the data variable (``image``, ``labels``, ``probability``, ...).
    allow_4d
        Accept a 4-D image; its 4th axis becomes a leading ``region`` dim.
    allow_nan
        Accept NaN/inf values (rejected by default: they poison sums and argmaxes).
    resample
        Resample a rotated/sheared image onto an axis-aligned grid (same voxel size, covering
        the same field of view) instead of rejecting it.
    order
        Interpolation order when resampling (0 for labels, 1 for images and probabilities).
    dtype
        Cast the data to this dtype (default: keep the file's on-disk type, scaling applied).

    Raises
    ------
    MissingFileError, InvalidImageError
        Missing, unreadable, wrong dimensionality, NaNs, or rotated without ``resample``.
    """
    import nibabel as nib

    img = load_nifti(source)
    label = str(source) if not isinstance(source, nib.spatialimages.SpatialImage) else "<image>"
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1 and not allow_4d:
        img = img.slicer[..., 0]
        shape = img.shape
    if len(shape) == 5 and shape[3] == 1 and allow_4d:  # NIfTI "vector" layout
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, :, 0, :], img.affine, img.header)
        shape = img.shape
    want = "3-D or 4-D" if allow_4d else "3-D"
    if len(shape) not in ((3, 4) if allow_4d else (3,)):
        raise InvalidImageError(f"{label}: expected a {want} image, got shape {shape}")
    if min(shape) < 1:
        raise InvalidImageError(f"{label}: image has an empty axis (shape {shape})")
    source_affine = img.affine.copy()
    canon = nib.as_closest_canonical(img)
    aff = canon.affine
    off_diag = aff[:3, :3] - np.diag(np.diag(aff[:3, :3]))
    if np.abs(off_diag).max() > _ROT_TOL or np.any(np.diag(aff[:3, :3]) <= 0):
        if not resample:
            raise InvalidImageError(
                f"{label}: the affine is rotated or sheared, which an axis-aligned RAS grid "
                "cannot represent; pass resample=True (CLI: --resample) to resample it"
            )
        data, grid = _resample_axis_aligned(np.asanyarray(canon.dataobj), aff, order)
    else:
        data = np.asanyarray(canon.dataobj)
        grid = Grid(tuple(int(n) for n in data.shape[:3]),  # type: ignore[arg-type]
                    tuple(float(v) for v in aff[:3, 3]),  # type: ignore[arg-type]
                    tuple(float(v) for v in np.diag(aff[:3, :3])))  # type: ignore[arg-type]
    # check before any cast: NaN cast to an integer type becomes an arbitrary number
    if np.issubdtype(data.dtype, np.floating) and not allow_nan and not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise InvalidImageError(f"{label}: {n_bad} voxels are NaN or infinite")
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return from_array(data, grid, space, name=name, source=label, source_affine=source_affine)


def _resample_axis_aligned(data: np.ndarray, aff: np.ndarray, order: int) -> tuple[np.ndarray, Grid]:
    from scipy import ndimage

    spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    n = np.asarray(data.shape[:3])
    corners = np.array([[i, j, k, 1] for i in (0, n[0] - 1) for j in (0, n[1] - 1)
                        for k in (0, n[2] - 1)], dtype=float)
    world = corners @ aff.T
    lo, hi = world[:, :3].min(axis=0), world[:, :3].max(axis=0)
    vox = float(spacing.min())
    new_shape = np.floor((hi - lo) / vox + 1e-6).astype(int) + 1
    target = np.eye(4)
    target[:3, :3] = np.diag([vox] * 3)
    target[:3, 3] = lo
    m = np.linalg.inv(aff) @ target  # output voxel -> input voxel
    vols = data if data.ndim == 4 else data[..., None]
    out = np.stack([
        ndimage.affine_transform(vols[..., t].astype(np.float32), m[:3, :3], m[:3, 3],
                                 output_shape=tuple(new_shape), order=order, cval=0.0)
        for t in range(vols.shape[3])
    ], axis=-1)
    if data.ndim == 3:
        out = out[..., 0]
    if order == 0 or not np.issubdtype(data.dtype, np.floating):
        out = np.rint(out).astype(data.dtype) if order == 0 else out
    return out, Grid(tuple(int(v) for v in new_shape), tuple(float(v) for v in lo),  # type: ignore[arg-type]
                     (vox, vox, vox))


def from_array(
    data: np.ndarray,
    grid: Grid,
    space: str,
    *,
    name: str = "image",
    source: str = "",
    source_affine: np.ndarray | None = None,
) -> xr.Dataset:
    """Wrap an array (``x, y, z`` or ``x, y, z, region``) on ``grid`` as a checked volume."""
    import xarray as xr

    if data.shape[:3] != grid.shape:
        raise GridMismatchError(f"array shape {data.shape[:3]} does not match grid {grid.shape}")
    if data.ndim == 4:
        arr = np.moveaxis(data, 3, 0)
        dims: tuple[str, ...] = ("region", "x", "y", "z")
    elif data.ndim == 3:
        arr, dims = data, ("x", "y", "z")
    else:
        raise InvalidImageError(f"expected a 3-D or 4-D array, got {data.ndim}-D")
    attrs = {"space": str(space), "source": source,
             "source_affine": (grid.affine if source_affine is None else source_affine).tolist()}
    # attrs on the variable too, so a DataArray taken out of the Dataset keeps its space
    return xr.Dataset({name: (dims, arr, dict(attrs))}, coords=grid.xarray_coords(), attrs=attrs)


def to_nifti(volume: xr.Dataset | xr.DataArray, name: str | None = None) -> nib.Nifti1Image:
    """Write a volume as a NIfTI image (RAS+, diagonal affine; 4-D for a ``region`` stack)."""
    import nibabel as nib
    import xarray as xr

    if isinstance(volume, xr.Dataset):
        if name is None:
            if len(volume.data_vars) != 1:
                raise InvalidImageError(
                    f"dataset has {len(volume.data_vars)} variables; name the one to write"
                )
            name = str(next(iter(volume.data_vars)))
        da = volume[name]
    else:
        da = volume
    grid = grid_of(da)
    order = [d for d in ("x", "y", "z", "region") if d in da.dims]
    if set(order) != set(da.dims):
        raise InvalidImageError(f"unexpected dims {tuple(da.dims)}; expected x, y, z[, region]")
    arr = np.asarray(da.transpose(*order).values)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype in (np.int64, np.uint64):  # NIfTI-1 readers rarely take 64-bit integers
        info = np.iinfo(np.int32)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise InvalidImageError(f"integer values beyond int32 cannot be written to NIfTI ({name})")
        arr = arr.astype(np.int32)
    img = nib.Nifti1Image(arr, grid.affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(grid.affine, code=1)
    img.header.set_sform(grid.affine, code=1)
    return img


def check_same_grid(*volumes: xr.Dataset | xr.DataArray) -> None:
    """Raise unless all volumes are in the same space and on exactly the same grid.

    Raises
    ------
    GridMismatchError
        Names the first difference (space, shape, spacing or origin).
    """
    import xarray as xr

    if len(volumes) < 2:
        return
    first = volumes[0]
    for i, v in enumerate(volumes[1:], start=1):
        s0, s1 = first.attrs.get("space"), v.attrs.get("space")
        if s0 != s1:
            raise GridMismatchError(
                f"volume 0 is in space {s0!r} but volume {i} is in space {s1!r}; "
                "map one into the other's space first"
            )
        g0, g1 = grid_of(first), grid_of(v)
        if g0.shape != g1.shape:
            raise GridMismatchError(f"volume 0 has shape {g0.shape}, volume {i} has {g1.shape}")
    try:
        xr.align(*[v.coords.to_dataset() for v in volumes], join="exact")
    except ValueError as exc:
        raise GridMismatchError(f"volumes are on different grids: {exc}") from None


def nearest_voxel(volume: xr.Dataset | xr.DataArray, points_mm: Any) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-voxel indices of points in a volume; see :meth:`Grid.nearest_voxel`."""
    return grid_of(volume).nearest_voxel(points_mm)
