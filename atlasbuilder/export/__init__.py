"""Files other tools open: NIfTI bundles, siibra configurations and the web viewer.

* :func:`~atlasbuilder.export.nifti.export_nifti` writes ``maps/<space>/`` (one NIfTI per area, a
  4-D stack, the MPM with TSV and FSL XML label tables) for FSL, nilearn, MRIcroGL and FSLeyes;
* :func:`~atlasbuilder.export.siibra.write_siibra_configuration` writes a siibra configuration
  that ``siibra.use_configuration`` loads offline;
* :func:`~atlasbuilder.export.viewer.serve_viewer` serves a NiiVue page on 127.0.0.1.

Nothing heavy is imported here: each function imports what it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["export_nifti", "serve_viewer", "write_siibra_configuration"]

if TYPE_CHECKING:
    from .nifti import export_nifti
    from .siibra import write_siibra_configuration
    from .viewer import serve_viewer


def __getattr__(name: str) -> Any:
    if name == "export_nifti":
        from .nifti import export_nifti

        return export_nifti
    if name == "write_siibra_configuration":
        from .siibra import write_siibra_configuration

        return write_siibra_configuration
    if name == "serve_viewer":
        from .viewer import serve_viewer

        return serve_viewer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
