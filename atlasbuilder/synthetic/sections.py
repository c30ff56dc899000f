"""Cutting a 3-D phantom brain into serial sections, and writing images like real data.

Geometry of a coronal section (written down once, used by the truth files):

* section ``k`` lies in the plane ``y = y_k`` (subject mm, RAS);
* pixel ``(row, col)`` of the *clean* section is at ``x = x0 + col * px`` and
  ``z = z0 - row * px`` (rows run from superior to inferior, columns from left to right), so an
  image shows the section as seen from behind the brain — the usual view of occipital sections;
* the stored image is the clean section after its artefacts: the misplacement maps clean pixel
  ``p`` to image pixel ``forward(p)`` (see :class:`~atlasbuilder.synthetic.histology.SectionTransform`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..storage import atomic_write_bytes

__all__ = ["SectionGeometry", "cut_plane", "read_pixel_size_um", "write_png", "write_tiff"]


@dataclass(frozen=True)
class SectionGeometry:
    """Where the pixels of a stack's clean coronal sections lie in subject space (mm)."""

    x0: float  # x of column 0
    z0: float  # z of row 0 (the top row)
    pixel_size_mm: float
    shape: tuple[int, int]  # rows, cols

    def pixel_to_mm(self, rows: np.ndarray, cols: np.ndarray, y: float) -> np.ndarray:
        """Subject RAS mm of clean-section pixels (``(n, 3)``)."""
        rows = np.asarray(rows, dtype=float)
        cols = np.asarray(cols, dtype=float)
        return np.stack([self.x0 + cols * self.pixel_size_mm, np.full(rows.shape, float(y)),
                         self.z0 - rows * self.pixel_size_mm], axis=-1)

    def mm_to_pixel(self, points_mm: np.ndarray) -> np.ndarray:
        """Clean-section ``(row, col)`` of subject points (their y is ignored)."""
        p = np.atleast_2d(np.asarray(points_mm, dtype=float))
        return np.stack([(self.z0 - p[:, 2]) / self.pixel_size_mm,
                         (p[:, 0] - self.x0) / self.pixel_size_mm], axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {"x0_mm": self.x0, "z0_mm": self.z0, "pixel_size_mm": self.pixel_size_mm,
                "shape": list(self.shape)}


def cut_plane(volume: np.ndarray, affine: np.ndarray, geom: SectionGeometry, y: float, *,
              order: int = 0, cval: float = 0.0) -> np.ndarray:
    """Sample a RAS volume (voxel -> mm ``affine``, axis aligned) on the section plane ``y``."""
    from scipy import ndimage

    rows, cols = geom.shape
    # voxel coordinates are separable for an axis-aligned affine: build them per axis
    xs = geom.x0 + np.arange(cols) * geom.pixel_size_mm
    zs = geom.z0 - np.arange(rows) * geom.pixel_size_mm
    vx = (xs - affine[0, 3]) / affine[0, 0]
    vy = (y - affine[1, 3]) / affine[1, 1]
    vz = (zs - affine[2, 3]) / affine[2, 2]
    coords = np.empty((3, rows, cols), dtype=np.float64)
    coords[0] = vx[None, :]
    coords[1] = vy
    coords[2] = vz[:, None]
    out = ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=cval,
                                  prefilter=False)
    return out.astype(volume.dtype, copy=False)


def write_tiff(path: Path, image: np.ndarray, pixel_size_mm: float, **meta: Any) -> None:
    """A TIFF with its pixel size in the resolution tags (pixels per cm) and a JSON description.

    Written to a temporary name and renamed (atomic).
    """
    import io

    import tifffile

    buf = io.BytesIO()
    per_cm = 10.0 / pixel_size_mm
    description = json.dumps({"pixel_size_um": pixel_size_mm * 1000, **meta}, sort_keys=True)
    # datetime=False and a fixed software tag keep the bytes identical for identical content
    tifffile.imwrite(buf, image, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                     description=description, metadata=None, software="atlasbuilder",
                     datetime=False, compression="zlib", compressionargs={"level": 3})
    atomic_write_bytes(path, buf.getvalue())


def write_png(path: Path, image: np.ndarray, pixel_size_mm: float) -> None:
    """A PNG (8- or 16-bit grey) with its pixel size in the pHYs chunk (pixels per metre)."""
    import io

    from PIL import Image

    mode = "I;16" if image.dtype == np.uint16 else "L"
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG label images must be uint8 or uint16, got {image.dtype}")
    img = Image.fromarray(image, mode=mode)
    buf = io.BytesIO()
    dpi = 25.4 / pixel_size_mm
    img.save(buf, format="PNG", dpi=(dpi, dpi), optimize=False)
    atomic_write_bytes(path, buf.getvalue())


def read_pixel_size_um(path: Path) -> float | None:
    """The pixel size a TIFF/PNG written above records (µm), or None when it records none."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            page: Any = tf.pages[0]
            try:
                desc = json.loads(page.description)
                return float(desc["pixel_size_um"])
            except (ValueError, KeyError, TypeError):
                pass
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                num, den = tags["XResolution"].value
                unit = int(tags["ResolutionUnit"].value)
                per = num / den
                if per > 0 and unit == 3:
                    return 1e4 / per
                if per > 0 and unit == 2:
                    return 25400 / per
        return None
    from PIL import Image

    with Image.open(path) as img:
        dpi = img.info.get("dpi")
    return 25400 / float(dpi[0]) if dpi and dpi[0] else None
