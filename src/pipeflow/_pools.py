"""The pools stages run in: created by a run and shut down on every exit path, or lent.

A pool the pipeline creates is started (its workers spawned) before the first item, so
its start-up cost is measured apart from the work, and shut down when the run ends; on a
failed or cancelled run its processes are killed rather than waited for. A pool the caller
passes in is used as it is and never shut down. A `dask` pool is a client of a Dask
cluster (see `_dask`): the run closes the client, and the cluster if it started it.

A process pool whose worker dies is broken for good (every pending call fails), so a
run replaces it: each replacement is a new *generation*. A call knows the generation it
was made in; whoever first sees a generation break replaces it, the others just retry.
Calls under suspicion of killing their worker run *alone* (see `CallGate`), so that a
crash while one runs convicts exactly that call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread

from . import _auto, _compat, _dask, _worker
from ._errors import CrashLoop, PoolStartError
from ._forkserver import FORKSERVER_PRELOAD, default_start_method
from ._stage import Pool, Stage

__all__ = [
    "CallGate",
    "CallSlot",
    "CrashLoop",
    "PoolHandle",
    "PoolStartError",
    "pool_for",
]

# Replacing a broken pool more often than this in one run is a crash loop, not bad luck.
MAX_REBUILDS = 32
# How long a failed run waits for the calls still running in its own thread pools.
THREAD_GRACE_S = 2.0
# How long a pool's end waits for its SIGKILLed workers to be gone.
KILL_WAIT_S = 5.0
# How long a process pool may leave a dead worker unnoticed before it is taken for stuck.
STUCK_AFTER_S = 2.0


class CallGate:
    """Calls share the pool, except a call that must run alone: it waits for the others
    to finish, and new calls wait for it.

    Every check and update happens on the event loop between two awaits, so no lock is
    needed, and a shared call with nobody waiting to run alone costs two integer updates.
    """

    def __init__(self) -> None:
        self._active = 0
        self._alone = False
        self._waiting_alone = 0
        self._changed: asyncio.Event | None = None

    async def _wait_for_change(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        """Hold the pool together with other shared calls."""
        while self._alone or self._waiting_alone:
            await self._wait_for_change()
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            if self._waiting_alone and not self._active:
                self._notify()

    @asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        """Hold the pool with no other call running."""
        self._waiting_alone += 1
        try:
            while self._alone or self._active:
                await self._wait_for_change()
        except BaseException:
            self._waiting_alone -= 1
            self._notify()  # shared calls held back for this one may go on
            raise
        self._waiting_alone -= 1
        self._alone = True
        try:
            yield
        finally:
            self._alone = False
            self._notify()


class CallSlot:
    """One of a pool's call slots (see `PoolHandle.bound_calls`), held for one call.

    The slot is given back when the caller leaves it, or, after `hold_until_done`, when
    the call itself ends: a timed-out call that pipeflow can neither kill nor replace
    with a new thread keeps its worker busy, so it keeps its slot too.
    """

    def __init__(self, slots: asyncio.Semaphore | None) -> None:
        self._slots = slots
        self._handed_off = False

    async def __aenter__(self) -> CallSlot:
        if self._slots is not None:
            await self._slots.acquire()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._slots is not None and not self._handed_off:
            self._slots.release()

    def hold_until_done(self, call: concurrent.futures.Future[Any]) -> None:
        """Keep the slot until `call` ends, not only until its caller stops waiting."""
        slots = self._slots
        if slots is None or call.done():
            return
        self._handed_off = True
        loop = asyncio.get_running_loop()

        def release(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the run's loop has closed since
                loop.call_soon_threadsafe(slots.release)

        call.add_done_callback(release)


class _RecyclingProcessPool(concurrent.futures.ProcessPoolExecutor):
    """A process pool whose workers exit after `max_tasks_per_child` calls, and are
    always replaced.

    CPython 3.11 to 3.13 decide whether to replace such a worker from a count of calls
    completed, not of idle workers (python/cpython#115634): a stale count makes the pool
    skip the replacement, and once every worker has exited the queued calls wait forever.
    Every worker is spawned at start-up (see `PoolHandle._create`), so a pool with fewer
    processes than `max_workers` has lost one, and spawns it again.
    """

    def _adjust_process_count(self) -> None:
        if len(self._processes) < self._max_workers:  # type: ignore[attr-defined]
            self._spawn_process()  # type: ignore[attr-defined]


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
        self.generation = 0
        self.gate = CallGate()
        self._rebuild_lock = anyio.Lock()
        self._killed_generations: set[int] = set()
        # the pool's own {pid: process} map, which it extends when it spawns a worker
        # later than start-up (an idle worker may have taken a start-up call)
        self._processes: dict[int, Any] = {}
        self.abandoned = 0
        # (executor, when) a dead worker of that executor was first seen unnoticed
        self._dead_seen: tuple[concurrent.futures.Executor, float] | None = None
        # set when a stage with a timeout uses the pool (see bound_calls)
        self.slots: asyncio.Semaphore | None = None
        # processes spawned at start-up, if not all (`workers: auto` spawns the rest as
        # its stage raises its concurrency)
        self.prespawn: int | None = None
        # `kind: auto`: the process pool a thread stage may move to, started only then
        self.switch_to: PoolHandle | None = None
        self.lazy = False
        # a start (in a thread, as `kind: auto` starts its process pool while the run
        # goes on) and the run's shutdown take turns: a pool is never started after, or
        # while, it is shut down
        self._lifecycle = threading.Lock()
        self._shut = False
        self.kind: str
        if executor is None:
            assert spec is not None
            self.kind = spec.kind
            # a Dask worker runs a call in each of its threads
            self.workers = spec.workers * (spec.threads_per_worker if spec.kind == "dask" else 1)
        elif isinstance(executor, concurrent.futures.ThreadPoolExecutor):
            self.kind, self.workers = "thread", _compat.max_workers(executor)
        elif isinstance(executor, concurrent.futures.ProcessPoolExecutor):
            self.kind, self.workers = "process", _compat.max_workers(executor)
        else:  # a Dask client's executor, for one: it pickles what it sends
            self.kind, self.workers = "executor", _compat.max_workers(executor)

    @property
    def remote(self) -> bool:
        """Whether calls cross a process boundary (the callable travels pickled)."""
        return self.kind != "thread"

    def start(self) -> None:
        """Create the pool (if owned) and spawn its workers. Blocking: call from a thread."""
        with self._lifecycle:
            if not self.owned or self.executor is not None or self.lazy or self._shut:
                return
            started = time.perf_counter()
            self.executor = self._create()
            self.start_s += time.perf_counter() - started

    def bound_calls(self) -> None:
        """Let no more calls into the pool than it has workers, whichever stage makes them.

        A call then starts as soon as it is submitted, so the clock of an item's timeout,
        started once the call holds a slot, never runs while it waits in the pool's queue
        behind other calls (its own stage's or another stage's on a shared pool).
        """
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.workers)

    def call_slot(self) -> CallSlot:
        """Hold one of the pool's call slots, if its calls are bounded."""
        return CallSlot(self.slots)

    @property
    def replacing(self) -> bool:
        """Whether a replacement of the pool is under way."""
        return self._rebuild_lock.locked()

    async def replaced_since(self, generation: int) -> bool:
        """Wait for a replacement under way to finish; whether `generation` was replaced."""
        async with self._rebuild_lock:
            return self.generation != generation

    @property
    def can_rebuild(self) -> bool:
        """Whether a broken pool can be replaced (only process pools and local Dask
        clusters the run created)."""
        return self.owned and (
            self.kind == "process"
            or (self.kind == "dask" and self.spec is not None and self.spec.address == "local")
        )

    async def replace(self, generation: int, *, kill: bool) -> tuple[bool, str]:
        """Replace generation `generation` of the pool, once, however many calls ask.

        The old executor stays in place until the new one is ready, so a call never
        finds no executor: at worst it finds the broken one and asks again.

        Args:
            generation: The generation the caller's call was made in.
            kill: Kill that generation's workers (a timed-out call holds one of them).

        Returns:
            Whether that generation was killed on purpose (its calls are innocent), and
            what ended its dead worker (`exit code 1`, `signal SIGSEGV`), if known.

        Raises:
            CrashLoop: The pool was replaced more than MAX_REBUILDS times in this run.
        """
        async with self._rebuild_lock:
            if kill:
                self._killed_generations.add(generation)
            intentional = generation in self._killed_generations
            if self.generation != generation:
                return intentional, self._death
            self.rebuilds += 1
            if self.rebuilds > MAX_REBUILDS:
                raise CrashLoop(
                    f"pool {self.name!r}: its workers died {self.rebuilds} times in this run "
                    f"(last: {self._death}); giving up"
                )
            with anyio.CancelScope(shield=True):
                started = time.perf_counter()
                self.executor = await anyio.to_thread.run_sync(self._replace, kill)
                self.start_s += time.perf_counter() - started
            self.generation += 1
            return intentional, self._death

    _death = "unknown cause"

    def _replace(self, kill: bool) -> concurrent.futures.Executor:
        # the dead worker has exited already: read its exit code before killing the rest
        processes = list(self._processes.values())
        self._death = "killed after a timeout" if kill else _cause_of_death(processes)
        self._end(self.executor, kill=True)
        return self._create()

    def _create(self) -> concurrent.futures.Executor:
        assert self.spec is not None
        if self.spec.kind == "dask":
            return _dask.start(self.name, self.spec)
        if self.spec.kind == "thread":
            return concurrent.futures.ThreadPoolExecutor(
                self.spec.workers, thread_name_prefix=f"pipeflow-{self.name}"
            )
        method = self.spec.start_method or default_start_method()
        # workers import the parent's main module only where that cannot run it again
        import_main = _compat.main_is_guarded()
        context = _compat.process_context(method, import_main=import_main)
        if method == "forkserver":
            preload = list(FORKSERVER_PRELOAD)
            context.set_forkserver_preload(["__main__", *preload] if import_main else preload)
        recycling = self.spec.max_tasks_per_child is not None
        pool_class = _RecyclingProcessPool if recycling else concurrent.futures.ProcessPoolExecutor
        executor = pool_class(
            self.spec.workers,
            mp_context=context,
            initializer=_worker.init_process_worker,
            initargs=(list(sys.path), os.getpid()),
            max_tasks_per_child=self.spec.max_tasks_per_child,
        )
        # spawn the workers now, so start-up is paid (and measured) before the work; the
        # call is a builtin, so that a worker imports nothing for it (a function of this
        # module would make each worker import the engine, structlog and rich: ~0.4 s)
        started = [executor.submit(os.getpid) for _ in range(self.prespawn or self.spec.workers)]
        concurrent.futures.wait(started)
        _compat.skip_cancelled_calls_when_broken(executor)
        self._processes = _compat.pool_processes(executor)
        if any(future.exception() is not None for future in started):
            death = _cause_of_death(list(self._processes.values()))
            executor.shutdown(wait=True, cancel_futures=True)
            main = getattr(sys.modules.get("__main__"), "__file__", None)
            raise PoolStartError(
                f"pool {self.name!r}: its worker processes died while starting ({death}); "
                + (
                    f"each worker first imports the main module {main}: it must import "
                    "without errors (the workers' error output is above)"
                    if import_main and method != "fork"
                    else "the workers' error output is above"
                )
            )
        return executor

    def pids(self) -> list[int]:
        """The process ids of the pool's live worker processes (none for threads)."""
        if isinstance(self.executor, _dask.DaskExecutor):
            return self.executor.pids()
        processes = _compat.pool_processes(self.executor)
        return [p.pid for p in list(processes.values()) if p.pid is not None]

    def unnoticed_death(self, now: float) -> str | None:
        """What ended a worker that this process pool has not noticed for STUCK_AFTER_S.

        A worker that dies while it writes a result (the OOM killer picks the largest
        process, often that one) leaves half a message in the pool's result pipe. The
        pool's manager thread then waits for the rest for good, so it never notices the
        death, and every call in the pool waits with it. Seen from here: a worker of the
        current executor has died with a non-zero exit code and the pool is still not
        broken. Call it every so often with the monotonic time.

        Returns:
            The cause of death (`signal SIGKILL`), or None while nothing is stuck.
        """
        executor = self.executor
        if self.kind != "process" or executor is None or self.replacing:
            self._dead_seen = None
            return None
        processes = list(_compat.pool_processes(executor).values())
        dead = [p for p in processes if p.exitcode not in (None, 0)]
        if not dead or _compat.pool_broken(executor):
            self._dead_seen = None
            return None
        if self._dead_seen is None or self._dead_seen[0] is not executor:
            self._dead_seen = (executor, now)
        if now - self._dead_seen[1] < STUCK_AFTER_S:
            return None
        return _cause_of_death(dead, patience=0.0)

    async def unstick(self) -> None:
        """End a pool stuck on a dead worker's half result (see `unnoticed_death`): its
        manager thread then reads end-of-file and breaks the pool, and the calls in it fail
        as after any crash. Holds off a replacement meanwhile, which ends the same pipe."""
        async with self._rebuild_lock:
            executor = self.executor
            if executor is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_kill_workers, executor)

    def shutdown(self, *, kill: bool) -> None:
        """Shut an owned pool down; with `kill`, end its processes instead of waiting.

        Blocking: call from a thread. A lent pool is left alone.
        """
        with self._lifecycle:
            self._shut = True
            executor, self.executor = self.executor, None
        if self.owned:
            self._end(executor, kill=kill)

    def abandon_thread(self) -> bool:
        """Give up on a thread stuck in a timed-out call; add one so capacity is kept.

        Returns:
            Whether a thread was abandoned (only in thread pools the run created).
        """
        executor = self.executor
        if not (self.owned and isinstance(executor, concurrent.futures.ThreadPoolExecutor)):
            return False
        _compat.add_thread(executor)
        self.abandoned += 1
        return True

    def _end(self, executor: concurrent.futures.Executor | None, *, kill: bool) -> None:
        if executor is None:
            return
        if self.kind == "thread" and (kill or self.abandoned):
            # threads cannot be killed: don't wait for calls that may never return, but
            # give the calls of a failed run a moment to end (and their thread to tear
            # its stage down) before the run returns
            executor.shutdown(wait=False, cancel_futures=True)
            if not self.abandoned:
                deadline = time.monotonic() + THREAD_GRACE_S
                for thread in _compat.pool_threads(executor):
                    thread.join(max(0.0, deadline - time.monotonic()))
            return
        if kill and isinstance(executor, _dask.DaskExecutor):
            executor.kill_workers()
        if kill and self.kind == "process":
            _kill_workers(executor)
        executor.shutdown(wait=True, cancel_futures=True)


def _kill_workers(executor: concurrent.futures.Executor) -> None:
    """SIGKILL a process pool's workers, wait for them, and close the result pipe.

    A worker killed while it wrote a result leaves half of it in the result pipe, and the
    pool's manager thread would wait for the rest forever (and the interpreter's exit with
    it): once the workers are dead, closing the parent's write end (the last one left)
    turns that wait into end-of-file, which breaks the pool.
    """
    processes = list(_compat.pool_processes(executor).values())
    for process in processes:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    for process in processes:
        with contextlib.suppress(AssertionError, ValueError):  # not started, closed
            process.join(max(0.0, deadline - time.monotonic()))
    _compat.close_result_writer(executor)


def _cause_of_death(processes: list[Any], patience: float = 1.0) -> str:
    """What ended a pool's dead worker, from the exit codes of its processes.

    The pool ends the survivors of a crash itself (SIGTERM, or exit code 255 for a
    worker that loses its pipe to the parent), so those codes tell the least; and a
    forkserver reports an exit code a moment after the pool sees the death, so this
    waits a little for a telling one.
    """
    deadline = time.monotonic() + patience
    while True:
        codes = [p.exitcode for p in processes if p.exitcode not in (None, 0, -signal.SIGTERM)]
        telling = [code for code in codes if code != 255]
        if telling or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if not codes:
        return "unknown cause"
    code = min(telling or codes, key=lambda c: c > 0)  # a signal says more than a code
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def pool_for(
    stage: Stage,
    executors: Mapping[str, Pool | concurrent.futures.Executor],
    pools: dict[str, PoolHandle],
) -> PoolHandle | None:
    """The pool `stage` runs in for one run, or None for the event loop.

    A pool's identity is what it is made from: one handle per named executor (shared by
    the stages that name it), per lent executor object, and per stage with a kind of its
    own. Handles are made on first use and kept in `pools`, the run's own.
    """
    executor = stage.executor
    if isinstance(executor, str):
        key = f"executor:{executor}"
        if key not in pools:
            declared = executors[executor]
            if isinstance(declared, Pool):
                pools[key] = PoolHandle(executor, spec=declared)
            else:
                pools[key] = PoolHandle(executor, executor=declared)
        return pools[key]
    if executor is not None:
        key = f"lent:{id(executor)}"
        pools.setdefault(key, PoolHandle(stage.name or "stage", executor=executor))
        return pools[key]
    if stage.kind == "async" or stage.kind is None:
        return None
    key = f"stage:{stage.name}"
    if stage.kind == "auto":
        return _auto_kind_pools(stage, key, pools)
    spec = Pool(stage.kind, stage.pool_workers, start_method=stage.start_method)
    pools[key] = PoolHandle(stage.name or "stage", spec=spec)
    if stage.auto_workers is not None:
        pools[key].prespawn = min(stage.auto_workers[0] or 1, stage.pool_workers)
    return pools[key]


def _auto_kind_pools(stage: Stage, key: str, pools: dict[str, PoolHandle]) -> PoolHandle:
    """A `kind: auto` stage's thread pool, and the process pool it may move to (as many
    processes as `workers` asks, never more than the free cores), started only then."""
    name = stage.name or "stage"
    threads = PoolHandle(name, spec=Pool("thread", stage.pool_workers))
    if stage.auto_workers is not None:
        processes = _auto.auto_bounds("process", *stage.auto_workers)[1]
    else:
        processes = min(stage.pool_workers, _auto.free_cores())
    spec = Pool("process", processes, start_method=stage.start_method)
    threads.switch_to = PoolHandle(name, spec=spec)
    threads.switch_to.lazy = True
    if stage.auto_workers is not None:
        threads.switch_to.prespawn = 1
    pools[key] = threads
    pools[f"{key}:process"] = threads.switch_to
    return threads
