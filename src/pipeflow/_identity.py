"""Which worker a stage's `setup` runs in: `WorkerInfo`, and how a worker gets its index.

A `setup` with one required parameter gets a `WorkerInfo`; one that can be called
without arguments is called as before, and nothing here runs for its stage. A worker's
index is the lowest one free among the stage's workers when the worker first takes a
call of the stage in a run:

- threads draw it from a table in their process, kept for the run;
- processes (the stage's own pool, a shared or a lent one, a local Dask cluster) draw it
  from a small file the run creates for the stage, under an exclusive `flock`, and give
  it back as they exit, so that a worker replaced under `max_tasks_per_child` hands its
  index to the next one; a claim whose process is gone (a killed worker) is free again.
  A worker that cannot open the file (a Dask worker on another machine) gets None.

This module is imported by every process worker, so it imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "WorkerInfo",
    "alive",
    "call_setup",
    "claim_process_index",
    "claim_thread_index",
    "end_process_claim",
    "new_index_file",
    "remove_index_file",
    "release_thread_indexes",
    "stage_info",
    "takes_worker_info",
]


@dataclass(frozen=True)
class WorkerInfo:
    """Who runs a stage's `setup`: passed to a `setup` with one required parameter.

    Attributes:
        index: The worker's index among the stage's workers, from 0 to `workers - 1`,
            the same for every call the worker runs in the run. For an `async` stage,
            whose setup runs once on the event loop, 0. None where a worker cannot
            reach the run's index table (a Dask worker on another machine).
        stage: The stage's name.
        workers: How many workers the stage has: the pool's size (threads, processes,
            or Dask threads), or an `async` stage's concurrency.
        kind: Where the stage runs: `async`, `thread`, `process`, `dask` or `executor`.
    """

    index: int | None
    stage: str
    workers: int
    kind: str


def takes_worker_info(setup: Callable[..., Any] | None) -> bool:
    """Whether `setup` needs one positional argument (it then gets a `WorkerInfo`).

    A setup that can be called without one (`def setup(size=10)`, `def setup(*args)`)
    is called without one, as before WorkerInfo existed.
    """
    if setup is None:
        return False
    try:
        signature = inspect.signature(setup)
    except (TypeError, ValueError):  # a builtin that does not say
        return False
    try:
        signature.bind()
    except TypeError:
        pass
    else:
        return False
    try:
        signature.bind(None)
    except TypeError:
        return False
    return True


def stage_info(
    setup: Callable[..., Any] | None, stage: str, workers: int, kind: str
) -> WorkerInfo | None:
    """What a stage's workers are told of themselves, or None when its setup takes nothing."""
    if not takes_worker_info(setup):
        return None
    return WorkerInfo(0 if kind == "async" else None, stage, workers, kind)


def call_setup(setup: Callable[..., Any], info: WorkerInfo | None) -> Any:
    """Call `setup`, with `info` if it takes it."""
    return setup() if info is None else setup(info)


# --- threads ---

_thread_indexes: dict[str, set[int]] = {}
_thread_lock = threading.Lock()


def claim_thread_index(key: str) -> int:
    """The lowest index not yet held by a thread running stage `key` in its run."""
    with _thread_lock:
        held = _thread_indexes.setdefault(key, set())
        index = next(i for i in range(len(held) + 1) if i not in held)
        held.add(index)
        return index


def release_thread_indexes(key: str) -> None:
    """Forget the thread indexes of stage `key` (its run has ended)."""
    with _thread_lock:
        _thread_indexes.pop(key, None)


# --- processes ---


def new_index_file() -> str:
    """Create the (empty) table of a stage's process indexes for one run."""
    import tempfile

    handle, path = tempfile.mkstemp(prefix="pipeflow-workers-", suffix=".json")
    os.close(handle)
    return path


def remove_index_file(path: str) -> None:
    """Remove a stage's table of process indexes once its run has ended."""
    with contextlib.suppress(OSError):
        os.remove(path)


def alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _locked_table(path: str) -> Any:
    import fcntl

    with open(path, "r+", encoding="ascii") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        text = file.read()
        table: dict[str, int] = json.loads(text) if text else {}
        before = dict(table)
        yield table
        if table != before:
            file.seek(0)
            file.truncate()
            file.write(json.dumps(table))
            file.flush()


# A process worker's claims, by stage key: each given back as the worker exits, or when
# the run ends the stage in it (see end_process_claim).
_claims: dict[str, Any] = {}


def claim_process_index(key: str, path: str) -> int | None:
    """The lowest index free in the table at `path`, claimed for this process.

    Returns:
        The index; None where the table cannot be opened (another machine).
    """
    pid = os.getpid()
    try:
        with _locked_table(path) as table:
            for held, owner in list(table.items()):
                if owner == pid or not alive(owner):
                    del table[held]
            index = next(i for i in range(len(table) + 1) if str(i) not in table)
            table[str(index)] = pid
    except (OSError, ImportError, ValueError):
        return None
    import multiprocessing.util

    _claims[key] = multiprocessing.util.Finalize(
        None, _give_back, args=(path, index, pid), exitpriority=10
    )
    return index


def _give_back(path: str, index: int, pid: int) -> None:
    with contextlib.suppress(OSError, ValueError), _locked_table(path) as table:
        if table.get(str(index)) == pid:
            del table[str(index)]


def end_process_claim(key: str) -> None:
    """Give back this process's index for stage `key` now (its run has ended)."""
    finalizer = _claims.pop(key, None)
    if finalizer is not None:
        finalizer()
