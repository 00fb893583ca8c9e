"""Per-item timeouts: nothing lost when a pool is killed, clocks that start when an item
starts, batches kept, and a lent pool that breaks failing the run instead of losing items."""

from __future__ import annotations

import concurrent.futures
import json
import textwrap
import threading
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

import fns
import pipeflow
from conftest import worker_processes
from pipeflow import Pipeline, Pool, Stage
from test_cli import pipeflow as run_command

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_pool_killed_after_a_timeout_loses_no_queued_call(ordered: bool) -> None:
    # Two stages share one 2-worker pool, so more calls wait in it than its workers and
    # call queue hold: when item 0 times out and the pool is killed, some calls are still
    # queued. Each must run again on the new pool, none counted as an error.
    for _ in range(3):
        pipeline = Pipeline(
            [
                Stage(
                    fns.hang_uninterruptibly_on_0,
                    name="hangs",
                    executor="cpu",
                    timeout=0.5,
                    on_error="skip",
                    ordered=ordered,
                ),
                Stage(fns.nap, name="naps", executor="cpu", ordered=ordered),
            ],
            executors={"cpu": Pool("process", workers=2)},
        )
        sink = pipeflow.ListSink()
        pipeline.sink = sink
        with anyio.fail_after(50):
            report = await pipeline.run(range(60))
        assert report.status == "ok"
        assert sorted(sink.items) == list(range(1, 60))
        hangs, naps = report.stages
        assert (hangs.items_in, hangs.items_out, hangs.skipped) == (60, 59, 1)
        assert (hangs.errors, hangs.timed_out, hangs.retries) == (1, 1, 0)
        assert (naps.items_in, naps.items_out, naps.errors) == (59, 59, 0)
        assert report.items_written == 59
    assert not worker_processes()


def test_the_command_writes_every_item_after_a_timeout_kills_a_pool(tmp_path: Path) -> None:
    # the same scenario through the command: its exit code, its file and its report
    out = tmp_path / "out.jsonl"
    report_path = tmp_path / "report.json"
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            name: timeouts
            executors:
              cpu: {{kind: process, workers: 2}}
            source:
              range: {{start: 0, stop: 60}}
            stages:
              - name: hangs
                fn: fns:hang_uninterruptibly_on_0
                executor: cpu
                ordered: false
                timeout: 500ms
                on_error: skip
              - name: naps
                fn: fns:nap
                executor: cpu
                ordered: false
            sink:
              jsonl: {out}
            """
        )
    )
    for _ in range(2):
        done = run_command("run", config, "--report", report_path)
        assert done.returncode == 0, done.stderr
        lines = out.read_text().splitlines()
        assert sorted(json.loads(line) for line in lines) == list(range(1, 60))
        report = json.loads(report_path.read_text())
        assert report["status"] == "ok" and report["items_written"] == 59
        hangs = report["stages"][0]
        assert (hangs["items_out"], hangs["skipped"], hangs["timed_out"]) == (59, 1, 1)


async def test_instant_items_behind_another_stage_on_a_shared_pool_do_not_time_out() -> None:
    # one worker: the second stage's instant calls wait behind the first stage's 1 s
    # calls, longer than their own timeout and its grace; waiting is not their time
    pipeline = Pipeline(
        [
            Stage(fns.sleep_1, name="slow", executor="cpu"),
            Stage(fns.square, name="instant", executor="cpu", timeout=0.3),
        ],
        executors={"cpu": Pool("process", workers=1)},
    )
    with anyio.fail_after(50):
        report = await pipeline.run(range(4))
    slow, instant = report.stages
    assert slow.items_out == 4
    assert (instant.items_out, instant.errors, instant.timed_out) == (4, 0, 0)
    assert report.status == "ok" and report.items_written == 4


async def test_items_queued_in_a_lent_pool_behind_the_apps_work_are_not_on_the_clock() -> None:
    # the app's own call holds the lent pool's one thread past the stage's timeout; the
    # stage's calls wait behind it, which the run cannot see: waiting is not their time
    release = threading.Event()
    queued = threading.Event()

    class Watched(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
            future = super().submit(fn, *args, **kwargs)
            if fn is not release.wait:
                queued.set()
            return future

    with Watched(1) as executor:
        apps_call = executor.submit(release.wait)
        pipeline = Pipeline([Stage(fns.square, executor=executor, timeout=0.2)])
        sink = pipeflow.ListSink()
        pipeline.sink = sink
        try:
            with anyio.fail_after(50):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pipeline.run, range(5))
                    await anyio.to_thread.run_sync(queued.wait)
                    await anyio.sleep(0.6)  # well past the timeout, behind the app's call
                    release.set()
        finally:
            release.set()  # the pool's end waits for the app's call
        assert apps_call.result() is True
    assert sink.items == [n * n for n in range(5)]


@pytest.mark.parametrize("workers", [1, 2])
async def test_items_waiting_for_a_worker_are_not_on_the_clock(workers: int) -> None:
    # ten items of 0.3 s, more than the workers: an item queued behind another one
    # would reach its 0.6 s timeout, though it runs for half of it
    pipeline = Pipeline([Stage(fns.sleep_03, kind="process", workers=workers, timeout=0.6)])
    sink = pipeflow.ListSink()
    pipeline.sink = sink
    with anyio.fail_after(50):
        report = await pipeline.run(range(10))
    stage = report.stages[0]
    assert (stage.items_out, stage.errors, stage.timed_out) == (10, 0, 0)
    assert sink.items == list(range(10))


@pytest.mark.parametrize("kind", ["process", "thread"])
async def test_a_timeout_keeps_the_batches_a_map_batch_stage_receives(kind: str) -> None:
    pipeline = Pipeline(
        [Stage(fns.batch_sizes, kind=kind, workers=2, op="map_batch", batch=16, timeout=5)]
    )
    sink = pipeflow.ListSink()
    pipeline.sink = sink
    with anyio.fail_after(50):
        report = await pipeline.run(range(64))
    # calls hold up to 16 items (fewer when the stage has fewer waiting), never one each
    assert len(sink.items) == 64 and max(sink.items) == 16
    assert report.stages[0].calls <= 16


async def test_a_hung_item_in_a_batched_process_stage_times_out_alone() -> None:
    # the item is interrupted inside its worker: its chunk-mates keep their results,
    # and the pool is not killed (so nothing runs twice)
    pipeline = Pipeline(
        [Stage(fns.hang_on_5, kind="process", workers=2, batch=5, timeout=0.5, on_error="skip")]
    )
    sink = pipeflow.ListSink()
    pipeline.sink = sink
    with anyio.fail_after(50):
        report = await pipeline.run(range(20))
    stage = report.stages[0]
    assert sink.items == [n for n in range(20) if n != 5]
    assert (stage.items_out, stage.skipped, stage.timed_out) == (19, 1, 1)
    # batched calls, on the pool's two first workers, and no item run twice
    assert stage.calls < 20
    assert len(stage.by_worker) == 2 and sum(stage.by_worker.values()) == 20


async def test_an_item_that_cannot_be_interrupted_is_timed_out_by_its_parent() -> None:
    pipeline = Pipeline(
        [
            Stage(
                fns.hang_uninterruptibly_on_0,
                kind="process",
                workers=2,
                batch=4,
                timeout=0.5,
                on_error="skip",
            )
        ]
    )
    sink = pipeflow.ListSink()
    pipeline.sink = sink
    with anyio.fail_after(50):
        report = await pipeline.run(range(12))
    stage = report.stages[0]
    assert sink.items == list(range(1, 12))
    assert (stage.items_out, stage.skipped, stage.timed_out, stage.errors) == (11, 1, 1, 1)
    assert not worker_processes()


async def test_a_lent_process_pool_that_breaks_fails_the_run() -> None:
    with concurrent.futures.ProcessPoolExecutor(2) as executor:
        pipeline = Pipeline([Stage(fns.exit_on_2, name="lent", executor=executor, on_error="skip")])
        sink = pipeflow.ListSink()
        pipeline.sink = sink
        with anyio.fail_after(50), pytest.raises(pipeflow.PipelineError) as caught:
            await pipeline.run(range(6))
    error = caught.value
    assert error.stage == "lent" and error.error_type == "WorkerCrashed"
    assert "lent" in str(error) and "cannot be replaced" in str(error)
    report = error.report  # type: ignore[attr-defined]
    assert report.status == "failed"
    assert report.stages[0].skipped == 0


async def test_a_timed_out_items_record_shows_where_it_was_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    pipeline = Pipeline(
        [
            Stage(
                fns.hang_on_5,
                kind="process",
                workers=2,
                batch=5,
                timeout=0.5,
                on_error="dead_letter",
            )
        ],
        dead_letter=pipeflow.JsonlSink(path),
    )
    with anyio.fail_after(50):
        results = await pipeline.collect(range(10))
    assert results == [n for n in range(10) if n != 5]
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert (record["index"], record["error"]) == (5, "ItemTimeout")
    assert "in hang_on_5" in record["traceback"] and "time.sleep(3600)" in record["traceback"]
