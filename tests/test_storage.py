"""Tests for atlasbuilder.storage: atomic files and directories, the output lock, hashing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from atlasbuilder import storage
from atlasbuilder.errors import InputError, OutputExistsError
from atlasbuilder.storage import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    directory_lock,
    sha256_file,
)


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- atomic files --------------------------------------------------------------------------------

def test_atomic_write_text_writes_and_replaces(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "first")
    assert path.read_text() == "first"
    atomic_write_text(str(path), "second — ü")
    assert path.read_bytes() == "second — ü".encode()
    assert entries(tmp_path) == ["a.txt"]  # no temporary files left behind


def test_atomic_write_creates_parent_directories(tmp_path):
    path = tmp_path / "deep" / "er" / "b.bin"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert entries(path.parent) == ["b.bin"]


def test_a_failing_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert entries(tmp_path) == ["a.txt"]


@pytest.mark.parametrize("exc", [OSError("I/O error"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
def test_a_failing_write_keeps_the_old_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def broken_fsync(fd):
        raise exc

    monkeypatch.setattr(storage.os, "fsync", broken_fsync)
    with pytest.raises(type(exc)):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert entries(tmp_path) == ["a.txt"]


def test_bad_data_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "lone surrogate \ud800")
    assert path.read_text() == "old"
    assert entries(tmp_path) == ["a.txt"]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_write_follows_the_umask(tmp_path, umask_022):
    # mkstemp alone would make the file 0600 (private)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert os.umask(0o022) == 0o022  # and the umask itself is left as it was


# -- atomic directories --------------------------------------------------------------------------

def test_atomic_directory_renames_into_place(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        assert not out.exists()  # nothing visible under the final name while building
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert (out / "a.txt").read_text() == "a"
    assert (out / "sub" / "b.txt").read_text() == "b"
    assert entries(tmp_path) == ["out"]


def test_atomic_directory_accepts_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with atomic_directory("nested/out") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "nested" / "out" / "f").read_text() == "1"


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
def test_atomic_directory_failure_leaves_nothing(tmp_path, exc):
    out = tmp_path / "out"
    with pytest.raises(type(exc)), atomic_directory(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise exc
    assert not out.exists()
    assert entries(tmp_path) == []


def test_existing_non_empty_directory_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(OutputExistsError) as info, atomic_directory(out):
        pytest.fail("the body must not run")
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, InputError)
    assert str(out) in str(info.value)
    assert entries(out) == ["keep.txt"]
    assert entries(tmp_path) == ["out"]


def test_existing_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(OutputExistsError), atomic_directory(out):
        pass
    assert out.read_text() == "a file"


def test_existing_empty_directory_is_filled(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert entries(out) == ["new.txt"]
    assert entries(tmp_path) == ["out"]


def test_overwrite_replaces_the_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_directory(out, overwrite=True) as tmp:
        assert (out / "old.txt").exists()  # the old one stays until the new one is complete
        (tmp / "new.txt").write_text("new")
    assert entries(out) == ["new.txt"]
    assert entries(tmp_path) == ["out"]  # the old copy is gone too


def test_overwrite_with_failure_keeps_the_old_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert entries(out) == ["old.txt"]
    assert entries(tmp_path) == ["out"]


def test_overwrite_replaces_a_symlink_not_its_target(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "input.txt").write_text("precious")
    out = tmp_path / "out"
    out.symlink_to(target, target_is_directory=True)
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not out.is_symlink() and entries(out) == ["new.txt"]
    assert (target / "input.txt").read_text() == "precious"  # inputs are never modified
    assert entries(tmp_path) == ["elsewhere", "out"]


def test_overwrite_replaces_a_file_without_leftovers(tmp_path):
    # regression: the old file was moved aside and then left there (rmtree fails on a file)
    out = tmp_path / "out"
    out.write_text("a file")
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert entries(out) == ["new.txt"]
    assert entries(tmp_path) == ["out"]


def test_atomic_directory_follows_the_umask(tmp_path, umask_022):
    # mkdtemp alone would make the directory 0700 (private)
    with atomic_directory(tmp_path / "out"):
        pass
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


# -- directory lock ------------------------------------------------------------------------------

# Children run in tmp_path so they import the same atlasbuilder as this process (not one that
# happens to sit in the current directory).
HOLDER = textwrap.dedent("""
    import sys
    from atlasbuilder.storage import directory_lock
    with directory_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()   # hold until the parent closes our stdin
    print("released", flush=True)
""")

TRY_LOCK = textwrap.dedent("""
    import sys
    from atlasbuilder.errors import OutputExistsError
    from atlasbuilder.storage import directory_lock
    try:
        with directory_lock(sys.argv[1]):
            print("got it", flush=True)
    except OutputExistsError as exc:
        print(exc, flush=True)
        sys.exit(3)
""")


def test_lock_held_by_another_process(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputExistsError) as info, directory_lock(out):
            pytest.fail("got a lock another process holds")
        msg = str(info.value)
        assert str(out) in msg
        assert f"pid {holder.pid}" in msg  # names the holder
        holder.stdin.close()
        assert holder.stdout.readline().strip() == "released"
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with directory_lock(out) as lock:  # free again once the holder let go
        assert lock == out / ".lock"
        assert lock.read_text() == f"pid {os.getpid()}\n"


def test_lock_we_hold_blocks_another_process(tmp_path):
    out = tmp_path / "out"
    with directory_lock(out):
        r = subprocess.run([sys.executable, "-c", TRY_LOCK, str(out)], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path)
        assert r.returncode == 3, r.stderr
        assert f"pid {os.getpid()}" in r.stdout
    r = subprocess.run([sys.executable, "-c", TRY_LOCK, str(out)], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "got it"


def test_lock_dies_with_a_killed_process(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
    finally:
        holder.kill()
        holder.wait()
    with directory_lock(out):
        pass


def test_lock_is_released_on_error(tmp_path):
    with pytest.raises(RuntimeError), directory_lock(tmp_path):
        raise RuntimeError("boom")
    with directory_lock(tmp_path):
        pass


# -- hashing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, chunk", [(0, 1 << 20), (1, 1 << 20), (1000, 7), (3 << 20, 1 << 20)])
def test_sha256_file_matches_hashlib(tmp_path, size, chunk):
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path, chunk=chunk) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()
