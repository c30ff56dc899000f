"""NIfTI bundle of an atlas: the files FSL, nilearn, MRIcroGL and FSLeyes open directly.

Layout written by :func:`export_nifti` (one folder per space with maps)::

    maps/<space>/pmaps/<region-key>.nii.gz   one probability map per area (float32, 0..1)
    maps/<space>/pmaps.nii.gz                all of them as one 4-D image (volume i = row i of pmaps.tsv)
    maps/<space>/pmaps.tsv                   volume, index (region id), key, name
    maps/<space>/mpm.nii.gz                  maximum probability map (int32 region id, 0 = none)
    maps/<space>/mpm.tsv                     index (the value in mpm.nii.gz), key, name
    maps/<space>/mpm.xml                     the same labels in FSL's atlas XML format (type Label)

The names follow the demo cohort's truth layout, so a build can be compared with its truth file by
file. Images are RAS+ with a diagonal affine (qform = sform, code 1 "scanner"), so every reader
places them identically. Probabilities are ``stored value / divisor`` as float32, the same numbers
:meth:`atlasbuilder.Atlas.probabilities_at` returns (to float32 precision).

Example
-------
>>> out = export_nifti("juelich")                                   # doctest: +SKIP
>>> sorted(p.name for p in (out / "MNI152NLin6Asym").iterdir())     # doctest: +SKIP
['mpm.nii.gz', 'mpm.tsv', 'mpm.xml', 'pmaps', 'pmaps.nii.gz', 'pmaps.tsv']
"""

from __future__ import annotations

import gzip
import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atlas import Atlas, load_atlas
from ..errors import InputError, OutputExistsError
from ..regions import Region
from ..storage import atomic_directory, atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import nibabel as nib

    from ..volumes import Grid

__all__ = ["export_nifti", "fsl_label_xml", "nifti_bytes", "write_space_bundle"]

GZIP_LEVEL = 4  # a good size/speed trade-off for smooth probability maps
MARKER = ".atlasbuilder-export"  # marks a folder an export may replace


def check_replaceable(target: Path, what: str) -> None:
    """Refuse to replace a non-empty folder that no atlasbuilder export wrote.

    Raises
    ------
    OutputExistsError
        ``target`` exists, is not empty and has no export marker.
    """
    if target.exists() and (not target.is_dir() or (any(target.iterdir())
                                                    and not (target / MARKER).is_file())):
        raise OutputExistsError(
            f"output {target} exists and was not written by an atlasbuilder {what} export; "
            "choose an empty or new folder"
        )


def write_marker(directory: Path, what: str, atlas: Atlas) -> None:
    """Write the marker that lets a later export replace ``directory``."""
    atomic_write_text(directory / MARKER, json.dumps(
        {"export": what, "atlas": str(atlas.path.absolute()), "name": atlas.name}) + "\n")


def _as_atlas(atlas: str | Path | Atlas) -> Atlas:
    return atlas if isinstance(atlas, Atlas) else load_atlas(atlas)


def nifti_bytes(
    data: np.ndarray, grid: Grid, *, intent: str | None = None, compresslevel: int = GZIP_LEVEL
) -> bytes:
    """A gzipped NIfTI-1 image of ``data`` (x, y, z[, volume]) on ``grid``, byte-for-byte
    reproducible (no time stamp in the gzip header).

    Parameters
    ----------
    data
        Voxel values, x fastest in RAS+ order as :class:`~atlasbuilder.volumes.Grid` describes.
    grid
        The voxel grid (gives the affine).
    intent
        NIfTI intent name stored in the header (``"label"`` for label images), or None.
    compresslevel
        gzip level (1 fastest .. 9 smallest).
    """
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), grid.affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(grid.affine, code=1)
    img.header.set_sform(grid.affine, code=1)
    if intent == "label":
        img.header.set_intent("label")
    return gzip.compress(img.to_bytes(), compresslevel=compresslevel, mtime=0)


def _tsv(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    def cell(v: object) -> str:
        return str(v).replace("\t", " ").replace("\n", " ")

    return "".join("\t".join(cell(v) for v in row) + "\n" for row in [header, *rows])


def fsl_label_xml(
    name: str,
    labels: Sequence[tuple[int, str]],
    centres_vox: dict[int, tuple[int, int, int]],
    *,
    image: str = "/mpm",
    shortname: str | None = None,
) -> str:
    """An FSL atlas description (``<atlas>`` XML) of a label image.

    Parameters
    ----------
    name
        Atlas name shown by FSLeyes / atlasquery.
    labels
        ``(value, label name)`` pairs; ``value`` is the voxel value in the label image (FSL's
        ``index`` of a *Label* atlas).
    centres_vox
        A voxel inside each label (FSL's ``x``, ``y``, ``z`` attributes, voxel indices); labels
        missing here get 0, 0, 0.
    image
        The image path as FSL writes it: relative to the XML's folder, without extension.
    shortname
        Short name (default: ``name`` without spaces).
    """
    root = ET.Element("atlas", version="1.0")
    header = ET.SubElement(root, "header")
    ET.SubElement(header, "name").text = name
    ET.SubElement(header, "shortname").text = shortname or "".join(name.split())
    ET.SubElement(header, "type").text = "Label"
    images = ET.SubElement(header, "images")
    ET.SubElement(images, "imagefile").text = image
    ET.SubElement(images, "summaryimagefile").text = image
    data = ET.SubElement(root, "data")
    for value, label in labels:
        x, y, z = centres_vox.get(value, (0, 0, 0))
        el = ET.SubElement(data, "label", index=str(value), x=str(x), y=str(y), z=str(z))
        el.text = label
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _label_centres(mpm: np.ndarray, ids: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """For each id, the MPM voxel of that id nearest to its centre of mass (a voxel inside the
    label even for curved areas)."""
    out: dict[int, tuple[int, int, int]] = {}
    for i in ids:
        vox = np.argwhere(mpm == i)
        if len(vox) == 0:
            continue
        com = vox.mean(axis=0)
        best = vox[np.argmin(((vox - com) ** 2).sum(axis=1))]
        out[int(i)] = (int(best[0]), int(best[1]), int(best[2]))
    return out


def write_space_bundle(atlas: Atlas, space: str, directory: Path, *, stack: bool = True) -> Path:
    """Write one space's NIfTI files and label tables into ``directory`` (created).

    ``stack=False`` leaves out the 4-D ``pmaps.nii.gz`` (the siibra export does not need it).

    Returns
    -------
    Path
        ``directory``.
    """
    sm = atlas.space_maps(space)
    directory.mkdir(parents=True, exist_ok=True)
    regions: list[Region] = atlas.map_regions(sm.space)
    stored = np.asarray(atlas.maps(sm.space)["pmaps"].values)
    # float32(value) / float32(divisor): what a float32 reader of the stored value would compute
    probs = stored.astype(np.float32) / np.float32(sm.divisor)
    (directory / "pmaps").mkdir(exist_ok=True)
    for i, r in enumerate(regions):
        atomic_write_bytes(directory / "pmaps" / f"{r.key}.nii.gz", nifti_bytes(probs[i], sm.grid))
    if stack:
        atomic_write_bytes(directory / "pmaps.nii.gz",
                           nifti_bytes(np.moveaxis(probs, 0, -1), sm.grid))
    del probs
    atomic_write_text(directory / "pmaps.tsv", _tsv(
        [(i, r.id, r.key, r.name) for i, r in enumerate(regions)], ("volume", "index", "key", "name")))
    mpm = np.asarray(atlas.mpm(sm.space).values).astype(np.int32)
    atomic_write_bytes(directory / "mpm.nii.gz", nifti_bytes(mpm, sm.grid, intent="label"))
    present = set(np.unique(mpm).tolist()) - {0}
    unknown = present - {r.id for r in regions}
    if unknown:
        raise InputError(
            f"{atlas.path}: the MPM of {sm.space} holds region ids {sorted(unknown)} that have no map"
        )
    atomic_write_text(directory / "mpm.tsv", _tsv(
        [(r.id, r.key, r.name) for r in regions], ("index", "key", "name")))
    atomic_write_text(directory / "mpm.xml", fsl_label_xml(
        f"{atlas.name} {atlas.version} MPM ({sm.space})".replace("  ", " "),
        [(r.id, r.name) for r in regions], _label_centres(mpm, [r.id for r in regions])))
    return directory


def export_nifti(
    atlas_dir: str | Path | Atlas,
    out: str | Path | None = None,
    *,
    spaces: Sequence[str] | None = None,
) -> Path:
    """Write the NIfTI bundle of an atlas: per space, one file per area, a 4-D stack, the MPM
    and their label tables (TSV and FSL XML).

    The bundle is assembled under a temporary name and renamed into place, so ``out`` is either
    the previous bundle or the complete new one; an existing bundle is replaced, any other
    non-empty folder is refused.

    Parameters
    ----------
    atlas_dir
        Atlas directory (or an opened :class:`~atlasbuilder.Atlas`).
    out
        Output folder (default ``<atlas>/maps``).
    spaces
        Spaces to export (default: every space with maps).

    Returns
    -------
    Path
        The bundle folder, holding one sub-folder per space.

    Raises
    ------
    AtlasDirectoryError
        Not an atlas directory, or it has no maps (in a requested space).
    UnknownSpaceError
        A requested space name is unknown.
    OutputExistsError
        ``out`` is a non-empty folder that no NIfTI export wrote.
    """
    atlas = _as_atlas(atlas_dir)
    names = [atlas.space_maps(s).space for s in (spaces if spaces is not None else atlas.spaces)]
    if not names:
        atlas.space_maps(None)  # raises the "no maps yet" error
    target = Path(out) if out is not None else atlas.path / "maps"
    check_replaceable(target, "NIfTI")
    with atomic_directory(target, overwrite=True) as tmp:
        for name in names:
            write_space_bundle(atlas, name, tmp / name)
        write_marker(tmp, "nifti", atlas)
    return target.absolute()


def read_label_table(path: str | Path) -> dict[int, str]:
    """``index -> key`` of a ``mpm.tsv`` or ``pmaps.tsv`` written by this module."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    head = lines[0].split("\t")
    ii, ki = head.index("index"), head.index("key")
    return {int(cols[ii]): cols[ki] for cols in (ln.split("\t") for ln in lines[1:] if ln)}


def load_bundle_image(path: str | Path) -> nib.Nifti1Image:
    """Open one image of a bundle with nibabel (a convenience for tests and notebooks)."""
    import nibabel as nib

    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image):
        raise InputError(f"{path}: not a NIfTI-1 image")
    return img
