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

This module wires one run together (`Runner`); the source side is `_pump`, a stage's
run `_stagerun` (with `_settle` and `_calls`), batches `_batches`, errors `_failures`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import _worker
from ._batches import Batch, _ByteGauge
from ._errors import PipelineError, WorkerCrashed
from ._failures import _error_of, _sink_error, _stage_error, unwrap_group
from ._log import logger
from ._plan import RunPlan
from ._pools import PoolHandle
from ._pump import _SourcePump
from ._report import RunReport
from ._sinks import Sink
from ._stagerun import StageRun
from ._worker import Failure

__all__ = ["Runner"]

PROGRESS_INTERVAL_S = 0.2
# How often the run looks for a process pool stuck on a dead worker (see _watch_pools).
POOL_WATCH_INTERVAL_S = 0.5
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


class Runner(_SourcePump):
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
