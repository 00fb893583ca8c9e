"""Worker lifecycle: recycled workers, setup and teardown on every exit path, sources
that block between items."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator

import anyio
import pytest

import fns
from conftest import worker_processes
from pipeflow import ListSink, Pipeline, Pool, Stage
from pipeflow._pools import PoolHandle

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
