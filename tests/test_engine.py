"""The engine through the Python API: results, order, ops, kinds, pools, setup/teardown."""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import fns
import pipeflow
from pipeflow import ListSink, Pipeline, Pool, Stage
from test_cli import REPORT_STAGE_FIELDS

pytestmark = pytest.mark.anyio

SQUARES = [1, 4, 9, 16, 25, 36, 49, 64, 81, 100]


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
async def test_squares_on_a_process_pool_in_order(workers: int) -> None:
    pipeline = Pipeline([Stage(fns.square, kind="process", workers=workers)])
    assert await pipeline.collect(range(1, 11)) == SQUARES


async def test_factorials_on_a_thread_pool_match_the_notebook() -> None:
    pipeline = Pipeline([Stage(fns.factorial, kind="thread", workers=5)])
    results = await pipeline.collect(range(1, 11))
    assert results == [(n, math.factorial(n)) for n in range(1, 11)]
    assert dict(results)[10] == 3628800


async def test_three_kinds_mixed_over_10000_items_keep_order() -> None:
    async def tag(n: int) -> int:
        await anyio.lowlevel.checkpoint()
        return n

    pipeline = Pipeline(
        [
            Stage(tag, kind="async", workers=16),
            Stage(fns.square, kind="process", workers=2),
            Stage(str, kind="thread", workers=4),
        ]
    )
    report_holder: list[pipeflow.RunReport] = []
    results = await pipeline.collect(range(10_000))
    assert results == [str(n * n) for n in range(10_000)]
    report = await pipeline.run(range(10_000), progress=report_holder.append)
    assert [s.items_out for s in report.stages] == [10_000, 10_000, 10_000]
    assert report.items_written == 10_000 and report.status == "ok"


async def test_async_stage_runs_at_most_workers_coroutines_at_once() -> None:
    running = {"a": 0, "b": 0}
    peak = {"a": 0, "b": 0}

    def counted(stage: str, step: int) -> Any:
        async def tag(n: int) -> int:
            running[stage] += 1
            peak[stage] = max(peak[stage], running[stage])
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            running[stage] -= 1
            return n + step

        return tag

    pipeline = Pipeline(
        [
            Stage(counted("a", 1), name="a", kind="async", workers=4),
            Stage(counted("b", 10), name="b", kind="async", workers=3, ordered=False),
        ]
    )
    with anyio.fail_after(30):
        results = await pipeline.collect(range(2_000))
    assert sorted(results) == [n + 11 for n in range(2_000)]
    # the chunks of a stage share its workers, and they are all used
    assert peak == {"a": 4, "b": 3}


async def test_async_stage_keeps_every_worker_busy_from_one_chunk_to_the_next() -> None:
    # Each item waits until the test lets it end, and the test lets the oldest running
    # item end only once every worker runs one (or every item left does): the run ends
    # only if a coroutine that ends hands its worker to the next item at once, whichever
    # chunk that item is in, without waiting for another item of that chunk to end.
    workers, n = 4, 200
    running: list[int] = []
    changed = anyio.Event()
    released: dict[int, anyio.Event] = {}

    async def held(x: int) -> int:
        nonlocal changed
        released[x] = anyio.Event()
        running.append(x)
        changed.set()
        await released[x].wait()
        running.remove(x)
        changed.set()
        return x

    async def until(condition: Callable[[], bool]) -> None:
        nonlocal changed
        while not condition():
            changed = anyio.Event()
            await changed.wait()

    async def drive() -> None:
        for done in range(n):
            await until(lambda: len(running) >= min(workers, n - done))  # noqa: B023
            oldest = running[0]
            released[oldest].set()
            await until(lambda: oldest not in running)  # noqa: B023

    sink = ListSink()
    pipeline = Pipeline([Stage(held, kind="async", workers=workers, batch=16)], sink=sink)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            report = await pipeline.run(range(n))
    assert sink.items == list(range(n))
    assert report.stages[0].calls > 1  # the items came in several chunks


async def test_async_stage_runs_coroutines_that_never_wait_in_few_large_chunks() -> None:
    # a chunk holds its results until its end, so it is sized by its time, as a thread
    # call is: coroutines that end at once make chunks of thousands, not a fixed few
    async def inc(n: int) -> int:
        return n + 1

    n = 40_000
    sink = ListSink()
    report = await Pipeline([Stage(inc, kind="async", workers=16)], sink=sink).run(range(n))
    assert sink.items == [x + 1 for x in range(n)]
    assert report.stages[0].calls <= n // 1000


async def test_async_stage_chunks_of_slow_coroutines_hold_one_item_per_lane() -> None:
    # items longer than a chunk's target time would be sized one per chunk; a chunk of
    # fewer items than lanes could not keep them busy, so it holds one item per lane
    async def slow(n: int) -> int:
        await anyio.sleep(0.03)
        return n

    workers, n = 8, 64
    sink = ListSink()
    pipeline = Pipeline([Stage(slow, kind="async", workers=workers)], sink=sink)
    with anyio.fail_after(30):
        report = await pipeline.run(range(n))
    assert sink.items == list(range(n))
    assert report.stages[0].calls <= n // workers + 2  # the source's first item goes alone


async def test_async_stage_coroutines_that_wait_or_fail_among_instant_ones_run_once() -> None:
    # a chunk runs the coroutines that end at their first step one after the other; one
    # that waits or fails there goes on from where it is, never started a second time
    started: dict[int, int] = {}

    async def mixed(x: int) -> int:
        started[x] = started.get(x, 0) + 1
        if x % 7 == 0:
            await anyio.lowlevel.checkpoint()
        if x % 11 == 0:
            raise ValueError(x)
        if x % 13 == 0:
            await anyio.lowlevel.checkpoint()
            raise KeyError(x)
        return -x

    n = 3_000
    sink = ListSink()
    pipeline = Pipeline([Stage(mixed, kind="async", workers=4, on_error="skip")], sink=sink)
    with anyio.fail_after(30):
        report = await pipeline.run(range(n))
    assert started == dict.fromkeys(range(n), 1)
    kept = [x for x in range(n) if x % 11 and x % 13]
    assert sink.items == [-x for x in kept]
    stage = report.stages[0]
    assert (stage.items_in, stage.items_out, stage.skipped) == (n, len(kept), n - len(kept))


async def test_unordered_stage_delivers_every_item() -> None:
    pipeline = Pipeline([Stage(fns.slow_identity, kind="thread", workers=8, ordered=False)])
    results = await pipeline.collect(range(500))
    assert sorted(results) == list(range(500))


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_filter_flat_map_and_map_batch(kind: str) -> None:
    pipeline = Pipeline(
        [
            Stage(fns.is_even, kind=kind, op="filter"),  # type: ignore[arg-type]
            Stage(fns.repeat, kind=kind, op="flat_map"),  # type: ignore[arg-type]
            Stage(fns.double_all, kind=kind, op="map_batch", batch=7),  # type: ignore[arg-type]
        ]
    )
    expected = [2 * m for n in range(100) if n % 2 == 0 for m in [n] * (n % 3)]
    assert await pipeline.collect(range(100)) == expected
    report = await pipeline.run(range(100))
    assert report.stage("is_even").filtered_out == 50
    assert report.stage("is_even").items_out == 50


async def test_async_stage_with_sync_function_is_refused_with_a_hint() -> None:
    with pytest.raises(pipeflow.ConfigError, match="would block the event loop.*kind: thread"):
        Stage(fns.square, kind="async")


async def test_coroutine_function_in_a_thread_stage_is_refused() -> None:
    async def fetch(n: int) -> int:
        return n

    with pytest.raises(pipeflow.ConfigError, match="use kind: async"):
        Stage(fetch, kind="thread")


async def test_lambda_and_local_function_run_in_a_process_stage() -> None:
    offset = 7

    def add_offset(n: int) -> int:
        return n + offset

    pipeline = Pipeline(
        [
            Stage(lambda n: n * 3, name="triple", kind="process", workers=2),
            Stage(add_offset, kind="process", workers=2),
        ]
    )
    assert await pipeline.collect(range(5)) == [n * 3 + 7 for n in range(5)]


async def test_unpicklable_process_callable_is_a_clear_error() -> None:
    import threading

    lock = threading.Lock()

    def uses_lock(n: int) -> int:
        with lock:
            return n

    pipeline = Pipeline([Stage(uses_lock, kind="process")])
    with pytest.raises(pipeflow.ConfigError, match="uses_lock.*cannot be pickled"):
        await pipeline.collect(range(3))


async def test_a_lent_executor_is_used_and_never_shut_down() -> None:
    with concurrent.futures.ThreadPoolExecutor(3) as executor:
        pipeline = Pipeline([Stage(fns.square, executor=executor)])
        assert await pipeline.collect(range(1, 11)) == SQUARES
        assert executor.submit(fns.square, 3).result() == 9  # still usable


async def test_a_lent_process_pool_is_used_and_never_shut_down() -> None:
    with concurrent.futures.ProcessPoolExecutor(2) as executor:
        pipeline = Pipeline([Stage(fns.square, executor=executor)])
        report = await pipeline.run(range(1, 11))
        assert report.stages[0].kind == "process"
        assert executor.submit(fns.square, 4).result() == 16


async def test_stages_share_a_named_pool() -> None:
    pipeline = Pipeline(
        [
            Stage(fns.pid_of, name="first", executor="cpu"),
            Stage(fns.pid_of, name="second", executor="cpu"),
        ],
        executors={"cpu": Pool("process", workers=1)},
        sink=pipeflow.ListSink(),
    )
    report = await pipeline.run(range(50))
    first, second = report.stages
    assert first.kind == second.kind == "process"
    # one worker process in all: two pools would show two
    (pid,) = set(pipeline.sink.items)  # type: ignore[attr-defined]
    assert set(first.by_worker) == set(second.by_worker) == {f"pid {pid}"}


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_setup_runs_once_per_worker_and_passes_state(kind: str) -> None:
    pipeline = Pipeline(
        [Stage(fns.add_state, kind=kind, workers=2, setup=fns.make_state, batch=1)]  # type: ignore[arg-type]
    )
    results = await pipeline.collect(range(40))
    assert [value for value, _ in results] == [n + 100 for n in range(40)]
    assert 1 <= len({worker for _, worker in results}) <= 2


async def test_async_setup_and_teardown() -> None:
    events: list[str] = []

    async def open_session() -> dict[str, int]:
        events.append("setup")
        return {"offset": 1}

    async def close_session(state: dict[str, int]) -> None:
        events.append("teardown")

    async def add(n: int, state: dict[str, int]) -> int:
        return n + state["offset"]

    pipeline = Pipeline(
        [Stage(add, kind="async", workers=4, setup=open_session, teardown=close_session)]
    )
    assert await pipeline.collect(range(5)) == [1, 2, 3, 4, 5]
    assert events == ["setup", "teardown"]


async def test_thread_teardown_runs_for_each_worker_state() -> None:
    closed: list[int] = []
    lock = anyio.Lock()  # noqa: F841 - teardowns run one at a time from the run's end

    def setup() -> list[int]:
        return [0]

    def use(n: int, state: list[int]) -> int:
        state[0] += 1
        return n

    def teardown(state: list[int]) -> None:
        closed.append(state[0])

    pipeline = Pipeline([Stage(use, kind="thread", workers=3, setup=setup, teardown=teardown)])
    await pipeline.run(range(100))
    assert 1 <= len(closed) <= 3
    assert sum(closed) == 100


async def test_report_accounts_for_every_item() -> None:
    pipeline = Pipeline([Stage(fns.square, kind="process", workers=2)])
    report = await pipeline.run(range(1000))
    stage = report.stages[0]
    assert report.items_read == 1000
    assert stage.items_in == stage.items_out == 1000
    assert stage.busy_s > 0 and stage.calls >= 1
    assert sum(stage.by_worker.values()) == 1000
    data = report.to_dict()
    assert set(data["stages"][0]) >= REPORT_STAGE_FIELDS
    assert data["status"] == "ok" and data["wall_s"] > 0


async def test_async_iterable_source_and_slow_source_still_streams() -> None:
    first_seen = anyio.Event()

    async def slow_source():  # type: ignore[no-untyped-def]
        yield 1
        await first_seen.wait()  # the first result must arrive before the source goes on
        yield 2

    async def ident(n: int) -> int:
        return n

    pipeline = Pipeline([Stage(ident, kind="async")])
    seen = []
    with anyio.fail_after(10):
        async with pipeline.stream(slow_source()) as results:
            async for value in results:
                seen.append(value)
                first_seen.set()
    assert seen == [1, 2]


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_slow_source_item_reaches_the_consumer_while_the_stage_is_idle(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a flush longer than the test may take: each item must go on because the stage is
    # idle, not because its batch waited long enough for company
    # the source's flush, and a stage's wait for company (both read FLUSH_INTERVAL_S)
    for module in (pipeflow._pump, pipeflow._stagerun):
        monkeypatch.setattr(module, "FLUSH_INTERVAL_S", 3600.0)
    received = [threading.Event() for _ in range(6)]

    def lockstep():  # type: ignore[no-untyped-def]
        for n in range(6):
            yield n
            # the next item only once the consumer has this one
            if not received[n].wait(30):
                raise RuntimeError(f"item {n} did not reach the consumer")

    pipeline = Pipeline([Stage(fns.square, kind=kind, workers=2)])
    seen = []
    with anyio.fail_after(30):
        async with pipeline.stream(lockstep()) as results:
            async for value in results:
                received[len(seen)].set()
                seen.append(value)
    assert seen == [n * n for n in range(6)]


async def test_slow_async_source_item_reaches_the_consumer_while_the_stage_is_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the source's flush, and a stage's wait for company (both read FLUSH_INTERVAL_S)
    for module in (pipeflow._pump, pipeflow._stagerun):
        monkeypatch.setattr(module, "FLUSH_INTERVAL_S", 3600.0)
    received = [anyio.Event() for _ in range(6)]

    async def lockstep():  # type: ignore[no-untyped-def]
        for n in range(6):
            yield n
            await received[n].wait()  # the next item only once the consumer has this one

    pipeline = Pipeline([Stage(fns.square, kind="thread", workers=2)])
    seen = []
    with anyio.fail_after(30):
        async with pipeline.stream(lockstep()) as results:
            async for value in results:
                received[len(seen)].set()
                seen.append(value)
    assert seen == [n * n for n in range(6)]


def test_run_sync_runs_without_a_loop() -> None:
    report = Pipeline([Stage(fns.square, kind="thread")]).run_sync(range(10))
    assert report.status == "ok" and report.items_written == 10


def test_duplicate_stage_names_are_refused() -> None:
    with pytest.raises(pipeflow.ConfigError, match="duplicate stage name"):
        Pipeline([Stage(fns.square), Stage(fns.square)])


def test_dead_letter_policy_needs_a_dead_letter_sink() -> None:
    with pytest.raises(pipeflow.ConfigError, match="no dead_letter sink"):
        Pipeline([Stage(fns.square, on_error="dead_letter")])
