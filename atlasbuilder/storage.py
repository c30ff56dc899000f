"""Safe writing: atomic files and directories, and a lock for output directories.

Nothing half-written is ever visible under its final name: files are written to a temporary name
in the same directory and renamed (``os.replace`` is atomic on POSIX); whole output directories
are assembled under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OutputExistsError

__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_text",
    "directory_lock",
    "sha256_file",
]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name; rename it to ``path`` only on success.

    Yields the temporary directory to fill. If the block raises, the temporary directory is
    removed and ``path`` is untouched. An existing non-empty ``path`` is an error unless
    ``overwrite`` is true, in which case it is replaced only after the new one is complete.

    Raises
    ------
    OutputExistsError
        ``path`` exists, is not empty, and ``overwrite`` is false.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise OutputExistsError(
            f"output {path} already exists and is not empty (use --force to replace it)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


@contextlib.contextmanager
def directory_lock(directory: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (``.lock`` file, ``fcntl.flock``).

    The lock dies with the process (kill -9 included), so a crashed build never leaves a stale
    lock behind.

    Raises
    ------
    OutputExistsError
        Another process holds the lock.
    """
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / ".lock"
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise OutputExistsError(
                f"{directory} is being written by {holder}; wait for it or choose another -o"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield lock_path
    finally:
        fh.close()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def nifti_gz_bytes(img: Any) -> bytes:
    """Gzipped NIfTI bytes with no timestamp: the same volume always gives the same file."""
    import gzip
    import io

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=1) as gz:
        gz.write(img.to_bytes())
    return buf.getvalue()


def package_versions(*packages: str, python: bool = False) -> dict[str, str]:
    """Installed versions of ``packages`` (``"not installed"`` for missing ones), for the provenance
    records every stage writes; ``python=True`` adds the interpreter's version."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()} if python else {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
