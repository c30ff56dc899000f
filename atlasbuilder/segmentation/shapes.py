"""The network's input geometry, without torch: what the settings check when they are made.

:class:`~.stage.StageSettings` checks its prediction window when it is created, and the build
resolves the stage's settings while it plans (even a fully cached rebuild), so this must not
import torch; :mod:`.networks` re-exports both names.
"""

from __future__ import annotations

from ..errors import InputError

__all__ = ["INPUT_MODES", "input_multiple"]

INPUT_MODES = ("average", "unshuffle")


def input_multiple(depth: int, input_pool: int, input_mode: str) -> int:
    """What a patch side must be a multiple of for this network input (``input_pool`` x
    ``2**(depth - 1)``), after checking ``input_pool`` and ``input_mode``.

    Raises
    ------
    InputError
        ``input_pool`` below 1 or an unknown ``input_mode``.
    """
    if int(input_pool) < 1:
        raise InputError(f"input_pool must be at least 1, got {input_pool!r}")
    if input_mode not in INPUT_MODES:
        raise InputError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
    return 2 ** (int(depth) - 1) * int(input_pool)
