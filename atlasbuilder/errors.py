"""One error hierarchy for atlasbuilder.

Every error raised on purpose by atlasbuilder is an :class:`AtlasBuilderError` and also a fitting
built-in exception, so callers can catch either. Each carries the exit code the command line uses:
2 for bad input or usage (the user can fix it), 1 for a failure while doing the work.

Messages say what was expected, what was found, and where (file, manifest key, subject, section).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AtlasBuilderError",
    "AtlasDirectoryError",
    "GridMismatchError",
    "InputError",
    "InvalidImageError",
    "ManifestError",
    "MissingFileError",
    "OutputExistsError",
    "StageError",
    "UnknownRegionError",
    "UnknownSpaceError",
]


class AtlasBuilderError(Exception):
    """Base of all atlasbuilder errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(AtlasBuilderError, ValueError):
    """Bad input: a file, a parameter or a manifest the user can correct (exit code 2)."""

    exit_code = 2


class MissingFileError(InputError, FileNotFoundError):
    """A file or directory that should exist does not."""

    def __init__(self, path: object, what: str = "file") -> None:
        self.path = str(path)
        super().__init__(f"{what} not found: {path}")

    def __str__(self) -> str:  # FileNotFoundError would otherwise format (errno, strerror)
        return str(self.args[0])


class InvalidImageError(InputError):
    """An image that cannot be read or does not have the expected shape or content."""


class ManifestError(InputError):
    """A manifest with one or more problems; ``problems`` lists them all (each with its location)."""

    def __init__(self, path: object, problems: Sequence[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{path}: {n} problem{'s' if n != 1 else ''} in manifest"
        super().__init__(head + ("\n  " + "\n  ".join(self.problems) if self.problems else ""))


class UnknownSpaceError(InputError, LookupError):
    """A space name that is not registered; the message suggests close names."""


class UnknownRegionError(InputError, LookupError):
    """A region query that matched nothing (or several); ``suggestions`` are ranked candidates."""

    def __init__(self, message: str, suggestions: Sequence[str] = ()) -> None:
        self.suggestions = list(suggestions)
        if self.suggestions:
            message += "; did you mean: " + ", ".join(repr(s) for s in self.suggestions) + "?"
        super().__init__(message)


class GridMismatchError(InputError):
    """Volumes on different grids or in different spaces were about to be combined."""


class AtlasDirectoryError(InputError):
    """An atlas directory that is missing, incomplete or of an unknown format."""


class OutputExistsError(InputError, FileExistsError):
    """The output exists and overwriting was not asked for (or another build holds its lock)."""

    def __str__(self) -> str:
        return str(self.args[0])


class StageError(AtlasBuilderError, RuntimeError):
    """A pipeline stage failed while working (names the stage, subject and section)."""
