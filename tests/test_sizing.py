"""How `batch: auto` sizes a stage's executor calls: from the items' own measured cost."""

from __future__ import annotations

from pipeflow._batches import TARGET_CALL_S, _ChunkSizer

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
