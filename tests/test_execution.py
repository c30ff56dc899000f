"""Units of work: cache keys, crash safety, and running on Dask (toy units, real scheduler)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from atlasbuilder.errors import InputError
from atlasbuilder.execution import Executor, Fingerprints, Unit, UnitCache, content_key, run_unit


def toy_square(value: int, out_dir: str, log: str) -> dict:
    """A unit that records every call and writes one output file."""
    with open(log, "a") as fh:
        fh.write(f"{value}\n")
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "out.txt").write_text(str(value * value))
    from threadpoolctl import threadpool_info

    return {"square": value * value, "pid": os.getpid(),
            "pools": sorted({p["num_threads"] for p in threadpool_info()}),
            "malloc_trim": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


def toy_fail(what: str) -> dict:
    if what == "input":
        raise InputError("section 7 of brain B02 is empty")
    raise ZeroDivisionError("boom")


def _unit(tmp: Path, value: int, name: str = "a") -> Unit:
    out = tmp / "units" / name
    return Unit("toy", name, "tests.test_execution:toy_square",
                {"value": value, "out_dir": str(out), "log": str(tmp / "calls.log")},
                content_key("toy", value), directory=out)


def _calls(tmp: Path) -> list[str]:
    p = tmp / "calls.log"
    return p.read_text().split() if p.exists() else []


def test_content_key_is_stable_and_order_free():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_cached_unit_is_not_run_again(tmp_path):
    cache = UnitCache(tmp_path)
    ex = Executor(1, progress=False)
    r1 = ex.run("toy", [_unit(tmp_path, 3)], cache)
    assert r1[0].result["square"] == 9 and not r1[0].cached
    r2 = ex.run("toy", [_unit(tmp_path, 3)], cache)
    assert r2[0].cached and r2[0].result["square"] == 9
    assert _calls(tmp_path) == ["3"]
    # a changed input changes the key: the unit runs again, and its stale outputs are replaced
    r3 = ex.run("toy", [_unit(tmp_path, 4)], cache)
    assert not r3[0].cached and (tmp_path / "units" / "a" / "out.txt").read_text() == "16"
    assert _calls(tmp_path) == ["3", "4"]


def test_outputs_deleted_by_hand_are_redone(tmp_path):
    cache = UnitCache(tmp_path)
    ex = Executor(1, progress=False)
    ex.run("toy", [_unit(tmp_path, 2)], cache)
    import shutil

    shutil.rmtree(tmp_path / "units" / "a")
    assert not ex.run("toy", [_unit(tmp_path, 2)], cache)[0].cached


def test_killed_unit_keeps_its_partial_work_for_the_same_key(tmp_path):
    """A 'started' note with the same key keeps the directory (resume); another key wipes it."""
    cache = UnitCache(tmp_path)
    u = _unit(tmp_path, 5)
    marker = cache.marker(u)
    marker.parent.mkdir(parents=True)
    started = marker.with_suffix(".started")
    u.directory.mkdir(parents=True)
    (u.directory / "finished-part.txt").write_text("kept")
    started.write_text(json.dumps({"key": u.key}))
    spec = Executor(1)._spec(u, cache)
    run_unit(spec)
    assert (u.directory / "finished-part.txt").exists()
    assert not started.exists() and json.loads(marker.read_text())["key"] == u.key
    # the same directory left by a run with another key is removed before running
    u2 = _unit(tmp_path, 6)
    (u2.directory / "left-over.txt").write_text("stale")
    started.write_text(json.dumps({"key": "something else"}))
    run_unit(Executor(1)._spec(u2, cache))
    assert not (u2.directory / "left-over.txt").exists()


def test_failures_name_the_unit_and_keep_the_exit_code(tmp_path):
    cache = UnitCache(tmp_path)
    ex = Executor(1, progress=False)
    bad = Unit("segmentation", "B02", "tests.test_execution:toy_fail", {"what": "input"}, "k1")
    with pytest.raises(Exception) as err:
        ex.run("segmentation", [bad], cache)
    assert "stage segmentation failed for B02: section 7 of brain B02 is empty" in str(err.value)
    assert err.value.exit_code == 2
    bug = Unit("registration", "B03", "tests.test_execution:toy_fail", {"what": "bug"}, "k2")
    with pytest.raises(Exception) as err:
        ex.run("registration", [bug], cache)
    assert "B03" in str(err.value) and "ZeroDivisionError: boom" in str(err.value)
    assert err.value.exit_code == 1
    assert not cache.marker(bad).exists()


def test_in_process_units_run_single_threaded_and_restore_the_pools(tmp_path):
    import numpy as np  # noqa: F401  (loads OpenBLAS before the unit, as in a notebook)
    from threadpoolctl import threadpool_info

    before = [p["num_threads"] for p in threadpool_info()]
    with Executor(1, progress=False) as ex:
        (res,) = ex.run("toy", [_unit(tmp_path, 3)], UnitCache(tmp_path))
    assert res.result["pools"] == [1]
    assert [p["num_threads"] for p in threadpool_info()] == before


def test_fingerprints_are_remembered(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    fp = Fingerprints(tmp_path)
    h = fp.file(f)
    fp.save()
    again = Fingerprints(tmp_path)
    assert again._known[str(f.absolute())][2] == h
    f.write_bytes(b"abcd")  # size changes: hashed again
    assert again.file(f) != h


@pytest.mark.slow
def test_units_run_on_a_local_dask_cluster(tmp_path):
    cache = UnitCache(tmp_path)
    units = [_unit(tmp_path, v, name=f"u{v}") for v in range(4)]
    with Executor(2, progress=False) as ex:
        res = ex.run("toy", units, cache)
    assert [r.result["square"] for r in res] == [0, 1, 4, 9]
    assert {r.result["pid"] for r in res} != {os.getpid()}  # ran in worker processes
    # one thread per math library, and not Dask's MALLOC_TRIM_THRESHOLD_ (torch 1.7x slower)
    assert all(r.result["pools"] == [1] and r.result["malloc_trim"] is None for r in res)
    assert sorted(_calls(tmp_path)) == ["0", "1", "2", "3"]


def toy_stamp(name: str, log: str, fail: bool = False) -> dict:
    """A unit that appends ``start name`` / ``end name`` to a log (order of execution)."""
    import time

    with open(log, "a") as fh:
        fh.write(f"start-{name}\n")
    time.sleep(0.3)
    if fail:
        raise ZeroDivisionError("boom")
    with open(log, "a") as fh:
        fh.write(f"end-{name}\n")
    return {"name": name}


def _stamp(tmp: Path, name: str, after: tuple[str, ...] = (), fail: bool = False) -> Unit:
    return Unit("toy", name, "tests.test_execution:toy_stamp",
                {"name": name, "log": str(tmp / "calls.log"), "fail": fail},
                content_key("stamp", name, fail), after=after)


@pytest.mark.slow
def test_units_started_ahead_are_collected_not_rerun_and_after_is_respected(tmp_path):
    cache = UnitCache(tmp_path)
    with Executor(2, progress=False) as ex:
        # a later stage's unit started ahead: the stage that asks for it collects that run
        assert ex.start_ahead([_stamp(tmp_path, "ahead")], cache) == 1
        res = ex.run("toy", [_stamp(tmp_path, "first"), _stamp(tmp_path, "second", ("first",)),
                             _stamp(tmp_path, "third", ("first",))], cache)
        assert [r.result["name"] for r in res] == ["first", "second", "third"]
        again = ex.run("toy", [_stamp(tmp_path, "ahead")], cache)
        assert again[0].result["name"] == "ahead" and not again[0].cached  # computed by this build
        assert ex.start_ahead([_stamp(tmp_path, "ahead")], cache) == 0  # now cached: not started
    log = _calls(tmp_path)
    assert log.count("start-ahead") == 1
    assert log.index("end-first") < log.index("start-second")
    assert log.index("end-first") < log.index("start-third")


def toy_timed(name: str, seconds: float) -> dict:
    """A unit that sleeps and says where and when it ran."""
    import time

    t0 = time.time()
    time.sleep(seconds)
    return {"name": name, "pid": os.getpid(), "t0": t0, "t1": time.time()}


def _timed(name: str, seconds: float, after: tuple[str, ...] = (), spread: bool = False) -> Unit:
    return Unit("toy", name, "tests.test_execution:toy_timed", {"name": name, "seconds": seconds},
                content_key("timed", name, seconds), after=after, spread=spread)


@pytest.mark.slow
def test_spread_units_run_side_by_side_on_their_own_workers(tmp_path):
    """Two long units that become ready together while the other worker is still busy with a unit
    started ahead (the cohort models while the reference brain is reconstructed): each goes to its
    own worker, so they overlap.

    Without ``spread`` Dask queued both on the worker that made their input, and the second
    started only when the first had ended (same pid, twice in two tries). With ``spread`` but
    Dask's guess of 0.5 s for a unit it has not seen finish, its work stealing moved the second
    onto the first's worker, whose just-started unit looked short next to the 4 s the unit
    started ahead had run (4 of 6 tries; :data:`~atlasbuilder.execution.UNKNOWN_UNIT_DURATION`).
    Two tries here."""
    for attempt in range(2):
        cache = UnitCache(tmp_path / str(attempt))
        with Executor(2, progress=False) as ex:
            assert ex.start_ahead([_timed("ahead", 8.0)], cache) == 1
            res = ex.run("toy", [_timed("first", 4.0), _timed("long-a", 6.0, ("first",), True),
                                 _timed("long-b", 6.0, ("first",), True)], cache)
        a, b = res[1].result, res[2].result
        assert a["pid"] != b["pid"]
        assert max(a["t0"], b["t0"]) < min(a["t1"], b["t1"])  # they ran at the same time


@pytest.mark.slow
def test_a_unit_waiting_on_a_failed_one_is_not_run(tmp_path):
    cache = UnitCache(tmp_path)
    with Executor(2, progress=False) as ex, pytest.raises(Exception, match="first.*boom"):
        ex.run("toy", [_stamp(tmp_path, "first", fail=True), _stamp(tmp_path, "second", ("first",))],
               cache)
    assert "start-second" not in _calls(tmp_path)


def test_without_dask_nothing_starts_ahead_and_after_is_the_order(tmp_path):
    cache = UnitCache(tmp_path)
    ex = Executor(1, progress=False)
    assert ex.start_ahead([_stamp(tmp_path, "ahead")], cache) == 0
    ex.run("toy", [_stamp(tmp_path, "first"), _stamp(tmp_path, "second", ("first",))], cache)
    assert _calls(tmp_path) == ["start-first", "end-first", "start-second", "end-second"]
