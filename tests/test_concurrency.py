"""Backpressure, a responsive host loop, and clean cancellation with no process left behind."""

from __future__ import annotations

import threading
import time

import anyio
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
    # Items taken but not finished: the queue's batches, the calls in flight, the
    # batch the source holds while it waits, and the one being pulled.
    bound = queue_size + workers + 2
    assert 0 < worst <= bound, f"the source ran {worst} items ahead (bound {bound})"
    assert pulled < 2000 + bound + 1


async def test_the_host_loop_stays_responsive_during_a_cpu_heavy_stage() -> None:
    gaps: list[float] = []
    finished = anyio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not finished.is_set():
            await anyio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    pipeline = Pipeline([Stage(fns.burn, kind="process", workers=2)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        report = await pipeline.run(range(100))  # ~2 s of CPU work over 2 processes
        finished.set()
    assert report.items_written == 100
    assert len(gaps) > 50
    assert max(gaps) < 0.05, f"the loop stalled for {max(gaps) * 1000:.0f} ms"


async def test_leaving_a_stream_early_cancels_and_leaves_no_process() -> None:
    pipeline = Pipeline([Stage(fns.burn, kind="process", workers=2)])
    async with pipeline.stream(range(10_000)) as results:
        async for value in results:
            if value >= 3:
                break
    started = time.perf_counter()
    assert not worker_processes()
    assert time.perf_counter() - started < 1


async def test_cancelling_a_run_stops_within_a_second_and_leaves_no_process() -> None:
    started = anyio.Event()

    def progress(report: pipeflow.RunReport) -> None:
        if report.stages[0].items_out > 0:
            started.set()

    pipeline = Pipeline([Stage(fns.burn, kind="process", workers=2, batch=1)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: pipeline.run(range(10_000), progress=progress))
        await started.wait()
        cancelled_at = time.perf_counter()
        tg.cancel_scope.cancel()
    assert time.perf_counter() - cancelled_at < 1
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
