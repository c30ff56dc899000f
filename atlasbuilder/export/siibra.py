"""An atlas as a siibra configuration that ``siibra.use_configuration`` loads offline.

Layout written by :func:`write_siibra_configuration` (default ``<atlas>/siibra/``)::

    atlases/<slug>.json                      the atlas: its spaces and its parcellation
    spaces/<space>.json                      one per space with maps; the template by absolute path
    parcellations/<slug>.json                the region hierarchy (names, short names, colours)
    maps/<slug>-<space>-labelled.json        the MPM (label = region id)
    maps/<slug>-<space>-statistical.json     the probability maps (one volume per area)
    nifti/<space>/...                        the NIfTI files the maps point to (see export.nifti)

siibra reads images only from absolute paths (a relative path would be taken for a URL), so the
configuration is written for where it lives: move the folder and write it again (``atlasbuilder
export siibra DIR --to PATH``). Nothing in it points to the network.

Use it with::

    import siibra
    siibra.use_configuration("/path/to/atlas/siibra")    # before touching any siibra registry
    mpm = siibra.get_map("<atlas name>", "<space>", "labelled")
    mpm.assign(siibra.Point((-10, -90, 0), space="<space>"))

Example
-------
>>> write_siibra_configuration("juelich")                # doctest: +SKIP
PosixPath('/.../juelich/siibra')
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atlas import Atlas, load_atlas
from ..errors import InputError, MissingFileError
from ..regions import Region
from ..spaces import get_space
from ..storage import atomic_directory, atomic_write_text
from .nifti import check_replaceable, write_marker, write_space_bundle

__all__ = ["parcellation_name", "space_id", "write_siibra_configuration"]

SPECIES = "Homo sapiens"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "atlas"


def parcellation_name(atlas: Atlas) -> str:
    """The parcellation's name in siibra (the atlas name, with its version if it has one)."""
    return f"{atlas.name} {atlas.version}".strip() if atlas.version else atlas.name


def space_id(atlas: Atlas, space: str) -> str:
    """The ``@id`` of a space in the exported configuration.

    Spaces are namespaced by atlas so that two exported atlases can be loaded side by side.
    """
    return f"atlasbuilder/{_slug(atlas.name)}/space/{space}"


def _parcellation_id(atlas: Atlas) -> str:
    return f"atlasbuilder/{_slug(atlas.name)}/parcellation/{_slug(atlas.version or 'v')}"


def _rgb(colour: str) -> str | None:
    """The colour as siibra reads it (``"#rrggbb"``), or None."""
    return colour.lower() if re.fullmatch(r"#[0-9a-fA-F]{6}", colour or "") else None


def _region_spec(atlas: Atlas, region: Region) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": region.name, "shortname": region.key,
                            "description": f"atlasbuilder region {region.key} (id {region.id})"}
    rgb = _rgb(region.colour)
    if rgb is not None:
        spec["rgb"] = rgb
    children = atlas.regions.children(region)
    if children:
        spec["children"] = [_region_spec(atlas, c) for c in children]
    return spec


def _template_path(atlas: Atlas, space: str) -> Path:
    """The template of a space: the atlas's spaces.json entry, else the built-in space's."""
    doc = atlas.path / "spaces.json"
    if doc.is_file():
        for entry in json.loads(doc.read_text(encoding="utf-8")):
            if entry.get("name") == space and entry.get("template"):
                p = Path(entry["template"])
                if not p.is_absolute():
                    p = atlas.path / p
                if p.is_file():
                    return p.absolute()
    return get_space(space).template_path().absolute()


def _volume(path: Path, space_ref: str) -> dict[str, Any]:
    return {"@type": "siibra/volume/v0.0.1", "space": {"@id": space_ref},
            "providers": {"nii": str(path)}}


def _check_unique_names(regions: Sequence[Region]) -> None:
    seen: dict[str, str] = {}
    for r in regions:
        k = r.name.lower()
        if k in seen:
            raise InputError(
                f"regions {seen[k]!r} and {r.key!r} share the name {r.name!r}; siibra matches "
                "regions by name, so names must be unique to export a siibra configuration"
            )
        seen[k] = r.key


def write_siibra_configuration(
    atlas_dir: str | Path | Atlas,
    out_dir: str | Path | None = None,
    *,
    spaces: Sequence[str] | None = None,
) -> Path:
    """Write a siibra configuration of an atlas (spaces, parcellation, labelled and statistical
    maps) with absolute paths to its NIfTI files, which it writes alongside.

    The folder is assembled under a temporary name and renamed into place (an existing one is
    replaced), so siibra never sees half a configuration.

    Parameters
    ----------
    atlas_dir
        Atlas directory (or an opened :class:`~atlasbuilder.Atlas`).
    out_dir
        Where the configuration goes (default ``<atlas>/siibra``). Paths inside point here.
    spaces
        Spaces to export (default: every space with maps).

    Returns
    -------
    Path
        The absolute configuration folder, ready for ``siibra.use_configuration``.

    Raises
    ------
    AtlasDirectoryError
        Not an atlas directory, or no maps (in a requested space).
    MissingFileError
        A space's template file is missing.
    InputError
        Two regions share a name (siibra identifies regions by name).
    OutputExistsError
        ``out_dir`` is a non-empty folder that no siibra export wrote.
    """
    atlas = load_atlas(atlas_dir) if not isinstance(atlas_dir, Atlas) else atlas_dir
    names = [atlas.space_maps(s).space for s in (spaces if spaces is not None else atlas.spaces)]
    if not names:
        atlas.space_maps(None)
    target = (Path(out_dir) if out_dir is not None else atlas.path / "siibra").absolute()
    check_replaceable(target, "siibra")
    _check_unique_names(list(atlas.regions))
    templates = {}
    for s in names:
        try:
            templates[s] = _template_path(atlas, s)
        except InputError as exc:
            raise MissingFileError(s, f"template of space {s} ({exc})") from None
    slug = _slug(atlas.name)
    pname = parcellation_name(atlas)
    pid = _parcellation_id(atlas)
    with atomic_directory(target, overwrite=True) as tmp:
        for folder in ("atlases", "spaces", "parcellations", "maps"):
            (tmp / folder).mkdir()
        for s in names:
            sid = space_id(atlas, s)
            write_space_bundle(atlas, s, tmp / "nifti" / s, stack=False)
            final = target / "nifti" / s  # where the files will be once renamed into place
            _write_json(tmp / "spaces" / f"{_slug(s)}.json", {
                "@id": sid,
                "@type": "siibra/space/v0.0.1",
                "name": f"{s} ({atlas.name})",
                "shortName": s,
                "species": SPECIES,
                "modality": "T1-weighted MRI" if s.startswith("MNI") else "template",
                "description": _space_description(s),
                "volumes": [_volume(templates[s], sid)],
            })
            regions = atlas.map_regions(s)
            _write_json(tmp / "maps" / f"{slug}-{_slug(s)}-labelled.json", {
                "@id": f"siibra-map-v0.0.1_{slug}-{_slug(s)}-labelled",
                "@type": "siibra/map/v0.0.1",
                "name": f"{pname} maximum probability map in {s}",
                "shortName": f"{atlas.name} MPM",
                "space": {"@id": sid},
                "parcellation": {"@id": pid},
                "indices": {r.name: [{"volume": 0, "label": r.id}] for r in regions},
                "volumes": [_volume(final / "mpm.nii.gz", sid)],
            })
            _write_json(tmp / "maps" / f"{slug}-{_slug(s)}-statistical.json", {
                "@id": f"siibra-map-v0.0.1_{slug}-{_slug(s)}-statistical",
                "@type": "siibra/map/v0.0.1",
                "name": f"{pname} probability maps in {s}",
                "shortName": f"{atlas.name} pmaps",
                "space": {"@id": sid},
                "parcellation": {"@id": pid},
                "indices": {r.name: [{"volume": i}] for i, r in enumerate(regions)},
                "volumes": [_volume(final / "pmaps" / f"{r.key}.nii.gz", sid) for r in regions],
            })
        _write_json(tmp / "parcellations" / f"{slug}.json", {
            "@id": pid,
            "@type": "siibra/parcellation/v0.0.1",
            "name": pname,
            "shortName": atlas.name,
            "species": SPECIES,
            "modality": "cytoarchitecture",
            "description": (f"Probabilistic cytoarchitectonic atlas {pname} exported by "
                            f"atlasbuilder from {atlas.path.absolute()}"),
            "regions": [_region_spec(atlas, r) for r in atlas.regions.roots()],
        })
        _write_json(tmp / "atlases" / f"{slug}.json", {
            "@id": f"atlasbuilder/{slug}/atlas",
            "@type": "juelich/iav/atlas/v1.0.0",
            "name": f"{atlas.name} (atlasbuilder)",
            "species": SPECIES,
            "spaces": [space_id(atlas, s) for s in names],
            "parcellations": [pid],
        })
        atomic_write_text(tmp / "README.txt", _readme(atlas, target, pname, names))
        write_marker(tmp, "siibra", atlas)
    return target


def _space_description(space: str) -> str:
    try:
        return get_space(space).description
    except InputError:
        return space


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def _readme(atlas: Atlas, target: Path, pname: str, spaces: Sequence[str]) -> str:
    s0 = spaces[0]
    return (
        f"siibra configuration of the atlas {atlas.name!r}, written by atlasbuilder.\n"
        f"NIfTI paths inside are absolute (for {target}); after moving this folder, run\n"
        f"  atlasbuilder export siibra {atlas.path.absolute()} --to NEW_PATH\n\n"
        "  import siibra\n"
        f"  siibra.use_configuration({str(target)!r})\n"
        f"  m = siibra.get_map({pname!r}, {space_id(atlas, s0)!r}, 'labelled')\n"
        f"  m.assign(siibra.Point((0, 0, 0), space={space_id(atlas, s0)!r}))\n"
    )
