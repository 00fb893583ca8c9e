"""The pools stages run in: created by a run and shut down on every exit path, or lent.

A pool the pipeline creates is started (its workers spawned) before the first item, so
its start-up cost is measured apart from the work, and shut down when the run ends; on a
failed or cancelled run its processes are killed rather than waited for. A pool the caller
passes in is used as it is and never shut down.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import sys
import time
from typing import Any

from . import _worker
from ._stage import Pool

__all__ = ["PoolHandle", "default_start_method"]


def default_start_method() -> str:
    """forkserver where the platform has it (safe in a threaded parent), else spawn."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _noop() -> int:
    return os.getpid()


class PoolHandle:
    """One executor as a run sees it.

    Args:
        name: The pool's name (a stage's own pool is named after the stage).
        spec: What to create, or None with `executor`.
        executor: A pool lent by the caller.
    """

    def __init__(
        self,
        name: str,
        spec: Pool | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.owned = executor is None
        self.executor: concurrent.futures.Executor | None = executor
        self.start_s = 0.0
        self.rebuilds = 0
        self.kind: str
        if executor is None:
            assert spec is not None
            self.kind = spec.kind
            self.workers = spec.workers
        elif isinstance(executor, concurrent.futures.ThreadPoolExecutor):
            self.kind, self.workers = "thread", executor._max_workers
        elif isinstance(executor, concurrent.futures.ProcessPoolExecutor):
            self.kind, self.workers = "process", _guess_workers(executor)
        else:  # a Dask client's executor, for one: it pickles what it sends
            self.kind, self.workers = "executor", _guess_workers(executor)

    @property
    def remote(self) -> bool:
        """Whether calls cross a process boundary (the callable travels pickled)."""
        return self.kind != "thread"

    def start(self) -> None:
        """Create the pool (if owned) and spawn its workers. Blocking: call from a thread."""
        if not self.owned or self.executor is not None:
            return
        assert self.spec is not None
        started = time.perf_counter()
        self.executor = self._create()
        if self.kind == "process":
            # spawn every worker now, so start-up is paid (and measured) before the work
            futures = [self.executor.submit(_noop) for _ in range(self.workers)]
            concurrent.futures.wait(futures)
        self.start_s = time.perf_counter() - started

    def _create(self) -> concurrent.futures.Executor:
        assert self.spec is not None
        if self.spec.kind == "thread":
            return concurrent.futures.ThreadPoolExecutor(
                self.spec.workers, thread_name_prefix=f"pipeflow-{self.name}"
            )
        method = self.spec.start_method or default_start_method()
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(["__main__", "pipeflow._worker"])
        return concurrent.futures.ProcessPoolExecutor(
            self.spec.workers,
            mp_context=context,
            initializer=_worker.init_process_worker,
            initargs=(list(sys.path),),
            max_tasks_per_child=self.spec.max_tasks_per_child,
        )

    def pids(self) -> list[int]:
        """The process ids of the pool's live worker processes (none for threads)."""
        return self.pids_of(self.executor)

    def shutdown(self, *, kill: bool) -> None:
        """Shut an owned pool down; with `kill`, end its processes instead of waiting.

        Blocking: call from a thread. A lent pool is left alone.
        """
        executor, self.executor = self.executor, None
        if executor is None or not self.owned:
            return
        if kill and self.kind == "process":
            for pid in self.pids_of(executor):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        executor.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def pids_of(executor: Any) -> list[int]:
        """The process ids of a process pool's live workers."""
        processes = getattr(executor, "_processes", None) or {}
        return [p.pid for p in list(processes.values()) if p.pid is not None]


def _guess_workers(executor: Any) -> int:
    for attr in ("_max_workers", "max_workers"):
        value = getattr(executor, attr, None)
        if isinstance(value, int):
            return value
    return os.cpu_count() or 1
