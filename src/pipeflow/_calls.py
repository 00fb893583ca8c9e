"""The executor-call protocol of a stage: one call per chunk, run again on a new pool
after a pool replacement, timed against its deadline, split to pin a failure of the
whole call on its own item, and bisected to convict the item that kills its worker.
An async stage's chunk runs on lanes of the event loop instead.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple

import anyio
import anyio.lowlevel

from . import _rate, _worker
from ._auto import LatencyHistogram, StageTuner
from ._batches import _ChunkSizer
from ._errors import ItemTimeout, PipelineError, WorkerCrashed
from ._failures import _error_of, _stage_error
from ._kind import KindProbe
from ._log import logger
from ._pools import PoolHandle
from ._report import StageReport
from ._stage import Stage
from ._steps import LOOP_BLOCK_S, TimedSteps
from ._worker import ChunkResult, Collector, Failure, StageCall

SAMPLE_CALLS = 16
# A process worker interrupts an item past its timeout itself; the parent's deadline for
# a call, `timeout` per item plus this, is the backstop for an item that can't be interrupted.
BACKSTOP_GRACE_S = 1.0
# A Dask call (or any executor's but pipeflow's own pools and threads) is timed from
# when it is sent, as the client cannot see it start: its scheduling and transfer get
# this long on top of `timeout`, so that a busy cluster does not time innocent items out.
REMOTE_GRACE_S = 1.0

# A call of a rate-limited stage holds the items of at most RATE_HORIZON_S at its rate
# (see _stagerun), and is sent this long before its first start time: items whose start
# is far off wait in the stage, not in a worker (their `timeout` counts from their start).
RATE_LEAD_NS = 20_000_000


class _ExecutorCalls:
    """StageRun's executor calls: one call per chunk on the stage's pool (or its lanes on
    the event loop), the pool's generations, gate and deadlines, and the bisection of a
    chunk whose worker crashed."""

    # set by StageRun
    stage: Stage
    name: str
    pool: PoolHandle | None
    kind: str
    call: StageCall | None
    light_call: StageCall | None
    worker_timed: bool
    pacer: _rate.Pacer | None
    sizer: _ChunkSizer
    report: StageReport
    latency: LatencyHistogram
    tuner: StageTuner | None
    kind_probe: KindProbe | None
    samples: list[tuple[list[Any], list[Any]]] | None
    async_state: Any
    lanes_free: int
    lane_waiters: collections.deque[asyncio.Future[None]]
    lane_takers: collections.deque[Callable[[], bool]]

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
            # a thread's start time is on this process's clock; a process's, a Dask
            # worker's may not be
            started = result.started if self.kind == "thread" else None
            if self.kind_probe is not None:
                self.kind_probe.completed(items, result.busy_s, started)
            elif self.tuner is not None:
                self.tuner.completed(items, result.busy_s, started=started)

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
        worker = results[-1].worker if results else ""
        started = min((r.started for r in results), default=0.0)
        return ChunkResult(outputs, kept, failures, busy, worker, started)

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
                    sent = time.perf_counter()
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
                        result: ChunkResult = future.result()
                        self.sizer.observe_round_trip(time.perf_counter() - sent, result.busy_s)
                        return result
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
        # wait run a whole chunk in one task. From then on the chunk is a lane taker: a
        # lane that any chunk gives back goes at once to the oldest chunk with items no
        # lane has taken (see _release_lane), so no lane idles while an item waits.
        count = len(values)
        outcomes: list[Any] = [None] * count
        state = self.async_state
        next_position = 0
        # lanes started for this chunk that have not yet taken an item
        starting = 0
        # set once a lane of this chunk ends with an error or a cancellation: the chunk
        # takes no more lanes
        closing = False
        failed = False
        perf_counter = time.perf_counter
        # coroutines that end without waiting are counted together, once per chunk
        instant_items = 0
        instant_s = 0.0
        # with no start times and no timeout to keep, a chunk's coroutines that end at
        # their first step are run in a tight loop (see lane)
        instant_runs = starts is None and timeout is None

        async def lane(started: bool = False) -> None:
            nonlocal next_position, starting, closing, failed, instant_items, instant_s
            try:
                if started:
                    starting -= 1
                    # handed over from a chunk that was ending: a cancelled run starts
                    # no new coroutine
                    await anyio.lowlevel.checkpoint_if_cancelled()
                while next_position < count:
                    if instant_runs:
                        # coroutines that end at their first step run one after the other
                        # here: nothing else runs on the loop meanwhile, so the run keeps
                        # its place to itself and reads the clock once per item
                        position = next_position
                        mark = begun = perf_counter()
                        coro = None
                        while position < count:
                            value = values[position]
                            coro = fn(value, state) if has_state else fn(value)
                            try:
                                yielded = coro.send(None)
                            except StopIteration as done:
                                outcomes[position] = done.value
                                position += 1
                                now = perf_counter()
                                if now - mark > LOOP_BLOCK_S:
                                    self._loop_blocked(now - mark)
                                mark = now
                                coro = None
                                continue
                            except Exception as exc:
                                yielded = _AsyncFailure(exc)
                            break
                        if position > next_position:
                            instant_items += position - next_position
                            instant_s += mark - begun
                        next_position = position
                        if coro is None:
                            continue  # the chunk's end
                        # the coroutine at `position` failed or waits: it goes on below
                        next_position += 1
                        item_started = mark
                        took = perf_counter() - item_started
                        if took > LOOP_BLOCK_S:
                            self._loop_blocked(took)
                        if type(yielded) is _AsyncFailure:
                            outcomes[position] = yielded
                            failed = True
                            self._item_done(took)
                            continue
                        if growing and self.lanes_free > 0:
                            grow()
                        try:
                            outcomes[position] = await TimedSteps(coro, self._loop_blocked, yielded)
                        except Exception as exc:
                            outcomes[position] = _AsyncFailure(exc)
                            failed = True
                        self._item_done(perf_counter() - item_started)
                        continue
                    position = next_position
                    next_position += 1
                    if growing and self.lanes_free > 0:
                        grow()
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
            except BaseException:
                closing = True
                raise
            finally:
                self._release_lane()

        def take() -> bool:
            """Start a lane with a lane given back: whether this chunk took it."""
            nonlocal starting
            if closing or count - next_position - starting <= 0:
                return False
            starting += 1
            tg.start_soon(lane, True)
            return True

        growing = False

        def grow() -> None:
            nonlocal growing
            if not growing:
                growing = True
                self.lane_takers.append(take)
            while self.lanes_free > 0 and not self.lane_waiters and take():
                self.lanes_free -= 1

        await self._take_lane()
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:
            handle = loop.call_soon(grow)
            try:
                await lane()
            finally:
                handle.cancel()
                closing = True
                if growing:
                    with contextlib.suppress(ValueError):  # dropped by _release_lane
                        self.lane_takers.remove(take)
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

    def _item_done(self, seconds: float) -> None:
        self.latency.add(seconds)
        if self.tuner is not None:
            self.tuner.completed(1, seconds)

    def _items_done(self, items: int, seconds: float) -> None:
        """`items` items of an async stage ended without waiting, in `seconds` in all."""
        self.latency.add(seconds / items, items)
        if self.tuner is not None:
            self.tuner.completed(items, seconds)

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
        # the oldest chunk with items no lane has taken first: its items came first
        takers = self.lane_takers
        while takers:
            if takers[0]():
                return
            takers.popleft()
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


class _AsyncFailure(NamedTuple):
    """What an async stage's coroutine raised, in place of its result."""

    error: BaseException


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
