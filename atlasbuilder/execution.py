"""Units of work of a build: their cache keys, crash-safe execution, and where they run.

A *unit* is one piece of a stage's work (one brain's segmentation, one brain's registration, one
space's aggregation). Its **key** is a content hash of everything it depends on: the bytes of its
input files, its parameters, the keys of the units whose outputs it reads, and the format version
of its stage. A unit whose key matches the marker of its last successful run is a cache hit and is
not run again.

Crash safety (a build may be killed at any moment, ``kill -9`` included):

- a unit's marker (``<atlas>/.units/<stage>--<unit>.json``) is written atomically *after* its
  outputs, so a marker always describes complete outputs;
- before a unit runs, a *started* note with its key is written; a rerun of the same key keeps
  what the killed run finished inside the unit's directory (e.g. sections already predicted),
  while a directory left by a run with another key is removed first;
- every file a unit writes is written atomically by the stage itself.

Execution: in this process (``workers=1``), on a local Dask cluster sized to the machine, or on
an existing ``dask.distributed`` scheduler. Units return small dicts; volumes travel as files
(NIfTI, zarr) on the shared filesystem, never through the scheduler. On Dask, a unit may wait for
units of its own run inside the scheduler (``Unit.after``), and units of a later stage whose inputs
are ready may be started ahead of it, behind everything else (:meth:`Executor.start_ahead`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import socket
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AtlasBuilderError, InputError, StageError
from .storage import atomic_write_text

log = logging.getLogger("atlasbuilder")

__all__ = ["Executor", "Fingerprints", "Unit", "UnitCache", "content_key", "run_unit"]

UNITS_DIR = ".units"

UNKNOWN_UNIT_DURATION = "60s"
"""What the local cluster's scheduler assumes a unit of a kind it has not yet seen finish takes
(Dask's default: 0.5 s, for small array tasks). Its work stealing compares such guesses with the
time the running units have taken so far: a unit started ahead that had run 5 s made its worker
look busier than one that had just started a cohort model, and Dask moved the second cohort model
there, behind the first (the quick demo's two models ran one after the other, +74 s, while the
other worker idled; ``tests/test_execution.py`` reproduces it, 4 times in 6 with 0.5 s). Our units
take seconds to minutes."""


def content_key(*parts: Any) -> str:
    """A stable hex SHA-256 of JSON-serialisable parts (dict keys sorted)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Unit:
    """One piece of work: ``func(**kwargs)`` writing into ``directory`` (if given)."""

    stage: str
    name: str
    func: str  # "package.module:function", importable in a worker
    kwargs: dict[str, Any]
    key: str
    directory: Path | None = None  # owned by the unit: removed when left by another key
    threads: int = 1
    resources: dict[str, float] | None = None  # Dask resources (e.g. {"GPU": 1})
    items: int = 1  # for the summary (sections, brains, ...)
    note: str = ""
    after: tuple[str, ...] = ()  # names of units earlier in the same run that must finish first
    # Dask priority among the units of one run (higher first); units submitted within 100 ms of
    # each other (one run) otherwise start in an order of Dask's choosing
    priority: int = 0
    # long units of one run that must run side by side (the cohort models): each is sent to its
    # own worker, in turn (a preference: another worker takes it if that one is lost). Without
    # it Dask may queue them all on the worker that made their inputs while the other finishes
    # a unit started ahead and then idles: the quick demo's two cohort models once ran one
    # after the other (+80 s).
    spread: bool = False


@dataclass
class UnitResult:
    unit: Unit
    result: dict[str, Any]
    seconds: float  # spent by this build (0 for a unit taken from the cache)
    cached: bool
    computed_seconds: float = 0.0  # what computing the unit took, in whichever build did it
    ahead: bool = False  # started ahead of its stage (Executor.start_ahead)


class UnitCache:
    """The markers of finished units under ``<atlas>/.units``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / UNITS_DIR

    def marker(self, unit: Unit) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", unit.name)
        return self.root / f"{unit.stage}--{safe}.json"

    def lookup(self, unit: Unit) -> dict[str, Any] | None:
        """The stored record of ``unit`` if its key matches, else None."""
        path = self.marker(unit)
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if rec.get("key") != unit.key:
            return None
        if unit.directory is not None and not Path(unit.directory).is_dir():
            return None  # outputs removed by hand: redo
        return dict(rec)

    def forget(self, stage: str) -> None:
        """Drop the markers of one stage (``--force STAGE``)."""
        for p in self.root.glob(f"{stage}--*.json"):
            p.unlink(missing_ok=True)


class Fingerprints:
    """SHA-256 of input files, remembered by (path, size, mtime) so a rerun does not re-read them."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / UNITS_DIR / "fingerprints.json"
        try:
            self._known: dict[str, list[Any]] = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            self._known = {}
        self._dirty = False

    def file(self, path: str | os.PathLike[str]) -> str:
        from .storage import sha256_file

        p = Path(path).absolute()
        st = p.stat()
        rec = self._known.get(str(p))
        if rec and rec[0] == st.st_size and rec[1] == st.st_mtime_ns:
            return str(rec[2])
        digest = sha256_file(p)
        self._known[str(p)] = [st.st_size, st.st_mtime_ns, digest]
        self._dirty = True
        return digest

    def files(self, paths: Mapping[Any, str | os.PathLike[str]] | Sequence[str | os.PathLike[str]]
              ) -> dict[str, str]:
        items = paths.items() if isinstance(paths, Mapping) else enumerate(paths)
        return {str(k): self.file(v) for k, v in items}

    def save(self) -> None:
        if self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self._known))
            self._dirty = False


# -- running one unit (in this process or in a Dask worker) ------------------------------------


@contextmanager
def _limit_threads(n: int) -> Iterator[None]:
    """Pin the math libraries to ``n`` threads: the same result whatever the machine's load.

    The environment variables reach libraries loaded later (ITK, torch's OpenMP); the pools of
    those already loaded (numpy's OpenBLAS is, in this process) are limited through threadpoolctl,
    so a unit runs with ``n`` threads in this process as on a Dask worker. The pools and torch's
    thread count are restored afterwards (a notebook that ran a build keeps its threads).
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = str(n)
    import sys

    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=n):
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch is not None and before is not None:
                torch.set_num_threads(before)


def run_unit(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one unit described by a plain dict (picklable); never raises for a unit's failure.

    Returns ``{"result", "seconds"}`` or ``{"error", "error_type", "exit_code", "traceback"}``.
    """
    with _limit_threads(int(spec["threads"])):
        return _run_unit(spec)


def _run_unit(spec: dict[str, Any]) -> dict[str, Any]:
    marker = Path(spec["marker"])
    started = marker.with_suffix(".started")
    directory = Path(spec["directory"]) if spec.get("directory") else None
    try:
        prev = json.loads(started.read_text()).get("key") if started.is_file() else None
    except (OSError, json.JSONDecodeError):
        prev = None
    if directory is not None and directory.exists() and prev != spec["key"]:
        shutil.rmtree(directory)  # left by a run with other inputs or settings
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    atomic_write_text(started, json.dumps({"key": spec["key"], "pid": os.getpid()}))
    module, _, name = spec["func"].partition(":")
    t0 = time.perf_counter()
    try:
        func = getattr(importlib.import_module(module), name)
        result = func(**spec["kwargs"]) or {}
    except AtlasBuilderError as exc:
        return {"error": str(exc), "error_type": type(exc).__name__, "exit_code": exc.exit_code,
                "traceback": traceback.format_exc()}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "error_type": type(exc).__name__,
                "exit_code": 1, "traceback": traceback.format_exc()}
    seconds = time.perf_counter() - t0
    atomic_write_text(marker, json.dumps({
        "key": spec["key"], "stage": spec["stage"], "unit": spec["name"],
        "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        "result": result}, indent=1, default=str))
    started.unlink(missing_ok=True)
    return {"result": json.loads(json.dumps(result, default=str)), "seconds": seconds}


def run_unit_after(spec: dict[str, Any], *before: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_unit` once the units it waits for are done (on Dask: their results are passed);
    not run when one of them failed."""
    for res in before:
        if "error" in res:
            return {"error": f"not run: a unit it needs failed ({res['error']})",
                    "error_type": res.get("error_type", "StageError"),
                    "exit_code": res.get("exit_code", 1), "traceback": ""}
    return run_unit(spec)


class UnitFailed(StageError):
    """A unit failed; ``exit_code`` follows the cause (2 for bad input)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- where units run ---------------------------------------------------------------------------


@dataclass
class Executor:
    """Runs the units of a stage: in this process, or on a Dask cluster (local or remote).

    Parameters
    ----------
    workers
        Local worker processes (1: run in this process, no Dask).
    scheduler
        Address of an existing ``dask.distributed`` scheduler (``tcp://host:8786``); the build's
        files must be on a filesystem the workers share.
    progress
        Show one progress bar per stage.
    """

    workers: int = 1
    scheduler: str | None = None
    progress: bool = True
    _client: Any = field(default=None, init=False, repr=False)
    _cluster: Any = field(default=None, init=False, repr=False)
    _ahead: dict[tuple[str, str, str], Any] = field(default_factory=dict, init=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.scheduler is not None or self.workers > 1

    def _ensure_client(self) -> Any:
        if self._client is not None:
            return self._client
        from distributed import Client, LocalCluster

        if self.scheduler is not None:
            try:
                self._client = Client(self.scheduler, timeout="20s")
            except OSError as exc:
                raise InputError(f"cannot reach the Dask scheduler at {self.scheduler}: {exc}") from exc
            log.info("running on the Dask scheduler %s", self.scheduler)
        else:
            import dask

            # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc hand every
            # freed tensor back to the kernel: torch training ran 1.7x slower on a worker than in
            # this process. The other variables it sets (1 thread for OpenMP/BLAS) are kept.
            # A worker is sent its next unit only when it has finished one (worker-saturation 1):
            # by default each worker also holds a queued unit, and starts it the moment its current
            # one ends, before a more urgent unit that just became ready (units started ahead
            # would then hold up the stage that waits for its units).
            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                                  "distributed.scheduler.worker-saturation": 1.0,
                                  "distributed.scheduler.unknown-task-duration": UNKNOWN_UNIT_DURATION}):
                self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                             processes=True, dashboard_address=None,
                                             silence_logs=logging.ERROR)
            self._client = Client(self._cluster)
            log.info("started a local Dask cluster: %d workers x 1 thread", self.workers)
        return self._client

    def close(self) -> None:
        self._ahead.clear()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _ahead_key(u: Unit) -> tuple[str, str, str]:
        return (u.stage, u.name, u.key)

    def start_ahead(self, units: Sequence[Unit], cache: UnitCache) -> int:
        """Start ``units`` now, behind all other work, on a Dask cluster; return how many started.

        For units a later stage will ask for whose inputs are ready already (e.g. registering a
        brain's blockface while its sections are segmented): they run whenever a worker would
        otherwise wait, and the stage that asks for them later collects them (:meth:`run`).
        Cached units are not started; without Dask (one worker) nothing is (the stage runs them).
        """
        if not self.distributed:
            return 0
        todo = [u for u in units
                if self._ahead_key(u) not in self._ahead and cache.lookup(u) is None]
        if todo:  # (no cluster is started for nothing)
            client = self._ensure_client()
            for u in todo:
                self._ahead[self._ahead_key(u)] = self._submit(client, u, cache, priority=-10)
            log.info("started %d units ahead of their stage", len(todo))
        return len(todo)

    def run(self, stage: str, units: Sequence[Unit], cache: UnitCache) -> list[UnitResult]:
        """Run the units that are not cached; return every unit's result, in order."""
        from tqdm.auto import tqdm

        out: dict[int, UnitResult] = {}
        todo: list[tuple[int, Unit]] = []
        ahead: set[int] = set()
        for i, u in enumerate(units):
            if self._ahead_key(u) in self._ahead:  # started ahead by this build: collect it
                todo.append((i, u))
                ahead.add(i)
                continue
            rec = cache.lookup(u)
            if rec is not None:
                out[i] = UnitResult(u, rec.get("result", {}), 0.0, True,
                                    float(rec.get("seconds", 0.0) or 0.0))
            else:
                todo.append((i, u))
        if todo:
            bar = tqdm(total=len(todo), desc=f"{stage:<14}", unit="unit", leave=False,
                       disable=not self.progress)
            try:
                for i, res in self._execute(todo, cache):
                    u = units[i]
                    if "error" in res:
                        log.debug("unit %s/%s failed:\n%s", stage, u.name, res.get("traceback"))
                        raise UnitFailed(f"stage {u.stage} failed for {u.name}: {res['error']}",
                                         int(res.get("exit_code", 1)))
                    out[i] = UnitResult(u, res["result"], float(res["seconds"]), False,
                                        float(res["seconds"]), ahead=i in ahead)
                    log.info("%s %s done in %.1f s", u.stage, u.name, res["seconds"])
                    bar.update()
            finally:
                bar.close()
        return [out[i] for i in range(len(units))]

    def _spec(self, u: Unit, cache: UnitCache) -> dict[str, Any]:
        kwargs = dict(u.kwargs)
        return {"stage": u.stage, "name": u.name, "func": u.func, "kwargs": kwargs, "key": u.key,
                "threads": u.threads, "marker": str(cache.marker(u)),
                "directory": str(u.directory) if u.directory is not None else None}

    def _submit(self, client: Any, u: Unit, cache: UnitCache, priority: int = 0,
                before: Sequence[Any] = (), worker: str | None = None) -> Any:
        spec = self._spec(u, cache)
        spec["kwargs"] = {**spec["kwargs"], **({"progress": False} if "progress" in spec["kwargs"]
                                               else {})}
        # a preferred worker, not a requirement: the unit still runs if that worker is lost
        where = {} if worker is None else {"workers": [worker], "allow_other_workers": True}
        return client.submit(run_unit_after, spec, *before, key=f"{u.stage}-{u.name}-{u.key[:12]}",
                             pure=False, resources=u.resources, priority=priority, **where)

    def _execute(self, todo: list[tuple[int, Unit]], cache: UnitCache
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
        if not self.distributed or len(todo) == 0:
            for i, u in todo:
                yield i, run_unit(self._spec(u, cache))
            return
        from distributed import as_completed

        client = self._ensure_client()
        futures = {}
        by_name: dict[str, Any] = {}
        workers = sorted(client.scheduler_info().get("workers", {})) if any(u.spread for _, u in todo) else []
        spread = 0
        for i, u in todo:
            fut = self._ahead.pop(self._ahead_key(u), None)
            if fut is None:
                worker = None
                if u.spread and workers:
                    worker = workers[spread % len(workers)]
                    spread += 1
                # queued at once, waiting on Dask for the units it needs: a worker freed by one of
                # them takes it before any unit started ahead of its stage
                fut = self._submit(client, u, cache, priority=u.priority,
                                   before=[by_name[n] for n in u.after if n in by_name], worker=worker)
            futures[fut] = i
            by_name[u.name] = fut
        try:
            for fut in as_completed(list(futures)):
                yield futures[fut], fut.result()
        finally:
            for fut in futures:
                fut.cancel()


@contextmanager
def log_file(path: Path) -> Iterator[None]:
    """Log everything (debug included) of the build to ``path`` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("atlasbuilder")
    old_level = logger.level
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.DEBUG:
        logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
