"""The engine: one run of a pipeline, as one task group of source, stages and sink.

    source ──batches──> [queue] stage 1 ──> [queue] stage 2 ──> ... ──> [queue] sink
                                   │
                        chunks ──> executor (loop | threads | processes | lent pool)

Queues are anyio memory object streams bounded in batches, so a fast source waits for
the slowest stage instead of filling memory. A stage splits what it receives into chunks
(one executor call each), runs up to its in-flight limit of chunks at once, and emits
results either in input order, through a bounded window of pending chunks, or as they
complete. The first fatal error cancels the task group; pools are shut down on every
exit path.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import pickle
import random
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple

import anyio
import anyio.lowlevel
import anyio.to_thread
import cloudpickle
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import _group, _identity, _kind, _rate, _shipping, _worker
from ._auto import AdjustableLimiter, LatencyHistogram, tuner_for
from ._compat import pool_threads
from ._errors import (
    ConfigError,
    ItemTimeout,
    PipeflowError,
    PipelineError,
    RemoteTraceback,
    WorkerCrashed,
    short_repr,
)
from ._kind import CpuTimed, KindProbe
from ._log import logger
from ._plan import RunPlan
from ._pools import PoolHandle
from ._report import RunReport, StageReport
from ._sinks import Sink
from ._stage import Stage
from ._steps import LOOP_BLOCK_S, TimedSteps
from ._worker import ChunkResult, Collector, Failure, StageCall

__all__ = ["Runner"]

# A source batch doubles from 1 item up to this, so the first item flows at once and a
# fast source soon moves in large batches.
SOURCE_MAX_BATCH = 16384
# A batch from a slow source is sent after this long even if it is not full.
FLUSH_INTERVAL_S = 0.05
# `batch: auto` aims for executor calls this long: long enough to hide the call's
# overhead (~100 µs for a process pool), short enough to keep results flowing.
TARGET_CALL_S = {"process": 0.05, "executor": 0.05, "dask": 0.05, "thread": 0.02, "async": 0.0}
# An async stage's chunk is run by up to `workers` tasks of its own (see _call_async), so
# its size costs no concurrency: it only bounds the items held before their results go on.
MAX_CHUNK = {"process": 16384, "executor": 16384, "dask": 16384, "thread": 1024, "async": 256}
PROGRESS_INTERVAL_S = 0.2
# How often the run looks for a process pool stuck on a dead worker (see _watch_pools).
POOL_WATCH_INTERVAL_S = 0.5
SAMPLE_CALLS = 16
# A process worker interrupts an item past its timeout itself; the parent's deadline for
# a call, `timeout` per item plus this, is the backstop for an item that can't be interrupted.
BACKSTOP_GRACE_S = 1.0
# A Dask call (or any executor's but pipeflow's own pools and threads) is timed from
# when it is sent, as the client cannot see it start: its scheduling and transfer get
# this long on top of `timeout`, so that a busy cluster does not time innocent items out.
REMOTE_GRACE_S = 1.0
# Auto-sized calls of a stage with a timeout hold at most this many seconds of `timeout`,
# so that an item stuck where its worker cannot interrupt it is found within this long.
STUCK_ITEM_WINDOW_S = 10.0
# How long a stopping run waits for a source blocked on its next item before cancelling it.
STOP_GRACE_S = 2.0
# How long the end of a run waits for the workers of its pools to tear its stages down:
# an ok run waits for busy workers (a lent pool may run other work), a failed or
# cancelled one only briefly, before its own pools are killed.
END_OF_RUN_S = 10.0
END_OF_FAILED_RUN_S = 2.0
# An end-of-run call holds its worker this long, so that each worker of a process pool
# takes one call of a round.
END_LINGER_S = 0.05
# A call of a rate-limited stage holds the items of at most this long at its rate, and is
# sent this long before its first start time: items whose start is far off wait in the
# stage, not in a worker (their `timeout` counts from their start time).
RATE_HORIZON_S = 0.1
RATE_LEAD_NS = 20_000_000


class Batch(NamedTuple):
    """Items in flight together: their source positions and their values."""

    indices: Sequence[int]
    values: list[Any]


# Memory in bytes: an executor call carries at most MAX_CALL_BYTES of items and a source
# batch at most MAX_SOURCE_BATCH_BYTES (always at least one item), so what a run holds
# stays near (queues + calls in flight) x a few MiB, or one item each, whatever the item
# size. A fixed `batch:` is the user's choice and is kept.
MAX_CALL_BYTES = 4 << 20
MAX_SOURCE_BATCH_BYTES = 2 << 20
# A chunk this large is sent even while every worker is busy (see _wait_for_a_worker).
WORTH_A_CALL_BYTES = 256 << 10
# An item whose size can't be read cheaply is pickled to measure it, once in this many
# batches (and on the first).
PICKLE_SAMPLE_EVERY = 16


def cheap_size(value: Any) -> int | None:
    """The bytes `value` holds, when that is cheap to know; None otherwise."""
    if isinstance(value, bytes | bytearray | str):
        return len(value)
    if isinstance(value, memoryview):
        return value.nbytes
    if value is None or isinstance(value, bool | int | float):
        return 32
    nbytes = getattr(value, "nbytes", None)  # numpy, pyarrow and the like
    return nbytes if isinstance(nbytes, int) else None


class _ByteGauge:
    """Bytes per item of a stream of batches, from a sample of each batch: quick to rise
    (a large item is believed at once), slow to fall."""

    def __init__(self) -> None:
        self.per_item = 0.0
        self._batches = 0

    def observe(self, values: Sequence[Any]) -> None:
        if not values:
            return
        self._batches += 1
        sizes = [cheap_size(values[0]), cheap_size(values[-1])]
        if None in sizes:
            if self._batches % PICKLE_SAMPLE_EVERY != 1:
                return
            try:
                sizes = [len(pickle.dumps(values[0], pickle.HIGHEST_PROTOCOL))]
            except Exception:  # it will fail where it must cross a process boundary
                return
        size = float(max(s for s in sizes if s is not None))
        self.per_item = size if size >= self.per_item else 0.8 * self.per_item + 0.2 * size

    def items_within(self, limit: int) -> int:
        """How many items fit in `limit` bytes (at least one)."""
        if self.per_item <= 0:
            return 1 << 30
        return max(1, int(limit // self.per_item))


class _ChunkSizer:
    """Items per executor call: fixed, or sized from the measured per-item cost and
    capped by the items' bytes."""

    def __init__(self, fixed: int | None, kind: str) -> None:
        self.fixed = fixed
        self.target = TARGET_CALL_S[kind]
        self.limit = MAX_CHUNK[kind]
        # with no time to aim for (async), a chunk is as large as the limit allows
        self.size = fixed or (self.limit if self.target == 0 else 1)
        self.per_item: float | None = None
        self.by_time = self.size
        self.bytes = _ByteGauge()
        # A worker's first call loads the stage's callable (imports, setup) and costs
        # far more than its items: an estimate from first calls only is provisional, and
        # the first call that shows the items' own cost replaces it.
        self._seen: set[str] = set()
        self._provisional = True

    def observe(self, items: int, busy_s: float, worker: str = "") -> None:
        if self.fixed is not None or items == 0 or self.target == 0:
            return
        cost = max(busy_s / items, 1e-8)
        first = worker not in self._seen
        if first:
            self._seen.add(worker)
            if not self._provisional:
                return
        if self.per_item is None or (self._provisional and not first):
            self.per_item = cost
        else:
            self.per_item = 0.7 * self.per_item + 0.3 * cost
        self._provisional = self._provisional and first
        self.by_time = max(1, min(self.limit, int(self.target / self.per_item)))
        self._resize()

    def observe_values(self, values: Sequence[Any]) -> None:
        """Learn the bytes per item from a batch of a stage's inputs or outputs."""
        if self.fixed is None:
            self.bytes.observe(values)
            self._resize()

    def _resize(self) -> None:
        self.size = min(self.by_time, self.bytes.items_within(MAX_CALL_BYTES))


async def _send(send: MemoryObjectSendStream[Any], item: Any) -> float:
    """Send; return the seconds spent blocked on a full queue."""
    try:
        try:
            send.send_nowait(item)
        except anyio.WouldBlock:
            started = time.perf_counter()
            await send.send(item)
            return time.perf_counter() - started
    except anyio.BrokenResourceError:
        # the receiver has gone because the run is ending: whoever ended it reports why
        await anyio.lowlevel.checkpoint_if_cancelled()
        raise
    return 0.0


class _Puller:
    """A blocking iterator pulled in a thread of its own, one batch at a time.

    The thread pulls only the items a batch being taken has room for (nothing is read
    ahead of the run), and each item it has pulled can be taken at once: an iterator
    that blocks on its next item never holds back the items it already yielded. Items
    travel through a deque (thread-safe appends and pops, no lock per item); `pulled`
    is written by the thread only, `granted` and `taken` by the event loop only.
    """

    def __init__(self, iterator: Iterator[Any], stop: threading.Event) -> None:
        self.iterator = iterator
        self.stop = stop
        self.items: collections.deque[Any] = collections.deque()
        self.pulled = 0
        self.granted = 0
        self.taken = 0
        self.want_first = False
        self.ended = False
        self.error: BaseException | None = None
        self.quit = False
        self.cond = threading.Condition(threading.Lock())
        self.loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            self.loop.call_soon_threadsafe(self.changed.set)

    def pull(self) -> None:
        """The thread's work: pull the items granted, until the iterator ends."""
        try:
            iterator, items, stop = self.iterator, self.items, self.stop
            while True:
                if self.pulled >= self.granted:
                    with self.cond:
                        while self.pulled >= self.granted and not self.quit:
                            self.cond.wait()
                if self.quit or stop.is_set():
                    return
                try:
                    value = next(iterator)
                except StopIteration:
                    return
                items.append(value)
                self.pulled += 1
                # the loop sets want_first before it looks at the deque, and this reads
                # it after the append: one of the two sees the other
                if self.want_first or self.pulled >= self.granted:
                    self.want_first = False
                    self._notify()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended = True
            self._notify()

    async def _wait_until(self, done: Callable[[], bool], within: float | None) -> None:
        deadline = None if within is None else self.loop.time() + within
        while not done():
            self.changed.clear()
            if done():
                return
            if deadline is None:
                await self.changed.wait()
                continue
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return
            with anyio.move_on_after(remaining):
                await self.changed.wait()

    def _grant(self, size: int) -> None:
        with self.cond:
            self.granted = self.taken + size
            self.cond.notify()

    def _take_held(self) -> list[Any]:
        items = self.items
        values = [items.popleft() for _ in range(len(items))]
        self.taken += len(values)
        return values

    async def take(self, size: int, interval: float, idle: Callable[[], bool]) -> list[Any]:
        """Up to `size` items: the first whenever it comes, then what follows within
        `interval` (fewer if the iterator is slow, ends, or the run is stopping), or at
        once while `idle()` is true (`changed` is set when it becomes true)."""
        self._grant(size)
        self.want_first = True
        await self._wait_until(lambda: bool(self.items) or self.ended, None)
        self.want_first = False
        await self._wait_until(
            lambda: self.pulled >= self.granted or self.ended or self.stop.is_set() or idle(),
            interval,
        )
        values = self._take_held()
        self._grant(0)
        return values

    def stage_idle(self) -> None:
        """The first stage waits for input: a batch waiting for company goes at once."""
        if not self.want_first:  # waiting for a first item, nothing waits for company
            self.changed.set()

    async def finish(self) -> list[Any]:
        """The items pulled until the thread stops, once it is out of the iterator."""
        self.close()
        await self._wait_until(lambda: self.ended, None)
        return self._take_held()

    def close(self) -> None:
        """Let the thread go as soon as it is out of the iterator."""
        with self.cond:
            self.quit = True
            self.cond.notify()


def _leaf(exc: BaseException) -> BaseException:
    """The exception inside (nested) exception groups, or `exc` itself."""
    return unwrap_group(exc) if isinstance(exc, BaseExceptionGroup) else exc


def unwrap_group(group: BaseExceptionGroup[Any]) -> BaseException:
    """What a failed task group means for the user: its PipelineError if it has one,
    else its first exception that is not a cancellation."""
    chosen: BaseExceptionGroup[Any] | None
    chosen, _ = group.split(PipelineError)
    if chosen is None:  # an error budget exceeded, say: a closed queue is its echo
        chosen, _ = group.split(PipeflowError)
    if chosen is None:
        cancelled = anyio.get_cancelled_exc_class()
        chosen, _ = group.split(lambda e: not isinstance(e, cancelled))
    exc: BaseException = chosen if chosen is not None else group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _error_of(stage: str, index: int | None, value: Any, exc: BaseException) -> PipelineError:
    error = PipelineError(
        stage=stage,
        index=index,
        item_repr=short_repr(value) if index is not None else None,
        error_type=type(exc).__qualname__,
        error_message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )
    error.__cause__ = exc
    return error


def _sink_error(stage: str, sink: Sink, exc: BaseException) -> PipelineError:
    """A sink (`sink` or `dead_letter`) failed. A system error (a full disk) is told in
    one line, with the file it was writing: pipeflow's own frames would only hide it."""
    if not isinstance(exc, OSError):
        return _error_of(stage, None, None, exc)
    path = getattr(sink, "path", None)
    message = str(exc) if path is None or exc.filename else f"{exc}: {str(path)!r}"
    error = PipelineError(
        stage=stage,
        index=None,
        item_repr=None,
        error_type=type(exc).__qualname__,
        error_message=message,
        traceback="",
    )
    error.__cause__ = exc
    return error


def _stage_error(stage: str, failure: Failure, where: str) -> PipelineError:
    """The error that fails a run when a stage's setup or teardown raised."""
    error = PipelineError(
        stage=stage,
        index=None,
        item_repr=None,
        error_type=failure.error_type,
        error_message=f"{failure.message} ({where})",
        traceback=failure.traceback,
    )
    cause = failure.error
    if cause.__traceback__ is None and cause.__cause__ is None:
        cause.__cause__ = RemoteTraceback(failure.traceback)
    error.__cause__ = cause
    return error


# --- stages -------------------------------------------------------------------------------


class StageRun:
    """One stage during one run: its chunks, its executor calls, its error policy."""

    def __init__(
        self,
        stage: Stage,
        pool: PoolHandle | None,
        key: str,
        *,
        dead_letter: Callable[[dict[str, Any]], Awaitable[None]],
        check_error_budget: Callable[[], None],
        teardown_failures: list[tuple[str, str, Failure]],
    ) -> None:
        # the run's hooks this stage needs, and nothing else of the run
        self.dead_letter = dead_letter
        self.check_error_budget = check_error_budget
        self.teardown_failures = teardown_failures
        self.stage = stage
        self.name: str = stage.name or "stage"
        self.pool = pool
        self.kind = pool.kind if pool is not None else "async"
        self.workers = pool.workers if pool is not None else stage.pool_workers
        # A process worker times each of its items itself (see _worker._run_timed), so a
        # call may hold many items. Elsewhere the parent's clock is an item's only clock:
        # each call holds one item, except a map_batch call, which holds the batch the
        # stage asked for and gets `timeout` for each of its items.
        self.worker_timed = (
            stage.timeout is not None and self.kind == "process" and _worker.ITEM_TIMERS
        )
        # an async stage times each coroutine of a chunk itself (see _call_async)
        one_per_call = (
            stage.timeout is not None
            and not self.worker_timed
            and stage.op != "map_batch"
            and self.kind != "async"
        )
        fixed = 1 if one_per_call else (None if stage.batch == "auto" else int(stage.batch))
        rate = stage.rate_limit
        self.pacer = _rate.Pacer(rate) if rate is not None else None
        rate_cap = _rate_cap(stage)
        if fixed is not None and rate_cap is not None:
            fixed = min(fixed, rate_cap)
        self.sizer = _ChunkSizer(fixed, self.kind)
        if rate_cap is not None:
            self.sizer.limit = min(self.sizer.limit, rate_cap)
            self.sizer.size = min(self.sizer.size, rate_cap)
        if self.worker_timed and stage.timeout is not None:
            # an item stuck where its worker cannot interrupt it is caught by the call's
            # deadline, `timeout` per item: keep auto-sized calls short enough for it
            self.sizer.limit = max(
                1, min(self.sizer.limit, int(STUCK_ITEM_WINDOW_S / stage.timeout))
            )
        if stage.timeout is not None and pool is not None:
            pool.bound_calls()
        # a process pool is kept busy by one call queued behind each running one
        remote = self.kind in ("process", "executor", "dask")
        self.in_flight = self.workers * 2 if remote and rate is None else self.workers
        # asyncio's own primitives on the per-chunk path: anyio's look up the running
        # backend on every call, which costs more than the rest of a thread-pool call
        self.limiter = asyncio.Semaphore(self.in_flight)
        # chunks taken from `_chunks` whose slot is not yet released, and a wake-up for
        # a chunk that waits for company while every worker is busy (see _chunks)
        self.calls_running = 0
        self.worker_freed = asyncio.Event()
        # an async stage's lanes (see _call_async): each runs one coroutine at a time
        self.lanes_free = self.workers
        self.lane_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # true while the stage holds a free slot and waits for input; `on_hungry` is
        # called as it starts to wait (the source hands over what it holds at once)
        self.hungry = False
        self.on_hungry: Callable[[], None] | None = None
        self.report = StageReport(
            name=self.name, kind=self.kind, workers=self.workers, queue_size=stage.queue_size
        )
        self.latency = LatencyHistogram()
        # `workers: auto`: a tuner sets the concurrency from here on (see _auto)
        self.tuner = tuner_for(
            stage.auto_workers, self.kind, self.workers, self.report, self._set_workers
        )
        if self.tuner is not None:
            self.in_flight = self.workers  # each call holds a worker: the limit is exact
            self.limiter = AdjustableLimiter(self.in_flight)  # type: ignore[assignment]
            self._set_workers(self.tuner.controller.limit)
        self.retry = stage.retry
        self.random = random.Random()
        self.call: StageCall | None = None
        self.async_state: Any = None
        # set to a list (the bench does) to keep the items and results of the first
        # SAMPLE_CALLS calls, from which their pickling cost is estimated after the run
        self.samples: list[tuple[list[Any], list[Any]]] | None = None
        self.worker_info = _identity.stage_info(
            stage.setup, self.name, pool.workers if pool is not None else self.workers, self.kind
        )
        if pool is not None:
            self.call = self._stage_call(key)
            if self.worker_timed:
                self.call = dataclasses.replace(self.call, timeout=stage.timeout)
            if self.worker_info is not None:
                self.call = dataclasses.replace(self.call, worker_info=self.worker_info)
        # the call sent by default when the callables go to each worker once (see _shipping)
        self.light_call = _shipping.light_call(self.call, pool) if self.call else None
        # `kind: auto`: a plain function is measured on threads first (see _auto.KindProbe)
        self.kind_probe: KindProbe | None = None
        if stage.auto_kind:
            self._probe_kind()

    def _stage_call(self, key: str) -> StageCall:
        stage = self.stage
        if not (self.pool is not None and self.pool.remote):
            return StageCall(key, stage.fn, stage.op, stage.setup, stage.teardown)
        parts = {"fn": stage.fn, "setup": stage.setup, "teardown": stage.teardown}
        blobs: dict[str, bytes | None] = {}
        for part, obj in parts.items():
            if obj is None:
                blobs[part] = None
                continue
            try:
                blobs[part] = cloudpickle.dumps(obj)
            except Exception as exc:
                raise ConfigError(
                    f"stage {self.name!r}: its {part} cannot be pickled for a process pool "
                    f"({type(exc).__name__}: {exc}); use a module-level function, or kind: thread"
                ) from None
        fn_blob = blobs["fn"]
        assert fn_blob is not None
        return StageCall(key, fn_blob, stage.op, blobs["setup"], blobs["teardown"])

    def open_index_table(self) -> None:
        """Create the table process workers draw their index from, if setup wants one."""
        call = self.call
        if call is not None and call.worker_info is not None and self.kind != "thread":
            self.call = dataclasses.replace(call, index_file=_identity.new_index_file())
            if self.light_call is not None:
                self.light_call = dataclasses.replace(
                    self.light_call, index_file=self.call.index_file
                )

    def close_index_table(self) -> None:
        """Remove the table of process indexes (the run's workers are done with it)."""
        if self.call is not None and self.call.index_file is not None:
            _identity.remove_index_file(self.call.index_file)

    # --- the stage's main loop ---

    async def run(
        self, recv: MemoryObjectReceiveStream[Batch], out: MemoryObjectSendStream[Batch]
    ) -> None:
        """Take batches from `recv` until it ends, send results to `out`, then close it."""
        stage = self.stage
        logger.debug("stage_start", stage=self.name, kind=self.kind, workers=self.workers)
        async with recv, out:
            if self.kind == "async" and stage.setup is not None:
                try:
                    state = _identity.call_setup(stage.setup, self.worker_info)
                    self.async_state = await state if isinstance(state, Awaitable) else state
                except Exception as exc:  # as a thread or process stage's setup fails
                    failure = _worker.Collector.failure_of(exc)
                    raise _stage_error(self.name, failure, "in setup") from exc
            try:
                async with anyio.create_task_group() as tg:
                    if stage.ordered:
                        await self._dispatch_ordered(tg, recv, out)
                    else:
                        await self._dispatch_unordered(tg, recv, out)
            finally:
                if self.kind == "async" and stage.setup is not None and stage.teardown:
                    with anyio.CancelScope(shield=True):
                        try:
                            result = stage.teardown(self.async_state)
                            if isinstance(result, Awaitable):
                                await result
                        except Exception as exc:  # reported at the run's end, as any kind's
                            self.teardown_failures.append(
                                (self.name, "event loop", _worker.Collector.failure_of(exc))
                            )
        if self.kind_probe is not None:  # the input ended before the probe could choose
            self.kind_probe = None
            self._chose_kind("thread", "its input ended before it was measured: on threads")
        logger.debug(
            "stage_end",
            stage=self.name,
            items_in=self.report.items_in,
            items_out=self.report.items_out,
        )

    async def _dispatch_ordered(
        self,
        tg: TaskGroup,
        recv: MemoryObjectReceiveStream[Batch],
        out: MemoryObjectSendStream[Batch],
    ) -> None:
        # Pending slots are bounded: a slow head chunk holds back at most this many others.
        slots_send, slots_recv = anyio.create_memory_object_stream[
            asyncio.Future[Batch] | _DirectCall
        ](self.in_flight * 2)
        tg.start_soon(self._emit_in_order, slots_recv, out)
        loop = asyncio.get_running_loop()
        direct = self._direct_executor()
        stage_call = self.call
        async with slots_send:
            async for chunk in self._input(tg, recv):
                if direct is not None and stage_call is not None:
                    # no task per chunk: the emitter awaits the executor's own future
                    call = loop.run_in_executor(direct, _worker.run_chunk, stage_call, chunk.values)
                    call.add_done_callback(self._release)
                    await _send(slots_send, _DirectCall(chunk, call))
                    continue
                slot: asyncio.Future[Batch] = loop.create_future()
                await slots_send.send(slot)
                tg.start_soon(self._fill_slot, chunk, slot)

    def _direct_executor(self) -> concurrent.futures.Executor | None:
        """The executor an ordered stage may call straight from its dispatcher: a thread
        pool (it never breaks) whose calls are not bounded for a per-item timeout (which
        needs a task to enforce)."""
        pool = self.pool
        if (
            pool is None
            or pool.kind != "thread"
            or pool.slots is not None
            or self.pacer
            or self.kind_probe
        ):
            return None
        return pool.executor

    def _release(self, call: asyncio.Future[ChunkResult]) -> None:
        self._call_done()
        if not call.cancelled():
            # a call the emitter never awaits (the run ended first) keeps its error to
            # itself; the emitter still gets it when it awaits the call
            call.exception()

    async def _fill_slot(self, chunk: Batch, slot: asyncio.Future[Batch]) -> None:
        try:
            output = await self.process(chunk)
        finally:
            self._call_done()
        if not slot.cancelled():  # the emitter cancels it when the run is cancelled
            slot.set_result(output)

    async def _emit_in_order(
        self,
        slots: MemoryObjectReceiveStream[asyncio.Future[Batch] | _DirectCall],
        out: MemoryObjectSendStream[Batch],
    ) -> None:
        async with slots:
            async for slot in slots:
                if isinstance(slot, _DirectCall):
                    try:
                        result = await slot.call
                    except (anyio.get_cancelled_exc_class(), _worker.UnpicklableError):
                        raise
                    except Exception:  # the call failed as a whole: take the careful path
                        output = await self.process(slot.chunk)
                    else:
                        self._account(len(slot.chunk.values), result)
                        output = await self.settle(slot.chunk, result)
                else:
                    output = await slot
                if output.values:
                    self.report.blocked_s += await _send(out, output)

    async def _dispatch_unordered(
        self,
        tg: TaskGroup,
        recv: MemoryObjectReceiveStream[Batch],
        out: MemoryObjectSendStream[Batch],
    ) -> None:
        async for chunk in self._input(tg, recv):
            tg.start_soon(self._process_and_send, chunk, out)

    async def _process_and_send(self, chunk: Batch, out: MemoryObjectSendStream[Batch]) -> None:
        try:
            output = await self.process(chunk)
        finally:
            self._call_done()
        if output.values:
            self.report.blocked_s += await _send(out, output)

    def _input(self, tg: TaskGroup, recv: MemoryObjectReceiveStream[Batch]) -> Any:
        """The stage's chunks: groups (see _group) for a grouping stage, else _chunks."""
        if self.stage.grouping is None:
            return self._chunks(recv)
        grouped = _group.GroupedInput(
            self.stage.grouping, slots=self.limiter, max_ready=self.in_flight
        )
        tg.start_soon(self._read_groups, grouped, recv)
        return self._groups(grouped)

    async def _read_groups(
        self, grouped: _group.GroupedInput, recv: MemoryObjectReceiveStream[Batch]
    ) -> None:
        waited_since = 0.0

        def on_wait(waiting: bool) -> None:
            nonlocal waited_since
            self.hungry = waiting  # the source sends what it holds at once
            if not waiting:
                self.report.idle_s += time.perf_counter() - waited_since
                return
            waited_since = time.perf_counter()
            if self.on_hungry is not None:
                self.on_hungry()

        def on_taken(items: int) -> None:
            self.report.items_in += items

        try:
            await grouped.read(recv, on_wait, on_taken)
        except _group.KeyFailed as failed:
            raise _error_of(self.name, failed.index, failed.value, failed.error) from failed.error

    async def _groups(self, grouped: _group.GroupedInput) -> Any:
        async for indices, values in grouped.groups():
            self.calls_running += 1
            yield Batch(indices, values)

    async def _chunks(self, recv: MemoryObjectReceiveStream[Batch]) -> Any:
        """Chunks to run, each holding a slot of `limiter` (its taker releases it).

        A chunk is formed once a slot is free, from what arrives merged with what waits
        then, split to size: under load batches wait in the queue and merge into chunks
        of the stage's own size; an idle stage runs what comes at once.
        """
        report = self.report
        indices: Sequence[int] = ()
        values: list[Any] = []
        start = size = 0
        while True:
            await self.limiter.acquire()
            if self.kind_probe is not None and self.kind_probe.choice is not None:
                await self._settle_kind()
            if start >= len(values):
                try:
                    batch = recv.receive_nowait()
                except anyio.WouldBlock:
                    started = time.perf_counter()
                    self.hungry = True
                    if self.on_hungry is not None:
                        self.on_hungry()
                    try:
                        batch = await recv.receive()
                    except anyio.EndOfStream:
                        self.limiter.release()
                        return
                    finally:
                        self.hungry = False
                    report.idle_s += time.perf_counter() - started
                except anyio.EndOfStream:
                    self.limiter.release()
                    return
                # the fill before this receive: what is left, plus the batch just taken (a
                # waiting sender's batch may already have taken its place: the bound caps it)
                waiting = min(recv.statistics().current_buffer_used + 1, report.queue_size)
                if waiting > report.queue_high_water:
                    report.queue_high_water = waiting
                indices, values = batch
                self.sizer.observe_values(values)
                size = self.sizer.size
                merged = False
                deadline: float | None = None
                while len(values) < size:  # merge what waits
                    try:
                        more = recv.receive_nowait()
                    except anyio.EndOfStream:
                        break
                    except anyio.WouldBlock:
                        # what comes while every worker is busy joins this chunk
                        if deadline is None:
                            deadline = time.perf_counter() + FLUSH_INTERVAL_S
                        if not await self._wait_for_a_worker(deadline, len(values)):
                            break
                        continue
                    if not merged:
                        indices, values, merged = list(indices), list(values), True
                    assert isinstance(indices, list)
                    indices.extend(more.indices)
                    values.extend(more.values)
                count = len(values)
                report.items_in += count
                start = 0
                size = self._share(size, count, recv)
                if count <= size:
                    start = count
                    self.calls_running += 1
                    yield Batch(indices, values)
                    continue
            elif self.sizer.size > size:
                # the rest of a batch cut while the size was still unknown: cut it anew
                size = self._share(self.sizer.size, len(values) - start, recv)
            end = start + size
            chunk = Batch(indices[start:end], values[start:end])
            start = end
            self.calls_running += 1
            yield chunk

    def _call_done(self) -> None:
        """A chunk from `_chunks` is done with its slot."""
        self.limiter.release()
        self.calls_running -= 1
        self.worker_freed.set()

    async def _wait_for_a_worker(self, deadline: float, items: int) -> bool:
        """While every worker of an auto-sized remote stage is busy, wait until one is
        free (or `deadline`): whether the chunk at hand may wait for company meanwhile.

        Its own queued call would only wait in the pool behind theirs, and what arrives
        meanwhile joins it: a stage fed in small batches by a slower stage runs calls of
        its own size instead of the other stage's fragments. A free worker takes the
        chunk at once (the latency of an idle stage is untouched). A chunk of large items
        goes at once too: queued behind a busy worker, its transfer overlaps their work.
        """
        if (
            self.sizer.fixed is not None
            or self.kind not in ("process", "executor", "dask")
            or self.calls_running < self.workers
            or items * self.sizer.bytes.per_item >= WORTH_A_CALL_BYTES
        ):
            return False
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return False
        self.worker_freed.clear()
        with anyio.move_on_after(remaining):
            await self.worker_freed.wait()
        return True

    def _share(self, size: int, count: int, recv: MemoryObjectReceiveStream[Batch]) -> int:
        """The chunk size for `count` items at hand: nothing else waits, share them
        between the workers."""
        if (
            recv.statistics().current_buffer_used == 0
            and self.workers > 1
            and self.kind != "async"  # its lanes share a chunk between the workers
        ):
            return min(size, math.ceil(count / self.workers))
        return size

    # --- one chunk ---

    async def process(self, chunk: Batch) -> Batch:
        """Run one chunk, retrying and settling failures; return its results in order."""
        return await self.settle(chunk, await self._call_isolating(chunk.values))

    async def settle(self, chunk: Batch, result: ChunkResult) -> Batch:
        """A chunk's results in order, once its failures are retried or settled."""
        if not result.failures:
            return self._outputs_fast(chunk, result)
        by_position: dict[int, list[Any]] = {}
        self._collect(result, range(len(chunk.values)), by_position)
        failures = result.failures
        attempt = 1
        while failures:
            retryable: list[Failure] = []
            for failure in failures:
                if self._should_retry(failure, attempt):
                    retryable.append(failure)
                else:
                    await self._settle_failure(chunk, failure, attempt, result.worker)
            if not retryable:
                break
            self.report.retries += len(retryable)
            assert self.retry is not None
            logger.info(
                "item_retry",
                stage=self.name,
                attempt=attempt + 1,
                items=[chunk.indices[f.position] for f in retryable],
                error=retryable[0].error_type,
            )
            await anyio.sleep(self.retry.delay(attempt, self.random.random))
            attempt += 1
            positions = [f.position for f in retryable]
            result = await self._call_isolating([chunk.values[p] for p in positions])
            self._collect(result, positions, by_position)
            failures = [
                Failure(positions[f.position], f.error, f.error_type, f.message, f.traceback)
                for f in result.failures
            ]
        indices: list[int] = []
        values: list[Any] = []
        for position in sorted(by_position):
            produced = by_position[position]
            values.extend(produced)
            indices.extend([chunk.indices[position]] * len(produced))
        self.report.items_out += len(values)
        return Batch(indices, values)

    def _outputs_fast(self, chunk: Batch, result: ChunkResult) -> Batch:
        self.report.items_out += len(result.outputs)
        if self.stage.op == "filter":
            self.report.filtered_out += len(chunk.values) - len(result.outputs)
        if result.kept is None:
            return Batch(chunk.indices, result.outputs)
        indices = chunk.indices
        return Batch([indices[p] for p in result.kept], result.outputs)

    def _collect(
        self, result: ChunkResult, positions: Sequence[int], by_position: dict[int, list[Any]]
    ) -> None:
        """File a (partial) chunk's outputs under the chunk positions they came from."""
        failed = {f.position for f in result.failures}
        kept = result.kept if result.kept is not None else range(len(result.outputs))
        for output, local in zip(result.outputs, kept, strict=True):
            by_position.setdefault(positions[local], []).append(output)
        if self.stage.op == "filter":
            passed = {positions[local] for local in kept}
            dropped = [p for i, p in enumerate(positions) if i not in failed and p not in passed]
            self.report.filtered_out += len(dropped)

    def _should_retry(self, failure: Failure, attempt: int) -> bool:
        retry = self.retry
        if retry is None or attempt >= retry.attempts or isinstance(failure.error, WorkerCrashed):
            return False
        return isinstance(failure.error, retry.retry_on)

    async def _settle_failure(
        self, chunk: Batch, failure: Failure, attempts: int, worker: str
    ) -> None:
        """Apply `on_error` to an item whose last attempt failed."""
        report = self.report
        index = chunk.indices[failure.position]
        value = chunk.values[failure.position]
        policy = self.stage.on_error
        report.errors += 1
        if isinstance(failure.error, WorkerCrashed):
            report.crashed += 1
        elif isinstance(failure.error, ItemTimeout):
            report.timed_out += 1
        logger.warning(
            "item_error",
            stage=self.name,
            index=index,
            item=short_repr(value),
            error=failure.error_type,
            message=failure.message,
            attempts=attempts,
            worker=worker,
            on_error=policy,
        )
        if policy == "fail":
            report.failed += 1
            raise self._pipeline_error(index, value, failure, attempts)
        if policy == "skip":
            report.skipped += 1
        else:
            report.dead_lettered += 1
            record = {
                "stage": self.name,
                "index": index,
                "item": value,
                "error": failure.error_type,
                "message": failure.message,
                "traceback": failure.traceback,
                "attempts": attempts,
            }
            await self.dead_letter(record)
        self.check_error_budget()

    def _pipeline_error(
        self, index: int, value: Any, failure: Failure, attempts: int
    ) -> PipelineError:
        error = PipelineError(
            stage=self.name,
            index=index,
            item_repr=short_repr(value),
            error_type=failure.error_type,
            error_message=failure.message,
            traceback=failure.traceback,
            attempts=attempts,
        )
        cause = failure.error
        if cause.__traceback__ is None and cause.__cause__ is None:
            cause.__cause__ = RemoteTraceback(failure.traceback)
        error.__cause__ = cause
        return error

    # --- executor calls ---

    async def _call_isolating(self, values: list[Any], *, suspect: bool = False) -> ChunkResult:
        """Call for a chunk, and pin any failure of the call itself on its own item.

        A call that fails as a whole (an item or a result that cannot be pickled) is
        split into one call per item. A call whose worker process died is run again
        alone, bisected while it keeps crashing, so its innocent items complete and the
        item that kills its worker is convicted as `WorkerCrashed`.
        """
        try:
            result = await self._call(values, alone=suspect)
        except _Crashed as crash:
            if len(values) > 1:
                middle = len(values) // 2
                halves = [
                    await self._call_isolating(values[:middle], suspect=True),
                    await self._call_isolating(values[middle:], suspect=True),
                ]
                return self._merge(halves, [0, middle])
            if not suspect:
                return await self._call_isolating(values, suspect=True)
            return self._failed_chunk(
                WorkerCrashed(f"the worker process running this item died ({crash.cause})")
            )
        except _ChunkCallError as exc:
            if isinstance(exc.error, _worker.SetupFailed):  # fails the run, whatever on_error
                error = _stage_error(self.name, exc.error.failure, "in setup")
                raise error from error.__cause__
            if len(values) == 1:
                return self._failed_chunk(exc.error)
            singles = [await self._call_isolating([value], suspect=suspect) for value in values]
            return self._merge(singles, range(len(values)))
        if self.samples is not None and len(self.samples) < SAMPLE_CALLS:
            self.samples.append((values, result.outputs))
        self._account(len(values), result)
        return result

    def _account(self, items: int, result: ChunkResult) -> None:
        self.report.calls += 1
        self.report.busy_s += result.busy_s
        by_worker = self.report.by_worker
        by_worker[result.worker] = by_worker.get(result.worker, 0) + items
        self.sizer.observe(items, result.busy_s, result.worker)
        self.sizer.observe_values(result.outputs)
        if self.kind != "async":  # an async stage's items are timed one by one
            self.latency.add(result.busy_s / max(1, items), items)
            if self.kind_probe is not None:
                self.kind_probe.completed(items, result.busy_s)
            elif self.tuner is not None:
                self.tuner.completed(items, result.busy_s)

    def _failed_chunk(self, exc: BaseException) -> ChunkResult:
        collector = Collector(self.stage.op)
        collector.fail(0, exc)
        failure = collector.failures[0]
        if isinstance(exc, _worker.UnpicklableError | WorkerCrashed | ItemTimeout):
            failure.traceback = f"{failure.error_type}: {failure.message}\n"
        return collector.result(time.perf_counter())

    @staticmethod
    def _merge(results: list[ChunkResult], offsets: Sequence[int]) -> ChunkResult:
        """One result from the results of consecutive parts of a chunk."""
        outputs: list[Any] = []
        kept: list[int] = []
        failures: list[Failure] = []
        for offset, result in zip(offsets, results, strict=True):
            outputs.extend(result.outputs)
            local = result.kept if result.kept is not None else range(len(result.outputs))
            kept.extend(offset + position for position in local)
            failures.extend(
                Failure(offset + f.position, f.error, f.error_type, f.message, f.traceback)
                for f in result.failures
            )
        busy = sum(r.busy_s for r in results)
        return ChunkResult(outputs, kept, failures, busy, results[-1].worker if results else "")

    async def _call(self, values: list[Any], *, alone: bool = False) -> ChunkResult:
        """One executor call for a chunk.

        A call that a pool replacement stops before it completes (cancelled while it
        waits in the old pool, refused by the old pool as it shuts down, or lost with a
        worker killed over another call) runs again on the new pool, and counts as
        neither an error nor a retry; a call that completed is never run again.

        Raises:
            _Crashed: The pool broke while the call was in it (the pool is replaced).
            _ChunkCallError: The call failed as a whole, or timed out.
            PipelineError: A pool that cannot be replaced (one lent by the app) broke.
        """
        pool = self.pool
        if pool is None:
            return await self._call_async(values)
        assert self.call is not None
        call = self.light_call or self.call
        deadline_s = self._deadline(len(values))
        while True:
            if pool.replacing:
                await pool.replaced_since(pool.generation)
            # a call run again (after a pool replacement) takes start times again
            starts = self._start_times(values)
            if starts is not None:
                await _rate.wait_until(starts[0] - RATE_LEAD_NS)
            generation = pool.generation
            executor = pool.executor
            assert executor is not None
            gate = pool.gate.alone() if alone else pool.gate.shared()
            async with (
                gate if pool.can_rebuild else contextlib.nullcontext(),
                pool.call_slot() as slot,
            ):
                # with a slot a worker is free: the item's clock starts now
                try:
                    submitted = executor.submit(_worker.run_chunk, call, values, starts)
                except (BrokenProcessPool, RuntimeError) as exc:
                    # broken already, or shut down by a replacement: the call never ran
                    if not pool.can_rebuild:
                        raise self._unreplaceable(exc) from exc
                    if isinstance(exc, BrokenProcessPool):
                        await pool.replace(generation, kill=False)
                    elif not await pool.replaced_since(generation):
                        raise
                    continue
                future = asyncio.wrap_future(submitted)
                scope = None
                try:
                    if deadline_s is not None and not pool.owned:
                        # a lent pool may queue the call behind other work (the app's,
                        # another run's), which its slots cannot see: the items' clock
                        # starts once the pool runs the call
                        await _running(submitted)
                    if deadline_s is not None:
                        # a rate-limited call's clock starts at its first start time
                        scope = anyio.move_on_after(deadline_s + _rate.seconds_until(starts))
                    with scope or contextlib.nullcontext():
                        # asyncio.wait, unlike awaiting the future, raises CancelledError
                        # only when this task is cancelled (the run's cancellation or the
                        # deadline), never because the pool cancelled the call
                        await asyncio.wait((future,))
                finally:
                    if not future.done():  # cancelled, or past its deadline
                        future.cancel()
                if future.done() and not future.cancelled():
                    # completed (even as its deadline passed): never run it again
                    error = future.exception()
                    if error is None:
                        return future.result()
                    if isinstance(error, _worker.NotLoaded):
                        call = self.call  # with the callables, which the worker keeps
                        continue
                    if isinstance(error, _worker.UnpicklableError):
                        raise error
                    if not isinstance(error, BrokenProcessPool):
                        raise _ChunkCallError(error) from None  # pickling, mostly
                    if not pool.can_rebuild:
                        raise self._unreplaceable(error) from error
                    # outside the deadline: waiting for a new pool is not the item's time
                    intentional, cause = await pool.replace(generation, kill=False)
                    if intentional:
                        continue  # we killed that pool ourselves, over another call
                    raise _Crashed(cause) from None
                if not (scope is not None and scope.cancelled_caught):
                    # cancelled by the pool, not by this run (that raises above): a
                    # replacement drops the calls queued in the old pool before they start
                    if pool.can_rebuild and await pool.replaced_since(generation):
                        continue
                    raise self._unreplaceable(RuntimeError("it cancelled a call"))
                if submitted.cancelled() or pool.replacing or pool.generation != generation:
                    # timed out before it started, or in a pool being replaced over
                    # another call: not the item's doing
                    await pool.replaced_since(generation)
                    continue
                # timed out: a process can be killed (the pool is replaced and the other
                # calls in it run again); a thread cannot, it is abandoned
                if pool.can_rebuild:
                    await pool.replace(generation, kill=True)
                elif pool.abandon_thread():
                    logger.warning(
                        "thread_abandoned",
                        stage=self.name,
                        hint="a thread cannot be killed: it runs on until its call returns; "
                        "one more thread keeps the stage's capacity",
                    )
                else:
                    # a lent pool's worker stays busy with the call: so does its slot, so
                    # that no other item's clock runs while it waits behind this call
                    slot.hold_until_done(submitted)
                timeout = self.stage.timeout
                assert timeout is not None and deadline_s is not None
                if self.stage.op == "map_batch":
                    allowed = timeout * len(values)
                    message = (
                        f"timed out after {allowed:g}s ({len(values)} items at {timeout:g}s each)"
                    )
                    return self._timed_out_batch(values, message)
                message = f"timed out after {timeout:g}s in a {self.kind} worker"
                if self.worker_timed:
                    message += f" (it could not be interrupted: killed after {deadline_s:g}s)"
                # a chunk of several items: the item that cannot be interrupted is found
                # by running them one by one (see _call_isolating)
                raise _ChunkCallError(ItemTimeout(message))

    def _start_times(self, values: list[Any]) -> list[int] | None:
        """The start time of each call of fn for `values`, or None: no rate limit."""
        if self.pacer is None:
            return None
        return self.pacer.starts(1 if self.stage.op == "map_batch" else len(values))

    def _loop_blocked(self, seconds: float) -> None:
        """One step of this async stage held the event loop for `seconds`."""
        report = self.report
        report.loop_blocked_s += seconds
        if seconds > report.max_loop_block_s:
            report.max_loop_block_s = seconds
            logger.warning(
                "loop_blocked",
                stage=self.name,
                seconds=round(seconds, 3),
                hint="the stage ran this long without awaiting, and every other stage "
                "waited: await the slow call, or make the stage kind: thread",
            )

    def _deadline(self, items: int) -> float | None:
        """Seconds a call of `items` items may take once it holds a worker, or None."""
        timeout = self.stage.timeout
        if timeout is None:
            return None
        if self.worker_timed:
            return timeout * items + BACKSTOP_GRACE_S
        if self.kind in ("dask", "executor"):
            return timeout * items + REMOTE_GRACE_S
        return timeout * items

    def _timed_out_batch(self, values: list[Any], message: str) -> ChunkResult:
        collector = Collector(self.stage.op)
        collector.fail_batch(values, ItemTimeout(message))
        for failure in collector.failures:
            failure.traceback = f"ItemTimeout: {message}\n"
        return collector.result(time.perf_counter())

    def _unreplaceable(self, exc: BaseException) -> PipelineError:
        """The run's error when a pool pipeflow cannot replace breaks or shuts down."""
        pool = self.pool
        assert pool is not None
        which = f"the pool lent to stage {self.name!r}" if not pool.owned else f"pool {pool.name!r}"
        if isinstance(exc, BrokenProcessPool):
            cause: BaseException = WorkerCrashed(
                f"a worker process of {which} died, which breaks the pool for good; it "
                "cannot be replaced (pipeflow replaces only the pools it creates), so the "
                "run stops rather than fail every later item"
            )
        else:
            cause = RuntimeError(f"{which} stopped taking calls ({exc}); the run stops")
        return _error_of(self.name, None, None, cause)

    async def _call_async(self, values: list[Any]) -> ChunkResult:
        started = time.perf_counter()
        fn = self.stage.fn
        has_state = self.stage.setup is not None
        timeout = self.stage.timeout
        collector = Collector(self.stage.op)
        starts = self._start_times(values)
        if self.stage.op == "map_batch":
            if starts is not None:
                await _rate.wait_until(starts[0])
            try:
                call = fn(values, self.async_state) if has_state else fn(values)
                collector.add_batch(values, await TimedSteps(call, self._loop_blocked))
            except Exception as exc:
                collector.fail_batch(values, exc)
            return collector.result(started)
        # The chunk's coroutines are run by lanes: tasks that each take the next item
        # until none is left, one coroutine at a time. A lane holds one of the stage's
        # `workers` lanes, so that at most `workers` coroutines of the stage run at once.
        # The chunk's own task is its first lane; more start only once that lane has let
        # the loop run with items left (a coroutine waited), so that coroutines that never
        # wait run a whole chunk in one task.
        count = len(values)
        outcomes: list[Any] = [None] * count
        state = self.async_state
        next_position = 0
        failed = False
        perf_counter = time.perf_counter
        # coroutines that end without waiting are counted together, once per chunk
        instant_items = 0
        instant_s = 0.0

        async def lane() -> None:
            nonlocal next_position, failed, instant_items, instant_s
            try:
                while next_position < count:
                    if growing:
                        grow()
                    position = next_position
                    next_position += 1
                    value = values[position]
                    if starts is not None:
                        await _rate.wait_until(starts[position])
                    item_started = perf_counter()
                    try:
                        coro = fn(value, state) if has_state else fn(value)
                        if timeout is None:
                            # the first step runs here: a coroutine that never waits
                            # costs no awaitable of its own
                            try:
                                yielded = coro.send(None)
                            except StopIteration as done:
                                took = perf_counter() - item_started
                                if took > LOOP_BLOCK_S:
                                    self._loop_blocked(took)
                                outcomes[position] = done.value
                                instant_items += 1
                                instant_s += took
                                continue
                            except BaseException:
                                took = perf_counter() - item_started
                                if took > LOOP_BLOCK_S:
                                    self._loop_blocked(took)
                                raise
                            took = perf_counter() - item_started
                            if took > LOOP_BLOCK_S:
                                self._loop_blocked(took)
                            outcomes[position] = await TimedSteps(coro, self._loop_blocked, yielded)
                        else:
                            call = TimedSteps(coro, self._loop_blocked)
                            with anyio.fail_after(timeout):
                                outcomes[position] = await call
                    except TimeoutError as exc:
                        outcomes[position] = _AsyncFailure(
                            exc if timeout is None else ItemTimeout(f"timed out after {timeout:g}s")
                        )
                        failed = True
                    except Exception as exc:
                        outcomes[position] = _AsyncFailure(exc)
                        failed = True
                    self._item_done(perf_counter() - item_started)
            finally:
                self._release_lane()

        growing = False

        def grow() -> None:
            nonlocal growing
            growing = True
            spare = count - next_position
            while spare > 0 and self.lanes_free > 0 and not self.lane_waiters:
                self.lanes_free -= 1
                spare -= 1
                tg.start_soon(lane)

        await self._take_lane()
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:
            handle = loop.call_soon(grow)
            try:
                await lane()
            finally:
                handle.cancel()
        if instant_items:
            self._items_done(instant_items, instant_s)
        if not failed and self.stage.op == "map":
            collector.outputs = outcomes
            return collector.result(started)
        for position, outcome in enumerate(outcomes):
            if type(outcome) is _AsyncFailure:
                collector.fail(position, outcome.error)
            else:
                collector.add(position, values[position], outcome)
        return collector.result(started)

    # --- kind: auto ---

    def _probe_kind(self) -> None:
        stage, pool, call = self.stage, self.pool, self.call
        if pool is None or call is None:
            self._chose_kind("async", "async def: runs on the event loop")
        elif pool.switch_to is None or stage.timeout is not None or stage.setup is not None:
            self._chose_kind("thread", "with a timeout or a setup, it stays on threads")
        elif stage.rate_limit is not None or stage.grouping is not None:
            self._chose_kind("thread", "with a rate or a group, it stays on threads")
        elif unpicklable := _kind.unpicklable(stage.fn):
            self._chose_kind("thread", f"{unpicklable}: it stays on threads")
        elif pool.workers < 2:
            # the probe compares one call at a time with two: one thread cannot show it
            self._chose_kind("thread", "with one worker there is nothing to compare")
        else:
            timed = CpuTimed(stage.fn, batch=stage.op == "map_batch")
            self.call = dataclasses.replace(call, fn=timed)
            if not isinstance(self.limiter, AdjustableLimiter):
                self.limiter = AdjustableLimiter(self.in_flight)  # type: ignore[assignment]
            assert isinstance(self.limiter, AdjustableLimiter)
            self.kind_probe = KindProbe(
                timed, self.report, self.limiter.set_limit, lambda: pool_threads(pool.executor)
            )

    def _chose_kind(self, kind: str, reason: str) -> None:
        self.report.kind_choice = {"kind": kind, "reason": reason}
        logger.info("kind_chosen", stage=self.name, kind=kind, reason=reason)

    async def _settle_kind(self) -> None:
        """Apply `kind: auto`'s choice, at a chunk boundary: a move to processes waits
        for every call in flight to end, so no item is lost or run twice."""
        probe, self.kind_probe = self.kind_probe, None
        assert probe is not None and probe.choice is not None and self.pool is not None
        kind, reason = probe.choice
        limiter, threads = self.limiter, self.pool
        assert isinstance(limiter, AdjustableLimiter) and self.call is not None
        processes = threads.switch_to
        if kind == "process" and processes is not None:
            await limiter.drain()
            self.pool = processes
            try:
                call = self._stage_call(self.call.key)
            except ConfigError as exc:
                self.pool, kind, reason = threads, "thread", f"{reason}; but {exc}"
            else:
                processes.lazy = False
                await anyio.to_thread.run_sync(processes.start)
                await anyio.to_thread.run_sync(_worker.thread_teardowns, self.call.key)
                self.call, self.kind = call, "process"
                self.light_call = _shipping.light_call(call, processes)
                fixed = None if self.stage.batch == "auto" else int(self.stage.batch)
                self.sizer = _ChunkSizer(fixed, "process")
                self.workers = processes.workers
                self.in_flight = self.workers * (1 if self.tuner is not None else 2)
                self.report.kind, self.report.workers = "process", self.workers
                self.report.pool_start_s += processes.start_s
                if self.tuner is not None:
                    self.tuner = tuner_for(
                        self.stage.auto_workers,
                        "process",
                        self.workers,
                        self.report,
                        self._set_workers,
                    )
        if self.kind == "thread":
            # the rest of the run calls the function itself, not its timed wrapper; the
            # calls made with the wrapper end first, as its key is dropped from the threads
            await limiter.drain()
            ended = self.call.key
            self.call = dataclasses.replace(self.call, key=f"{ended}:threads", fn=self.stage.fn)
            _worker.thread_teardowns(ended)
        self._chose_kind(kind, reason)
        if self.tuner is not None:
            assert self.tuner is not None
            self.workers = self.in_flight
            self._set_workers(self.tuner.controller.limit)
        else:
            limiter.set_limit(self.in_flight)

    def _item_done(self, seconds: float) -> None:
        self.latency.add(seconds)
        if self.tuner is not None:
            self.tuner.completed(1, seconds)

    def _items_done(self, items: int, seconds: float) -> None:
        """`items` items of an async stage ended without waiting, in `seconds` in all."""
        self.latency.add(seconds / items, items)
        if self.tuner is not None:
            self.tuner.completed(items, seconds)

    def _set_workers(self, workers: int) -> None:
        """Run at most `workers` calls, or coroutines, at once from now on."""
        added, self.workers = workers - self.workers, workers
        assert isinstance(self.limiter, AdjustableLimiter)
        self.limiter.set_limit(workers)
        if added < 0:
            self.lanes_free += added  # lanes in use end as they come back
        for _ in range(added):
            self._release_lane()

    async def _take_lane(self) -> None:
        if self.lanes_free > 0 and not self.lane_waiters:
            self.lanes_free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lane_waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_lane()  # handed over as this was cancelled: pass it on
            else:
                waiter.cancel()
            raise

    def _release_lane(self) -> None:
        if self.lanes_free < 0:  # workers: auto took lanes away: this one goes
            self.lanes_free += 1
            return
        waiters = self.lane_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.lanes_free += 1


async def _running(call: concurrent.futures.Future[Any]) -> None:
    """Until an executor has started `call` (or ended it): a thread pool starts a call
    when a thread takes it, a process pool when it queues it for a worker."""
    delay = 0.001
    while not (call.running() or call.done()):
        await anyio.sleep(delay)
        delay = min(2 * delay, 0.05)


def _rate_cap(stage: Stage) -> int | None:
    """The most items a call of a rate-limited stage holds (a map_batch call is one call
    of fn, whatever it holds), or None."""
    rate = stage.rate_limit
    if rate is None or stage.op == "map_batch":
        return None
    return max(1, int(RATE_HORIZON_S * rate.calls / rate.per))


class _AsyncFailure(NamedTuple):
    """What an async stage's coroutine raised, in place of its result."""

    error: BaseException


class _DirectCall(NamedTuple):
    """A chunk whose executor call the dispatcher made itself (see _direct_executor)."""

    chunk: Batch
    call: asyncio.Future[ChunkResult]


class _ChunkCallError(Exception):
    """A whole executor call failed, not one item inside it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        super().__init__(str(error))


class _Crashed(Exception):
    """The pool broke (a worker died) while a call was in it."""

    def __init__(self, cause: str) -> None:
        self.cause = cause
        super().__init__(cause)


# --- the run ------------------------------------------------------------------------------


class Runner:
    """One run of a pipeline: builds the queues and tasks, and owns the pools it starts."""

    def __init__(
        self,
        plan: RunPlan,
        source: Any,
        sink: Sink,
        progress: Callable[[RunReport], Any] | None = None,
    ) -> None:
        self.plan = plan
        self.source = source
        self.sink = sink
        self.progress = progress
        # (stage, worker, failure) of each teardown that raised
        self.teardown_failures: list[tuple[str, str, Failure]] = []
        run_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.pools = plan.pools
        self.stages = [
            StageRun(
                stage,
                pool,
                f"{run_id}:{stage.name}",
                dead_letter=self.dead_letter,
                check_error_budget=self.check_error_budget,
                teardown_failures=self.teardown_failures,
            )
            for stage, pool in plan.stages
        ]
        self.report = RunReport(name=plan.name, stages=[s.report for s in self.stages])
        # A record stays in `_dead_pending` until the writer takes it (the queue carries
        # its key), so one whose send was interrupted is neither lost nor written twice;
        # `_dead_unsent` holds those the writer took but could not write.
        self._dead_letters: MemoryObjectSendStream[int] | None = None
        self._dead_pending: dict[int, dict[str, Any]] = {}
        self._dead_keys = itertools.count()
        self._dead_unsent: list[dict[str, Any]] = []
        self._dead_failed = False
        # request_stop() sets both: the source stops between two items and delivers
        # what it holds; closing its queue then lets the stages drain what they hold
        self._stop = anyio.Event()
        self._stop_pulling = threading.Event()
        self._source_scope = anyio.CancelScope()
        self._source_bytes = _ByteGauge()

    # --- hooks the stages call ---

    async def dead_letter(self, record: dict[str, Any]) -> None:
        """Hand a dead-letter record to the dead-letter writer."""
        assert self._dead_letters is not None, "dead_letter policy without a dead-letter sink"
        key = next(self._dead_keys)
        # counted already: the end of the run writes it if the writer does not
        self._dead_pending[key] = record
        await self._dead_letters.send(key)

    def check_error_budget(self) -> None:
        """Abort the run if skipped + dead-lettered items exceed the plan's budget."""
        self.plan.budget.check(self.report)

    def request_stop(self) -> None:
        """Stop pulling the source; items already taken are finished and written."""
        self._stop.set()
        self._stop_pulling.set()

    async def _enforce_stop(self) -> None:
        # A source blocked on its next item (a socket, a slow generator) can't be asked to
        # stop: after a grace period it is cancelled, and what it was pulling is dropped.
        await self._stop.wait()
        await anyio.sleep(STOP_GRACE_S)
        self._source_scope.cancel()

    # --- the run itself ---

    async def run(self) -> RunReport:
        """Run to the end of the source. Raises PipelineError if the run fails."""
        report = self.report
        started = time.perf_counter()
        logger.info("run_start", pipeline=report.name, stages=[s.name for s in self.stages])
        ok = False
        failure: BaseException | None = None
        teardown_error: PipelineError | None = None
        try:
            await self._start_pools()
            async with anyio.create_task_group() as outer:
                if self.progress is not None:
                    outer.start_soon(self._report_progress)
                outer.start_soon(self._enforce_stop)
                outer.start_soon(self._watch_pools)
                try:
                    await self._run_tasks()
                finally:
                    outer.cancel_scope.cancel()
            ok = True
            report.status = "interrupted" if self._stop.is_set() else "ok"
        except BaseExceptionGroup as group:
            failure = unwrap_group(group)
            self._fail(report, failure)
        except anyio.get_cancelled_exc_class():
            report.status = "cancelled"
            raise
        except BaseException as error:
            self._fail(report, error)
            raise
        finally:
            report.wall_s = time.perf_counter() - started
            with anyio.CancelScope(shield=True):
                await self._end_stages(ok=ok)
                await self._shutdown_pools(kill=not ok)
                for stage in self.stages:
                    stage.close_index_table()
            teardown_error = self._report_teardown_failures(failing=not ok)
            if teardown_error is not None:
                self._fail(report, teardown_error)
            self._count_in_flight()
            for stage in self.stages:
                stage.latency.fill(stage.report)
            logger.info(
                "run_end",
                pipeline=report.name,
                status=report.status,
                wall_s=round(report.wall_s, 4),
                items_read=report.items_read,
                items_written=report.items_written,
            )
        if failure is not None:
            # raised outside the except block, so that the group is not the error's
            # context: IPython shows an error with a group in its context as plain text
            raise failure from (failure.__cause__ if isinstance(failure, PipelineError) else None)
        if teardown_error is not None:
            raise teardown_error from teardown_error.__cause__
        return report

    @staticmethod
    def _fail(report: RunReport, error: BaseException) -> None:
        report.status = (
            "cancelled" if isinstance(error, anyio.get_cancelled_exc_class()) else "failed"
        )
        report.error = str(error)

    def _count_in_flight(self) -> None:
        for run in self.stages:
            stage = run.report
            if run.stage.op not in ("map", "filter"):
                continue  # flat_map and map_batch outputs do not map one to one on inputs
            settled = stage.skipped + stage.dead_lettered + stage.failed + stage.filtered_out
            stage.in_flight = max(0, stage.items_in - stage.items_out - settled)

    async def _start_pools(self) -> None:
        for stage in self.stages:
            stage.open_index_table()
        for pool in self.pools.values():
            await anyio.to_thread.run_sync(pool.start)
        for stage in self.stages:
            if stage.pool is not None:
                stage.report.pool_start_s = stage.pool.start_s

    # --- the end of a run ---

    async def _end_stages(self, *, ok: bool) -> None:
        """Tear down what this run's stages set up in each worker, and drop their cached
        callables, whoever owns the pool: a pool that outlives the run keeps nothing."""
        for stage in self.stages:
            call, pool = stage.call, stage.pool
            if call is None or pool is None:
                continue
            if not pool.remote:
                for worker, teardown, state in _worker.thread_teardowns(call.key):
                    try:
                        await anyio.to_thread.run_sync(teardown, state)
                    except Exception as exc:
                        failure = _worker.Collector.failure_of(exc)
                        self.teardown_failures.append((stage.name, worker, failure))
            elif pool.kind == "process" and (stage.stage.setup is not None or not pool.owned):
                # a pool the run created and ends keeps no callable: only state matters
                pending = {f"pid {pid}" for pid in pool.pids()}
                with anyio.move_on_after(END_OF_RUN_S if ok else END_OF_FAILED_RUN_S):
                    await self._end_in_processes(stage, pool, call.key, pending)
                if pending and stage.stage.teardown is not None:
                    logger.warning(
                        "teardown_skipped",
                        stage=stage.name,
                        workers=sorted(pending),
                        hint="these workers stayed busy; they tear down only if they exit normally",
                    )
            elif pool.kind == "executor":
                # an executor of unknown make may have run the calls in this process,
                # which then keeps the callable and state of the stage: end them here
                end = _worker.end_stage(call.key)
                if end.failure is not None:
                    self.teardown_failures.append((stage.name, end.worker, end.failure))

    async def _end_in_processes(
        self, stage: StageRun, pool: PoolHandle, key: str, pending: set[str]
    ) -> None:
        """Send end-of-run calls until every worker in `pending` has taken one or exited.

        A process pool cannot address its workers, so the calls go in rounds of one per
        worker still pending, each holding its worker a moment so that the others take
        the rest of the round. A worker that exits meanwhile (recycled after
        max_tasks_per_child calls) runs its teardown as it exits.
        """
        loop = asyncio.get_running_loop()
        linger = END_LINGER_S if len(pending) > 1 else 0.0
        while pending:
            executor = pool.executor
            if executor is None:
                return
            try:
                calls = [
                    loop.run_in_executor(executor, _worker.end_stage, key, linger) for _ in pending
                ]
            except (BrokenProcessPool, RuntimeError):
                return  # a broken or shut-down pool has no worker left to reach
            results = await asyncio.gather(*calls, return_exceptions=True)
            for result in results:
                if isinstance(result, _worker.StageEnd):
                    pending.discard(result.worker)
                    if result.failure is not None:
                        self.teardown_failures.append((stage.name, result.worker, result.failure))
                elif isinstance(result, asyncio.CancelledError):
                    raise result
                else:
                    return  # the pool broke: its workers are gone, and their state with them
            pending &= {f"pid {pid}" for pid in pool.pids()}

    def _report_teardown_failures(self, *, failing: bool) -> PipelineError | None:
        """Log each failed teardown; return the error that fails a run that was ok."""
        for stage, worker, failure in self.teardown_failures:
            logger.warning(
                "teardown_error",
                stage=stage,
                worker=worker,
                error=failure.error_type,
                message=failure.message,
                traceback=failure.traceback,
            )
        if failing or not self.teardown_failures:
            return None
        stage, worker, failure = self.teardown_failures[0]
        return _stage_error(stage, failure, f"in teardown, worker {worker}")

    async def _shutdown_pools(self, *, kill: bool) -> None:
        for pool in self.pools.values():
            await anyio.to_thread.run_sync(functools.partial(pool.shutdown, kill=kill))

    async def _watch_pools(self) -> None:
        """Free the process pools stuck on a worker that died mid-result.

        Such a pool never notices the death (see `PoolHandle.unnoticed_death`), so its
        calls would wait for good. A pool the run created is made to break, and then
        replaced as after any crash; a lent pool, which pipeflow does not end, fails the run.
        """
        pools = [pool for pool in self.pools.values() if pool.kind == "process"]
        while pools:
            await anyio.sleep(POOL_WATCH_INTERVAL_S)
            for pool in pools:
                death = pool.unnoticed_death(time.monotonic())
                if death is None:
                    continue
                logger.warning("pool_stuck", pool=pool.name, cause=death)
                if pool.owned:
                    await pool.unstick()
                    continue
                raise _error_of(
                    pool.name,
                    None,
                    None,
                    WorkerCrashed(
                        f"a worker process of the pool lent to stage {pool.name!r} died "
                        f"({death}) while it sent a result; the pool waits for the rest of "
                        "it for good and cannot be replaced (pipeflow replaces only the "
                        "pools it creates), so the run stops"
                    ),
                )

    async def _report_progress(self) -> None:
        assert self.progress is not None
        while True:
            self.progress(self.report)
            await anyio.sleep(PROGRESS_INTERVAL_S)

    async def _run_tasks(self) -> None:
        stages = self.stages
        plan = self.plan
        sends: list[MemoryObjectSendStream[Batch]] = []
        recvs: list[MemoryObjectReceiveStream[Batch]] = []
        for stage in stages:
            send, recv = anyio.create_memory_object_stream[Batch](stage.stage.queue_size)
            sends.append(send)
            recvs.append(recv)
        sink_send, sink_recv = anyio.create_memory_object_stream[Batch](plan.sink_queue_size)
        sends.append(sink_send)
        recvs.append(sink_recv)
        ends: list[MemoryObjectSendStream[Any] | MemoryObjectReceiveStream[Any]] = [*sends, *recvs]
        dead_sink = plan.dead_letter
        dl_recv: MemoryObjectReceiveStream[int] | None = None
        failing = False
        try:
            if dead_sink is not None:
                dl_send, dl_recv = anyio.create_memory_object_stream[int](64)
                self._dead_letters = dl_send
                ends += [dl_send, dl_recv]
                await self._open_dead_letters(dead_sink)
            async with anyio.create_task_group() as tg:
                if dead_sink is not None and dl_recv is not None:
                    tg.start_soon(self._write_dead_letters, dead_sink, dl_recv)
                tg.start_soon(self._pump_source, sends[0])
                for position, stage in enumerate(stages):
                    tg.start_soon(stage.run, recvs[position], sends[position + 1])
                await self._drain_to_sink(recvs[-1])
                if self._dead_letters is not None:
                    await self._dead_letters.aclose()
        except BaseException:
            failing = True
            raise
        finally:
            if dead_sink is not None and dl_recv is not None:
                with anyio.CancelScope(shield=True):
                    await self._finish_dead_letters(dead_sink, failing=failing)
            # each task closes its own ends, but a task cancelled before it started can't
            for end in ends:
                end.close()

    # --- source ---

    async def _pump_source(self, send: MemoryObjectSendStream[Batch]) -> None:
        source = self.source
        try:
            async with send:
                with self._source_scope:
                    if isinstance(source, AsyncIterable):
                        await self._pump_async(source, send)
                    else:
                        await self._pump_sync(source, send)
        except (PipelineError, anyio.get_cancelled_exc_class()):
            raise
        except anyio.BrokenResourceError:
            return  # the first stage has gone: the run is ending
        except BaseException as exc:
            error = _leaf(exc)
            raise _error_of("source", None, None, error) from error

    def _max_source_batch(self) -> int:
        # Source batches are as big as the first stage can use at once: big for cheap
        # items, small for costly ones, so that the items read ahead of the work (and
        # left to finish when a run is stopped) stay few. A fixed batch bounds them too:
        # `batch: 1, queue_size: N` bounds the items taken ahead of the stage to about N.
        if not self.stages:
            return SOURCE_MAX_BATCH
        first = self.stages[0]
        if first.sizer.fixed is not None:
            return first.sizer.fixed
        by_bytes = self._source_bytes.items_within(MAX_SOURCE_BATCH_BYTES)
        return max(1, min(SOURCE_MAX_BATCH, first.sizer.size * first.workers, by_bytes))

    async def _deliver(self, send: MemoryObjectSendStream[Batch], values: list[Any]) -> None:
        report = self.report
        index = report.items_read
        self._source_bytes.observe(values)
        if self.stages:
            self.stages[0].hungry = False  # it has this batch to run, whether it woke yet
        report.source_blocked_s += await _send(
            send, Batch(range(index, index + len(values)), values)
        )
        report.items_read += len(values)

    async def _pump_sync(self, source: Iterable[Any], send: MemoryObjectSendStream[Batch]) -> None:
        iterator = iter(source)
        stop = self._stop_pulling
        try:
            if isinstance(source, range | list | tuple):
                size = 1
                while not stop.is_set():
                    values = list(itertools.islice(iterator, size))
                    if not values:
                        return
                    await self._deliver(send, values)
                    size = min(size * 2, self._max_source_batch())
            else:
                # a generator may block (files, sockets): pull it in a thread of its own
                await self._pump_puller(_Puller(iterator, stop), send)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                with contextlib.suppress(ValueError):  # still running in an abandoned thread
                    close()

    async def _pump_puller(self, puller: _Puller, send: MemoryObjectSendStream[Batch]) -> None:
        size = 1
        # a batch waits for company (FLUSH_INTERVAL_S) only while the first stage is busy
        first = self.stages[0] if self.stages else None
        if first is not None:
            first.on_hungry = puller.stage_idle

        def idle() -> bool:
            return first is not None and first.hungry

        try:
            async with anyio.create_task_group() as tg:
                # abandoned if cancelled while the iterator blocks: it ends when it returns
                tg.start_soon(
                    functools.partial(anyio.to_thread.run_sync, abandon_on_cancel=True),
                    puller.pull,
                )
                while not puller.ended:
                    if self._stop_pulling.is_set():
                        # the item being pulled is delivered too (or dropped when the
                        # stop's grace period cancels the source)
                        values = await puller.finish()
                    else:
                        values = await puller.take(size, FLUSH_INTERVAL_S, idle)
                    if values:
                        await self._deliver(send, values)
                    size = min(size * 2, self._max_source_batch())
        finally:
            puller.close()
        if puller.error is not None:
            raise puller.error

    async def _pump_async(
        self,
        source: AsyncIterable[Any],
        send: MemoryObjectSendStream[Batch],
    ) -> None:
        # unbuffered: an item the puller holds is either delivered or never taken from
        # the source (a stopping run drains the puller's pending send below)
        items_send, items_recv = anyio.create_memory_object_stream[Any](0)
        pulling = anyio.CancelScope()

        async def pull() -> None:
            iterator = aiter(source)
            try:
                with pulling:
                    async with items_send:
                        async for value in iterator:
                            await items_send.send(value)
            finally:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()

        # a batch waits for company (FLUSH_INTERVAL_S) only if the first stage is busy
        first = self.stages[0] if self.stages else None
        async with anyio.create_task_group() as tg, items_recv:
            tg.start_soon(pull)
            size = 1
            ended = False
            while not ended:
                # while this waits, the puller waits inside the source: cancelling it at
                # the end of a stop's grace period takes no item from the source
                try:
                    values = [await items_recv.receive()]
                except anyio.EndOfStream:
                    return
                deadline = anyio.current_time() + FLUSH_INTERVAL_S
                while len(values) < size and not self._stop.is_set():
                    try:
                        values.append(items_recv.receive_nowait())
                        continue
                    except anyio.EndOfStream:
                        ended = True
                        break
                    except anyio.WouldBlock:
                        pass
                    remaining = deadline - anyio.current_time()
                    if remaining <= 0 or (first is not None and first.hungry):
                        break
                    # (not woken when the stage turns idle: cancelling a receive could
                    # lose the item being handed over)
                    with anyio.move_on_after(remaining):
                        try:
                            values.append(await items_recv.receive())
                        except anyio.EndOfStream:
                            ended = True
                            break
                if self._stop.is_set():
                    with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
                        values.append(items_recv.receive_nowait())
                    # before the delivery below lets the puller run: it would take
                    # one more item from the source, which no one would deliver
                    pulling.cancel()
                    ended = True
                await self._deliver(send, values)
                size = min(size * 2, self._max_source_batch())
            tg.cancel_scope.cancel()  # stopping: the puller waits inside the source

    # --- sink ---

    async def _drain_to_sink(self, recv: MemoryObjectReceiveStream[Batch]) -> None:
        sink = self.sink
        report = self.report
        opened = False
        try:
            await sink.open()
            opened = True
            async with recv:
                async for batch in recv:
                    sink.delivered = 0
                    try:
                        await sink.write(batch.values)
                    except BaseException:
                        # what reached the sink before the write failed or was cancelled
                        report.items_written += sink.delivered
                        raise
                    report.items_written += len(batch.values)
        except (PipelineError, anyio.get_cancelled_exc_class()):
            raise
        except Exception as exc:
            # a consumer of stream() that leaves closes the sink's queue as it cancels us
            await anyio.lowlevel.checkpoint_if_cancelled()
            raise _sink_error("sink", sink, exc) from exc
        finally:
            if opened:
                with anyio.CancelScope(shield=True):
                    await sink.close()

    # --- dead letters ---

    async def _open_dead_letters(self, sink: Sink) -> None:
        try:
            await sink.open()
        except Exception as exc:
            self._dead_failed = True
            raise _sink_error("dead_letter", sink, exc) from exc

    async def _write_dead_letters(self, sink: Sink, recv: MemoryObjectReceiveStream[int]) -> None:
        pending = self._dead_pending
        async with recv:
            async for key in recv:
                keys = [key]
                while len(keys) < 256:  # what else waits goes in the same write
                    try:
                        keys.append(recv.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                records = [pending.pop(k) for k in keys if k in pending]
                await self._write_dead_batch(sink, records)

    async def _write_dead_batch(self, sink: Sink, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        sink.delivered = 0
        try:
            await sink.write(records)
        except anyio.get_cancelled_exc_class():
            self._dead_unsent[:0] = records[sink.delivered :]
            raise
        except Exception as exc:
            self._dead_failed = True
            self._dead_unsent[:0] = records[sink.delivered :]
            raise _sink_error("dead_letter", sink, exc) from exc

    async def _finish_dead_letters(self, sink: Sink, *, failing: bool) -> None:
        """Write the records still queued or interrupted, then close the dead-letter sink.

        A run that fails or is cancelled still writes every record it counted. A failure
        here fails the run, unless it is failing already (then it is logged).
        """
        records = [*self._dead_unsent, *self._dead_pending.values()]
        self._dead_unsent, self._dead_pending = [], {}
        error: PipelineError | None = None
        lost = len(records)
        if not self._dead_failed:
            try:
                await self._write_dead_batch(sink, records)
                lost = 0
            except PipelineError as exc:
                error, lost = exc, len(self._dead_unsent)
        try:
            await sink.close()
        except Exception as exc:
            if not self._dead_failed:
                error = error or _sink_error("dead_letter", sink, exc)
        if lost:
            logger.error(
                "dead_letters_lost",
                records=lost,
                error=str(error) if error is not None else None,
                hint="the dead-letter sink failed: these records are counted but not written",
            )
        if error is not None and not failing:
            raise error from error.__cause__
