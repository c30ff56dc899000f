"""atlasbuilder: build probabilistic cytoarchitectonic brain atlases and query them.

The public face is light: importing it loads none of torch, ANTs, siibra, dask or plotting.

>>> import atlasbuilder
>>> atlas = atlasbuilder.load_atlas("my-atlas")                # doctest: +SKIP
>>> atlas.query([[-10, -90, 0]], space="MNI152NLin6Asym")       # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    AtlasBuilderError,
    AtlasDirectoryError,
    GridMismatchError,
    InputError,
    InvalidImageError,
    ManifestError,
    MissingFileError,
    OutputExistsError,
    StageError,
    UnknownRegionError,
    UnknownSpaceError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .atlas import Atlas, load_atlas
    from .importing import import_atlas
    from .manifest import load_manifest
    from .pipeline import build
    from .regions import Region, RegionTree, load_hierarchy
    from .spaces import get_space

__all__ = [
    "Atlas",
    "AtlasBuilderError",
    "AtlasDirectoryError",
    "GridMismatchError",
    "InputError",
    "InvalidImageError",
    "ManifestError",
    "MissingFileError",
    "OutputExistsError",
    "Region",
    "RegionTree",
    "StageError",
    "UnknownRegionError",
    "UnknownSpaceError",
    "__version__",
    "build",
    "get_space",
    "import_atlas",
    "load_atlas",
    "load_hierarchy",
    "load_manifest",
]

_LAZY = {
    "Atlas": "atlas", "load_atlas": "atlas", "import_atlas": "importing",
    "load_manifest": "manifest", "build": "pipeline", "Region": "regions",
    "RegionTree": "regions", "load_hierarchy": "regions", "get_space": "spaces",
}


def __getattr__(name: str) -> Any:
    # numpy/xarray/zarr load only when an atlas is used, keeping `atlasbuilder --help` fast
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'atlasbuilder' has no attribute {name!r}")
