"""One stage during one run: its setup and teardown, its input cut into chunks (or
groups), the dispatch of those chunks in order or as they complete, and `kind: auto`'s
move from threads to processes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import anyio
import anyio.to_thread
import cloudpickle
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import _group, _identity, _kind, _rate, _shipping, _worker
from ._auto import START, AdjustableLimiter, LatencyHistogram, tuner_for
from ._batches import FLUSH_INTERVAL_S, WORTH_A_CALL_BYTES, Batch, _ChunkSizer, _send
from ._compat import pool_threads
from ._errors import ConfigError
from ._failures import _error_of, _stage_error
from ._kind import CpuTimed, KindProbe
from ._log import logger
from ._pools import PoolHandle
from ._report import StageReport
from ._settle import _Settlement
from ._stage import Stage
from ._worker import ChunkResult, Failure, StageCall

# Auto-sized calls of a stage with a timeout hold at most this many seconds of `timeout`,
# so that an item stuck where its worker cannot interrupt it is found within this long.
STUCK_ITEM_WINDOW_S = 10.0
# A call of a rate-limited stage holds the items of at most this long at its rate (and is
# sent RATE_LEAD_NS before its first start time, see _calls): items whose start is far
# off wait in the stage, not in a worker (their `timeout` counts from their start time).
RATE_HORIZON_S = 0.1


class StageRun(_Settlement):
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
        # a pool is kept busy by one call queued behind each running one: a worker that
        # ends a call takes the next at once, not after a round trip through the loop
        pooled = self.kind != "async"
        self.in_flight = self.workers * 2 if pooled and rate is None else self.workers
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
        # chunks being run whose items not all have a lane yet, oldest first
        self.lane_takers: collections.deque[Callable[[], bool]] = collections.deque()
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
        # the start of the process pool `kind: auto` moves the stage to (see _kind_ready)
        self._switch_start: asyncio.Future[None] | None = None
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
        if self.kind_probe is not None:  # the input ended before the choice was applied
            probe, self.kind_probe = self.kind_probe, None
            if probe.choice is None:
                self._chose_kind("thread", "its input ended before it was measured: on threads")
            else:
                kind, reason = probe.choice
                if kind != "thread":
                    reason = f"{reason}; but its input ended before the move: on threads"
                if self._switch_start is not None:  # shut down with the run's pools
                    try:
                        await self._switch_start
                    except Exception as exc:  # unused: the run's items are done
                        reason = f"{reason} (its process pool did not start: {exc})"
                self._chose_kind("thread", reason)
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
                if stage_call is not self.call:  # kind: auto has moved the stage
                    stage_call, direct = self.call, self._direct_executor()
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
            if self.kind_probe is not None and self._kind_ready():
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
                size = self._chunk_size()
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
            elif self.sizer.fixed is None:
                # each cut of an auto-sized stage is sized anew: the size may have been
                # learnt since the batch came, and as the items at hand run low with
                # nothing else waiting, the cuts shrink (while a part is worth a call of
                # its own, see _share) so that every worker stays busy to the end; a
                # fixed `batch` keeps the cut it was given
                size = self._share(self._chunk_size(), len(values) - start, recv)
            end = start + size
            chunk = Batch(indices[start:end], values[start:end])
            start = end
            self.calls_running += 1
            yield chunk

    def _chunk_size(self) -> int:
        """The items of the next chunk, as the sizer has it; an async stage's chunk holds
        at least one item per lane (fewer cannot keep the lanes busy on their own, and its
        first chunks would be measured one lane at a time)."""
        size = self.sizer.size
        if self.kind == "async" and self.sizer.fixed is None:
            size = max(size, min(self.workers, self.sizer.limit))
        return size

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
        between the workers, in parts whose items are worth a call of their own (a part
        that costs less than a round trip is done sooner with the others, on a Dask
        cluster above all)."""
        if self.kind == "async" or self.workers < 2:  # its lanes share a chunk out
            return size
        shared = math.ceil(count / self.workers)
        # (the cheap tests first: this runs at every cut)
        if (
            shared < size
            and self.sizer.worth_a_call(shared)
            and recv.statistics().current_buffer_used == 0
        ):
            return shared
        return size

    # --- one chunk ---

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
            limiter = self.limiter
            self.kind_probe = KindProbe(
                timed,
                self.report,
                limiter.set_limit,
                lambda: pool_threads(pool.executor),
                first=min(START, pool.workers),
                held=lambda: limiter.held,
            )

    def _kind_ready(self) -> bool:
        """Whether `kind: auto` has chosen and its choice can be applied now. A move to
        processes first starts their pool in a thread, while the stage's threads go on."""
        probe, pool = self.kind_probe, self.pool
        assert probe is not None and pool is not None
        if probe.choice is None:
            return False
        processes = pool.switch_to
        if probe.choice[0] != "process" or processes is None:
            return True
        if self._switch_start is None:
            processes.lazy = False
            if self.tuner is not None:
                processes.prespawn = None  # the tuner starts at every free core (see below)
            self._switch_start = asyncio.get_running_loop().run_in_executor(None, processes.start)
            # 1 call at a time meanwhile: the probe found that 2 threads do no more than
            # 1, and each thread that holds the GIL slows the start (which needs the GIL
            # in turns of the switch interval): 2 processes for a 1.5 ms function took
            # 0.09-0.13 s to start beside 2 threads, 0.04-0.06 s beside 1, 0.03 s alone
            assert isinstance(self.limiter, AdjustableLimiter)
            self.limiter.set_limit(1)
        return self._switch_start.done()

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
                assert self._switch_start is not None
                await self._switch_start  # done: raises if the pool could not start
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
                    # the probe measured work that holds a CPU for each item: start with
                    # every process, and let the tuner take off what brings nothing
                    self.tuner = tuner_for(
                        self.stage.auto_workers,
                        "process",
                        self.workers,
                        self.report,
                        self._set_workers,
                        start=self.workers,
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
            window = probe.first_window
            if window is not None and probe.first_limit == self.tuner.controller.limit:
                # measured at the tuner's start: its first window
                self.tuner.seed(window, probe.room)
        else:
            limiter.set_limit(self.in_flight)

    def _set_workers(self, workers: int) -> None:
        """Run at most `workers` calls, or coroutines, at once from now on."""
        added, self.workers = workers - self.workers, workers
        assert isinstance(self.limiter, AdjustableLimiter)
        self.limiter.set_limit(workers)
        if added < 0:
            self.lanes_free += added  # lanes in use end as they come back
        for _ in range(added):
            self._release_lane()


def _rate_cap(stage: Stage) -> int | None:
    """The most items a call of a rate-limited stage holds (a map_batch call is one call
    of fn, whatever it holds), or None."""
    rate = stage.rate_limit
    if rate is None or stage.op == "map_batch":
        return None
    return max(1, int(RATE_HORIZON_S * rate.calls / rate.per))


class _DirectCall(NamedTuple):
    """A chunk whose executor call the dispatcher made itself (see _direct_executor)."""

    chunk: Batch
    call: asyncio.Future[ChunkResult]
