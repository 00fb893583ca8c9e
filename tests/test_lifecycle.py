"""Worker lifecycle: recycled workers, setup and teardown on every exit path, sources
that block between items."""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import fns
from conftest import worker_processes
from pipeflow import ListSink, Pipeline, PipelineError, Pool, Stage
from pipeflow._pools import PoolHandle
from test_cli import pipeflow

pytestmark = pytest.mark.anyio


def _numbers(count: int) -> Iterator[int]:
    yield from range(count)


# --- max_tasks_per_child ------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("workers", [1, 2])
async def test_recycled_workers_keep_every_call_moving(ordered: bool, workers: int) -> None:
    lifespan = 2
    sink = ListSink()
    pipeline = Pipeline(
        [Stage(fns.pid_and_square, executor="cpu", ordered=ordered)],
        executors={"cpu": Pool("process", workers=workers, max_tasks_per_child=lifespan)},
        sink=sink,
    )
    with anyio.fail_after(60):
        report = await pipeline.run(_numbers(200))
    squares = [square for _, square in sink.items]
    assert (squares if ordered else sorted(squares)) == [n * n for n in range(200)]
    # at most `lifespan` calls per worker process: the workers were recycled
    calls = report.stages[0].calls
    assert calls > 2 * lifespan
    assert len({pid for pid, _ in sink.items}) >= calls / lifespan
    assert not worker_processes()


@pytest.mark.timeout(60)
def test_a_recycling_pool_replaces_a_worker_whatever_calls_are_queued() -> None:
    # CPython's own reproduction of python/cpython#115634 (one worker, calls queued at
    # once), on the pool a run creates: its pool must spawn each replacement
    handle = PoolHandle("cpu", spec=Pool("process", workers=1, max_tasks_per_child=2))
    handle.start()
    try:
        assert handle.executor is not None
        calls = [handle.executor.submit(fns.square, n) for n in range(10)]
        done, _ = concurrent.futures.wait(calls, timeout=30)
        assert [call.result() for call in calls if call in done] == [n * n for n in range(10)]
    finally:
        handle.shutdown(kill=True)


def test_a_pool_shut_down_while_it_starts_in_a_thread_leaves_no_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `kind: auto` starts its process pool in a thread while the run goes on: a run that
    # ends meanwhile shuts the pool down as the start goes on, and the start must not
    # leave a pool behind it
    creating, release = threading.Event(), threading.Event()
    create = PoolHandle._create

    def slow_create(self: PoolHandle) -> Any:
        creating.set()
        release.wait(timeout=30)
        return create(self)

    monkeypatch.setattr(PoolHandle, "_create", slow_create)
    handle = PoolHandle("cpu", spec=Pool("process", workers=2))
    starter = threading.Thread(target=handle.start)
    starter.start()
    assert creating.wait(timeout=30)
    stopper = threading.Thread(target=functools.partial(handle.shutdown, kill=True))
    stopper.start()
    stopper.join(timeout=1.0)  # a shutdown that does not wait for the start returns now
    release.set()
    starter.join(timeout=30)
    stopper.join(timeout=30)
    assert not starter.is_alive() and not stopper.is_alive()
    assert handle.executor is None
    assert worker_processes() == []


# --- a source that blocks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "workers", "count"), [("async", 4, 6), ("thread", 2, 6), ("process", 2, 6)]
)
async def test_a_blocked_source_holds_back_nothing_it_yielded(
    kind: str, workers: int, count: int
) -> None:
    release = threading.Event()

    def source() -> Iterator[int]:
        yield from range(count)
        release.wait(30)  # blocks on its next item until the test ends

    async def ident(n: int) -> int:
        return n

    fn = ident if kind == "async" else fns.square
    pipeline = Pipeline([Stage(fn, kind=kind, workers=workers)])  # type: ignore[arg-type]
    seen: list[int] = []
    try:
        with anyio.move_on_after(20):
            async with pipeline.stream(source()) as results:
                async for value in results:
                    seen.append(value)
                    if len(seen) == count:
                        break
    finally:
        release.set()
    expected = list(range(count)) if kind == "async" else [n * n for n in range(count)]
    assert seen == expected


# --- setup and teardown ---------------------------------------------------------------------


def _lend(kind: str, workers: int) -> concurrent.futures.Executor:
    if kind == "thread":
        return concurrent.futures.ThreadPoolExecutor(workers)
    context = multiprocessing.get_context("forkserver")
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)


def _counted_stage(
    log: Path, executor: str | concurrent.futures.Executor | None, kind: str
) -> Stage:
    return Stage(
        fns.add_one_with_state,
        # a stage on a given pool takes its kind from that pool
        kind=None if executor is not None else kind,  # type: ignore[arg-type]
        workers=3,
        batch=1,
        executor=executor,
        setup=functools.partial(fns.open_counted, str(log)),
        teardown=functools.partial(fns.close_counted, str(log)),
    )


def _calls(log: Path, what: str) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    return sorted(line.split()[1] for line in lines if line.split()[0] == what)


@pytest.mark.parametrize("kind", ["thread", "process"])
@pytest.mark.parametrize("owner", ["own", "shared", "lent"])
async def test_every_worker_that_ran_setup_runs_teardown_by_the_end_of_the_run(
    tmp_path: Path, kind: str, owner: str
) -> None:
    log = tmp_path / "lifecycle.log"
    lent = _lend(kind, 3) if owner == "lent" else None
    try:
        executor: str | concurrent.futures.Executor | None = {
            "own": None,
            "shared": "pool",
            "lent": lent,
        }[owner]
        pipeline = Pipeline(
            [_counted_stage(log, executor, kind)],
            executors={"pool": Pool(kind, workers=3)},  # type: ignore[arg-type]
        )
        with anyio.fail_after(60):
            assert await pipeline.collect(range(60)) == list(range(1, 61))
        # checked before a lent pool is shut down: the run's end, not the pool's, tore down
        setups = _calls(log, "setup")
        assert 1 <= len(setups) <= 3
        assert _calls(log, "teardown") == setups
    finally:
        if lent is not None:
            lent.shutdown()
    assert _calls(log, "teardown") == _calls(log, "setup")
    assert not worker_processes()


@pytest.mark.parametrize("kind", ["thread", "process"])
@pytest.mark.parametrize("ending", ["failed", "left early"])
async def test_teardown_runs_when_a_run_fails_or_is_cancelled(
    tmp_path: Path, kind: str, ending: str
) -> None:
    log = tmp_path / "lifecycle.log"
    stage = _counted_stage(log, None, kind)
    stage.fn = fns.add_one_with_state_failing_on_30
    pipeline = Pipeline([stage])
    with anyio.fail_after(60):
        if ending == "failed":
            with pytest.raises(PipelineError, match="bad item 30"):
                await pipeline.run(range(60))
        else:
            async with pipeline.stream(range(60)) as results:
                async for value in results:
                    if value == 10:
                        break
    setups = _calls(log, "setup")
    assert setups and _calls(log, "teardown") == setups
    assert not worker_processes()


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_a_lent_pool_keeps_nothing_of_its_runs(tmp_path: Path, kind: str) -> None:
    log = tmp_path / "lifecycle.log"
    lent = _lend(kind, 1)  # one worker: the check below runs where every run's state was
    try:
        for _ in range(20):
            pipeline = Pipeline([_counted_stage(log, lent, kind)])
            with anyio.fail_after(60):
                assert await pipeline.collect(range(5)) == [1, 2, 3, 4, 5]
        assert lent.submit(fns.cached_stage_entries).result(timeout=30) == 0
        assert len(_calls(log, "setup")) == 20
        assert _calls(log, "teardown") == _calls(log, "setup")
    finally:
        lent.shutdown()
    assert not worker_processes()


@pytest.mark.parametrize("kind", ["async", "thread", "process"])
@pytest.mark.parametrize("on_error", ["fail", "skip"])
async def test_a_failing_setup_fails_the_run_naming_the_stage(kind: str, on_error: str) -> None:
    async def ident(n: int, state: Any) -> int:
        return n

    fn = ident if kind == "async" else fns.add_one_with_state
    stage = Stage(fn, name="db", kind=kind, setup=fns.failing_setup, on_error=on_error)  # type: ignore[arg-type]
    with anyio.fail_after(60), pytest.raises(PipelineError) as caught:
        await Pipeline([stage]).run(range(50))
    error = caught.value
    assert (error.stage, error.index, error.error_type) == ("db", None, "ValueError")
    assert str(error) == "stage 'db' failed: ValueError: cannot open the connection (in setup)"
    assert isinstance(error.__cause__, ValueError)
    assert "failing_setup" in error.traceback
    assert error.report.stages[0].skipped == 0  # type: ignore[attr-defined]
    assert not worker_processes()


@pytest.mark.parametrize("kind", ["async", "thread", "process"])
async def test_a_failing_teardown_fails_the_run_after_its_items_are_written(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def ident(n: int, state: Any) -> int:
        return n + 1

    fn = ident if kind == "async" else fns.add_one_with_state
    sink = ListSink()
    pipeline = Pipeline(
        [
            Stage(
                fn,  # type: ignore[arg-type]
                name="db",
                kind=kind,  # type: ignore[arg-type]
                workers=2,
                setup=fns.make_empty_state,
                teardown=fns.failing_teardown,
            )
        ],
        sink=sink,
    )
    with anyio.fail_after(60), pytest.raises(PipelineError) as caught:
        await pipeline.run(range(20))
    error = caught.value
    assert error.stage == "db" and error.index is None
    assert "cannot close the connection (in teardown, worker" in str(error)
    assert isinstance(error.__cause__, ValueError)
    assert "failing_teardown" in error.traceback  # the worker's own traceback
    assert error.report.status == "failed"  # type: ignore[attr-defined]
    assert sorted(sink.items) == list(range(1, 21))
    logged = [r.msg for r in caplog.records if "teardown_error" in str(r.msg)]
    assert logged and all("failing_teardown" in str(m) for m in logged)
    assert not worker_processes()


def test_a_recycled_worker_reports_its_failing_teardown_on_stderr(tmp_path: Path) -> None:
    config = tmp_path / "recycled.yaml"
    out = tmp_path / "out.jsonl"
    config.write_text(
        "executors:\n"
        "  cpu: {kind: process, workers: 1, max_tasks_per_child: 1}\n"
        "source:\n  range: {stop: 5}\n"
        "stages:\n"
        "  - name: db\n"
        "    fn: fns:add_one_with_state\n"
        "    executor: cpu\n"
        "    batch: 1\n"
        "    setup: fns:make_empty_state\n"
        "    teardown: fns:failing_teardown\n"
        f"sink:\n  jsonl: {out}\n"
    )
    done = pipeflow("run", config, "--quiet")
    assert out.read_text().split() == ["1", "2", "3", "4", "5"]
    # each call ran in a worker of its own, which tore down as it exited
    reports = done.stderr.count("pipeflow: teardown of stage 'db' failed in worker pid ")
    assert reports == 5, done.stderr
    assert "ValueError: cannot close the connection" in done.stderr
    assert "in failing_teardown" in done.stderr
