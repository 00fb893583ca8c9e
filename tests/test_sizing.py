"""How `batch: auto` sizes a stage's executor calls: from the items' own measured cost."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fns import square
from pipeflow import Pool, Stage
from pipeflow._batches import ROUND_TRIPS_KEPT, TARGET_CALL_S, Batch, _ByteGauge, _ChunkSizer
from pipeflow._pools import PoolHandle
from pipeflow._pump import SOURCE_MAX_BATCH, _SourcePump
from pipeflow._stagerun import StageRun

FIRST_CALL_S = 0.3  # a worker's first call loads the stage's callable: imports, setup
ITEM_S = 1e-5


def test_a_workers_slow_first_call_does_not_keep_the_next_calls_small() -> None:
    sizer = _ChunkSizer(None, "process")
    sizer.observe(1, FIRST_CALL_S, "pid 1")
    sizer.observe(1, FIRST_CALL_S, "pid 2")
    assert sizer.size == 1  # all it knows yet: an item may cost that much
    sizer.observe(1, ITEM_S, "pid 1")
    assert sizer.size == int(TARGET_CALL_S["process"] / ITEM_S)


def test_a_new_workers_first_call_leaves_a_known_cost_alone() -> None:
    # a replaced pool's workers load the callable again
    sizer = _ChunkSizer(None, "process")
    sizer.observe(1, FIRST_CALL_S, "pid 1")
    sizer.observe(100, 100 * ITEM_S, "pid 1")
    known = sizer.size
    sizer.observe(1, FIRST_CALL_S, "pid 3")
    assert sizer.size == known


def test_items_that_are_slow_on_every_call_keep_calls_small() -> None:
    sizer = _ChunkSizer(None, "process")
    for call in range(4):
        sizer.observe(1, FIRST_CALL_S, f"pid {call % 2}")
    assert sizer.size == 1


# --- cutting a stage's input into calls ---


def _stage_run(kind: str, *, batch: int | str = "auto") -> StageRun:
    stage = Stage(square, name="work", kind=kind, workers=2, batch=batch)  # type: ignore[arg-type]
    pool = PoolHandle("work", spec=Pool(kind, 2))  # type: ignore[arg-type]

    async def dead_letter(record: dict[str, Any]) -> None:
        raise AssertionError(record)

    return StageRun(
        stage,
        pool,
        "work",
        dead_letter=dead_letter,
        check_error_budget=lambda: None,
        teardown_failures=[],
    )


async def _calls_for(run: StageRun, items: int) -> list[int]:
    """The items of each call the stage makes for one batch of `items` that waits alone."""
    send, recv = anyio.create_memory_object_stream[Batch](8)
    send.send_nowait(Batch(range(items), list(range(items))))
    send.close()
    calls = []
    with recv, anyio.fail_after(10):
        async for chunk in run._chunks(recv):
            calls.append(len(chunk.values))
            run._call_done()
    return calls


@pytest.mark.anyio
async def test_a_batch_that_waits_alone_is_shared_between_the_workers_once() -> None:
    # the rest of a batch shared between two workers is not shared again and again
    assert await _calls_for(_stage_run("process", batch=1000), 1000) == [500, 500]


@pytest.mark.anyio
async def test_the_last_calls_of_costly_items_shrink_so_that_no_worker_idles() -> None:
    run = _stage_run("thread")
    for _ in range(3):
        run.sizer.observe(1, 0.005, "thread 1")  # 5 ms an item: a few items a call
    run.sizer.observe_round_trip(0.0051, 0.005)
    size = run.sizer.size
    assert 1 < size < 16
    calls = await _calls_for(run, 64)
    assert sum(calls) == 64 and max(calls) == size
    # the items left at the end are shared between the two workers, down to one each
    assert calls[-2:] == [1, 1]
    assert calls == sorted(calls, reverse=True)


@pytest.mark.anyio
async def test_items_worth_less_than_a_round_trip_are_not_shared_out() -> None:
    # a process pool whose calls take as long as a Dask cluster's (a test runs without
    # the dask extra: the rule is the same on every pool)
    run = _stage_run("process")
    run.sizer.observe(100, 100 * 1e-7, "worker 1")  # 0.1 us an item, known
    run.sizer.observe(100, 100 * 1e-7, "worker 1")
    run.sizer.observe_round_trip(0.010, 1e-5)  # a Dask cluster's ~10 ms
    assert await _calls_for(run, 4000) == [4000]
    run.sizer.observe(100, 100 * 0.001, "worker 1")  # items of 1 ms: worth a call of half
    run.sizer.observe(100, 100 * 0.001, "worker 1")
    assert await _calls_for(run, 40) == [20, 20]


def test_the_round_trip_of_a_call_is_the_shortest_seen_lately() -> None:
    sizer = _ChunkSizer(None, "dask")
    assert sizer.round_trip_s == 0.0  # nothing is known: every part is worth a call
    assert sizer.worth_a_call(1)
    sizer.observe_round_trip(0.030, 0.010)  # waited behind another call
    sizer.observe_round_trip(0.012, 0.002)
    assert sizer.round_trip_s == pytest.approx(0.010)
    for _ in range(ROUND_TRIPS_KEPT):
        sizer.observe_round_trip(0.002, 0.0)
    assert sizer.round_trip_s == pytest.approx(0.002)


def test_source_batches_reach_the_first_stages_size_once_it_has_measured_its_items() -> None:
    run = _stage_run("process")
    pump = object.__new__(_SourcePump)
    pump.stages, pump._source_bytes = [run], _ByteGauge()
    # unmeasured, the stage runs an item a call: a batch is what its workers take at once
    assert pump._max_source_batch() == 2
    run.sizer.observe(1, 1e-7, "worker 1")
    run.sizer.observe(1, 1e-7, "worker 1")
    # not 4, 8, 16...: each of those would be a call with a round trip of its own
    assert pump._max_source_batch() == SOURCE_MAX_BATCH
