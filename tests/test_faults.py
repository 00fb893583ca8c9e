"""Faults: worker processes that die, items that hang, values that cannot be pickled."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import threading
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import fns
import pipeflow
from conftest import worker_processes
from pipeflow import Pipeline, Stage, _compat, _pools

pytestmark = pytest.mark.anyio

CRASHERS = {
    "exit": (fns.exit_on_13, "exit code 1"),
    "segfault": (fns.segfault_on_13, "signal SIGSEGV"),
    "sigkill": (fns.sigkill_self_on_13, "signal SIGKILL"),
}


@pytest.mark.parametrize("how", sorted(CRASHERS))
async def test_a_worker_crash_with_skip_loses_only_the_killer(how: str) -> None:
    fn, _ = CRASHERS[how]
    pipeline = Pipeline([Stage(fn, name="crashy", kind="process", workers=2, on_error="skip")])
    sink = pipeflow.ListSink()
    pipeline.sink = sink
    with anyio.fail_after(60):
        report = await pipeline.run(range(100))
    assert sink.items == [n for n in range(100) if n != 13]
    stage = report.stages[0]
    assert (stage.items_out, stage.skipped, stage.crashed) == (99, 1, 1)
    assert stage.items_in == stage.items_out + stage.skipped
    assert not worker_processes()


@pytest.mark.parametrize("how", sorted(CRASHERS))
async def test_a_worker_crash_with_fail_names_the_item_and_cause(how: str) -> None:
    fn, cause = CRASHERS[how]
    pipeline = Pipeline([Stage(fn, name="crashy", kind="process", workers=2)])
    with anyio.fail_after(60), pytest.raises(pipeflow.PipelineError) as caught:
        await pipeline.run(range(100))
    error = caught.value
    assert error.index == 13 and error.error_type == "WorkerCrashed"
    assert cause in str(error)
    assert isinstance(error.__cause__, pipeflow.WorkerCrashed)
    assert not worker_processes()


async def test_a_worker_crash_with_dead_letter_writes_one_record(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    pipeline = Pipeline(
        [Stage(fns.segfault_on_13, kind="process", workers=2, on_error="dead_letter")],
        dead_letter=pipeflow.JsonlSink(path),
    )
    with anyio.fail_after(60):
        results = await pipeline.collect(range(100))
    assert len(results) == 99
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["index"], r["error"]) for r in records] == [(13, "WorkerCrashed")]
    assert "SIGSEGV" in records[0]["message"]


@pytest.mark.timeout(150)  # 32 pool rebuilds: slow on a loaded machine, bounded by fail_after
async def test_a_crash_loop_fails_the_run_instead_of_spinning() -> None:
    pipeline = Pipeline([Stage(fns.exit_on_13, kind="process", workers=2, on_error="skip")])
    with anyio.fail_after(120), pytest.raises(pipeflow.PipeflowError, match="giving up"):
        await pipeline.run([13] * 100)
    assert not worker_processes()


async def test_a_hung_process_item_times_out_and_the_others_complete() -> None:
    pipeline = Pipeline(
        [Stage(fns.hang_on_5, kind="process", workers=2, timeout=1, on_error="skip")]
    )
    with anyio.fail_after(30):  # item 5 sleeps for an hour: ending at all is the point
        report = await pipeline.run(range(20))
    stage = report.stages[0]
    assert (stage.items_out, stage.skipped, stage.timed_out) == (19, 1, 1)
    assert not worker_processes()


async def test_a_timed_out_process_item_fails_the_run_with_its_name() -> None:
    pipeline = Pipeline([Stage(fns.hang_on_5, kind="process", workers=2, timeout=0.5)])
    with anyio.fail_after(30), pytest.raises(pipeflow.PipelineError) as caught:
        await pipeline.run(range(20))
    assert caught.value.index == 5 and caught.value.error_type == "ItemTimeout"


async def test_a_hung_thread_item_is_abandoned_and_capacity_kept() -> None:
    release = threading.Event()

    def hang(n: int) -> int:
        if n == 5:
            release.wait(30)
        return n

    pipeline = Pipeline([Stage(hang, kind="thread", workers=1, timeout=0.3, on_error="skip")])
    try:
        with anyio.fail_after(20):
            report = await pipeline.run(range(20))
    finally:
        release.set()
    assert report.stages[0].items_out == 19 and report.stages[0].timed_out == 1


async def test_a_hung_async_item_is_cancelled() -> None:
    async def hang(n: int) -> int:
        if n == 5:
            await anyio.sleep_forever()
        return n

    pipeline = Pipeline([Stage(hang, kind="async", workers=4, timeout=0.2, on_error="skip")])
    with anyio.fail_after(10):
        assert await pipeline.collect(range(10)) == [0, 1, 2, 3, 4, 6, 7, 8, 9]


async def test_an_unpicklable_result_fails_only_its_item() -> None:
    pipeline = Pipeline(
        [Stage(fns.unpicklable_result_on_4, kind="process", batch=10, on_error="skip")]
    )
    report = await pipeline.run(range(10))
    assert (report.stages[0].items_out, report.stages[0].skipped) == (9, 1)


async def test_an_unpicklable_item_fails_only_its_item() -> None:
    items: list[object] = [1, 2, threading.Lock(), 4]
    pipeline = Pipeline(
        [Stage(fns.pid_of, kind="process", batch=4, on_error="dead_letter")],
        dead_letter=(dead := pipeflow.ListSink()),
    )
    report = await pipeline.run(items)
    assert report.stages[0].items_out == 3
    assert len(dead.items) == 1 and dead.items[0]["index"] == 2
    assert "pickle" in dead.items[0]["message"]


async def test_the_error_budget_aborts_a_run_that_skips_too_much() -> None:
    pipeline = Pipeline([Stage(fns.fail_on_3, kind="thread", on_error="skip")], max_errors=0)
    with pytest.raises(pipeflow.ErrorBudgetExceeded, match="max_errors=0"):
        await pipeline.run(range(10))
    ok = Pipeline([Stage(fns.fail_on_3, kind="thread", on_error="skip")], max_errors=1)
    assert (await ok.run(range(10))).stages[0].skipped == 1


async def test_a_stop_request_finishes_items_in_flight_and_reports_interrupted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "out.jsonl"
    control = pipeflow.RunControl()

    def progress(report: pipeflow.RunReport) -> None:
        if report.items_written >= 50 and not control.stopping:
            control.stop()

    def endless():  # type: ignore[no-untyped-def]
        n = 0
        while True:
            yield n
            n += 1

    pipeline = Pipeline(
        [Stage(fns.slow_identity, kind="thread", workers=4)], sink=pipeflow.JsonlSink(path)
    )
    with anyio.fail_after(30):
        report = await pipeline.run(endless(), progress=progress, control=control)
    assert report.status == "interrupted"
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == list(range(len(lines)))
    stage = report.stages[0]
    assert report.items_read == stage.items_in == stage.items_out == report.items_written
    assert report.items_written == len(lines) >= 50


async def test_a_stop_with_an_async_source_delivers_every_item_taken_from_it() -> None:
    taken = 0
    control = pipeflow.RunControl()

    async def endless():  # type: ignore[no-untyped-def]
        nonlocal taken
        n = 0
        while True:
            await anyio.lowlevel.checkpoint()
            taken += 1
            yield n
            n += 1

    def progress(report: pipeflow.RunReport) -> None:
        if report.items_written >= 100 and not control.stopping:
            control.stop()

    async def ident(n: int) -> int:
        return n

    sink = pipeflow.ListSink()
    pipeline = Pipeline([Stage(ident, kind="async", workers=4)], sink=sink)
    with anyio.fail_after(30):
        report = await pipeline.run(endless(), progress=progress, control=control)
    assert report.status == "interrupted"
    assert sink.items == list(range(taken)), "an item taken from the source was dropped"


needs_mid_write = pytest.mark.skipif(
    not fns.CAN_DIE_MID_WRITE, reason="needs /proc/<pid>/task/<tid>/syscall (Linux)"
)


@needs_mid_write
async def test_a_worker_killed_while_it_sends_a_result_costs_only_its_item() -> None:
    # the pool reads half a result and waits for the rest for good, never noticing the
    # death: the run must notice it, and replace the pool as after any crash
    sink = pipeflow.ListSink()
    pipeline = Pipeline(
        [Stage(fns.die_while_sending_3, kind="process", workers=2, on_error="skip")], sink=sink
    )
    with anyio.fail_after(60):
        report = await pipeline.run(range(8))
    assert sink.items == [0, 1, 2, 4, 5, 6, 7]
    stage = report.stages[0]
    assert (stage.items_out, stage.skipped, stage.crashed) == (7, 1, 1)
    assert not worker_processes()


@needs_mid_write
async def test_a_lent_pool_stuck_on_a_dead_workers_half_result_fails_the_run() -> None:
    context = multiprocessing.get_context("forkserver")
    executor = concurrent.futures.ProcessPoolExecutor(2, mp_context=context)
    try:
        pipeline = Pipeline(
            [Stage(fns.die_while_sending_3, name="lent", executor=executor, on_error="skip")]
        )
        with anyio.fail_after(60), pytest.raises(pipeflow.PipelineError) as caught:
            await pipeline.run(range(8))
        error = caught.value
        assert error.stage == "lent" and error.error_type == "WorkerCrashed"
        assert "while it sent a result" in str(error) and "cannot be replaced" in str(error)
        assert error.report.status == "failed"  # type: ignore[attr-defined]
    finally:  # the pool is the test's: free it as pipeflow frees its own
        _compat.skip_cancelled_calls_when_broken(executor)  # CPython 3.11's manager thread
        _pools._kill_workers(executor)
        executor.shutdown(wait=True)
