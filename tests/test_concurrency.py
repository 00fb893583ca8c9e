"""Backpressure, a responsive host loop, and clean cancellation with no process left behind."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import anyio
import psutil
import pytest

import fns
import pipeflow
from conftest import worker_processes
from pipeflow import Pipeline, Stage

pytestmark = pytest.mark.anyio


async def test_a_fast_source_never_runs_ahead_of_a_slow_stage() -> None:
    pulled = 0
    done = 0
    worst = 0
    lock = threading.Lock()

    def source():  # type: ignore[no-untyped-def]
        nonlocal pulled
        for n in range(1_000_000):
            with lock:
                pulled += 1
            yield n

    def slow(n: int) -> int:
        nonlocal done, worst
        time.sleep(0.0005)
        with lock:
            done += 1
            worst = max(worst, pulled - done)
        return n

    queue_size, workers = 4, 2
    pipeline = Pipeline(
        [Stage(slow, kind="thread", workers=workers, batch=1, queue_size=queue_size)]
    )
    seen = 0
    async with pipeline.stream(source()) as results:
        async for _ in results:
            seen += 1
            if seen == 2000:
                break
    # Items taken but not finished: the queue's batches, the calls in flight (one running
    # and one queued behind it per worker), the batch the source holds while it waits,
    # and the one being pulled.
    bound = queue_size + 2 * workers + 2
    assert 0 < worst <= bound, f"the source ran {worst} items ahead (bound {bound})"
    # Items pulled but not taken by the consumer: those, and the results finished but
    # not yet taken, in the sink's queue and in the stream's own (2 batches).
    assert pulled < 2000 + bound + pipeline.sink_queue_size + 2 + 1


async def test_the_host_loop_stays_responsive_during_a_cpu_heavy_stage(tmp_path: Path) -> None:
    # Each item burns CPU in its worker until the host's heartbeat has ticked twice, so a
    # loop that blocks while the stage works (running the stage itself, or waiting on its
    # workers) fails the item. The loop thread's own CPU time between two ticks is what
    # pipeflow's work on the loop costs: a busy machine delays the ticks, not that.
    ticks = tmp_path / "ticks"
    loop_cpu: list[float] = []
    finished = anyio.Event()

    async def heartbeat() -> None:
        count = 0
        last = time.thread_time()
        while not finished.is_set():
            await anyio.sleep(0.01)
            now = time.thread_time()
            loop_cpu.append(now - last)
            last = now
            count += 1
            (tmp_path / "ticks.new").write_text(str(count))
            os.replace(tmp_path / "ticks.new", ticks)

    stage = Stage(fns.BurnWhileTheHostTicks(str(ticks)), kind="process", workers=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        report = await Pipeline([stage]).run(range(40))
        finished.set()
    assert report.items_written == 40
    assert len(loop_cpu) >= 40  # two ticks per item, two workers
    assert max(loop_cpu) < 0.05, f"the loop worked {max(loop_cpu) * 1000:.0f} ms between ticks"


@pytest.mark.timeout(60)  # a pool that waits for the hung call never lets the block exit
async def test_leaving_a_stream_early_cancels_and_leaves_no_process() -> None:
    source_closed = threading.Event()

    async def source():  # type: ignore[no-untyped-def]
        try:
            for n in range(10_000):
                yield n
        finally:
            source_closed.set()

    # item 5 hangs in its worker: only killing the pool lets the block exit
    pipeline = Pipeline([Stage(fns.hang_on_5, kind="process", workers=2, batch=1)])
    async with pipeline.stream(source()) as results:
        async for value in results:
            if value >= 3:
                workers = worker_processes()
                break
    # everything is over the moment the block exits, not in the background later
    assert source_closed.is_set()
    assert len(workers) == 2
    for worker in workers:
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, worker
    assert not worker_processes()


@pytest.mark.timeout(60)  # a pool that waits for the hung call never lets the run end
async def test_cancelling_a_run_stops_at_once_and_leaves_no_process() -> None:
    started = anyio.Event()

    def progress(report: pipeflow.RunReport) -> None:
        if report.stages[0].items_out > 0:
            started.set()

    # item 5 hangs in its worker: only killing the pool ends the cancelled run
    pipeline = Pipeline([Stage(fns.hang_on_5, kind="process", workers=2, batch=1)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: pipeline.run(range(10_000), progress=progress))
        await started.wait()
        workers = worker_processes()
        tg.cancel_scope.cancel()
    assert len(workers) == 2
    for worker in workers:
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, worker
    assert not worker_processes()


async def test_a_failed_run_leaves_no_process() -> None:
    pipeline = Pipeline([Stage(fns.fail_on_3, kind="process", workers=4)])
    with pytest.raises(pipeflow.PipelineError):
        await pipeline.run(range(100))
    assert not worker_processes()


async def test_a_normal_run_leaves_no_process() -> None:
    await Pipeline([Stage(fns.square, kind="process", workers=4)]).run(range(100))
    assert not worker_processes()


async def test_a_failing_stage_cancels_a_long_running_sibling_promptly() -> None:
    async def fails_fast(n: int) -> int:
        if n == 5:
            raise RuntimeError("boom")
        return n

    pipeline = Pipeline(
        [Stage(fns.burn, kind="process", workers=2, batch=1), Stage(fails_fast, kind="async")]
    )
    with anyio.fail_after(10), pytest.raises(pipeflow.PipelineError, match="boom"):
        await pipeline.run(range(100_000))
    assert not worker_processes()


async def test_an_error_in_the_consumer_of_a_stream_propagates_and_cleans_up() -> None:
    pipeline = Pipeline([Stage(fns.square, kind="process", workers=2)])
    with pytest.raises(LookupError, match="consumer"):
        async with pipeline.stream(range(100_000)) as results:
            async for _ in results:
                raise LookupError("consumer gave up")
    assert not worker_processes()


@pytest.mark.parametrize("attempt", range(8))
async def test_leaving_a_process_stream_early_raises_nothing(attempt: int) -> None:
    pipeline = Pipeline([Stage(fns.square, kind="process", workers=2)])
    async with pipeline.stream(range(1, 1_000_000)) as results:
        async for value in results:
            if value > 100:
                break
    assert not worker_processes()


async def test_every_stage_reports_how_full_its_queue_got() -> None:
    def slow(n: int) -> int:
        time.sleep(0.002)
        return n

    pipeline = Pipeline(
        [
            Stage(fns.square, kind="thread", batch=1, queue_size=2),
            Stage(slow, kind="thread", batch=1, queue_size=3),
        ]
    )
    report = await pipeline.run(range(200))
    first, second = report.stages
    assert first.queue_high_water == 2 and second.queue_high_water == 3
    assert first.blocked_s > 0 and report.source_blocked_s > 0
