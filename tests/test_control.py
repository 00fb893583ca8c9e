"""RunControl: an app that embeds a pipeline stops it gracefully, the way the command does.

Every count checked here is the test's own (what the source yielded, what the sink got),
never one the run computes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

import fns
import pipeflow
from conftest import worker_processes
from pipeflow import Pipeline, Stage

pytestmark = pytest.mark.anyio


class Counted:
    """An endless source that counts what it hands out, and a sink that counts what arrives."""

    def __init__(self, stop_after: int) -> None:
        self.taken = 0
        self.delivered: list[Any] = []
        self.stop_after = stop_after
        self.enough = anyio.Event()

    def source(self) -> Iterator[int]:
        n = 0
        while True:
            self.taken += 1  # counted as it leaves the source
            yield n
            n += 1

    async def async_source(self) -> AsyncIterator[int]:
        n = 0
        while True:
            await anyio.lowlevel.checkpoint()
            self.taken += 1
            yield n
            n += 1

    async def sink(self, value: Any) -> None:
        self.delivered.append(value)
        if len(self.delivered) >= self.stop_after:
            self.enough.set()


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_an_app_stops_a_run_from_another_task_and_every_item_taken_is_delivered(
    kind: str,
) -> None:
    counted = Counted(stop_after=200)
    pipeline = Pipeline(
        [Stage(fns.slow_identity, kind=kind, workers=2)],  # type: ignore[arg-type]
        sink=pipeflow.CallableSink(counted.sink),
    )
    control = pipeflow.RunControl()
    reports: list[pipeflow.RunReport] = []

    async def run() -> None:
        reports.append(await pipeline.run(counted.source(), control=control))

    async def stop_when_enough() -> None:
        await counted.enough.wait()
        control.stop()

    with anyio.fail_after(50):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            tg.start_soon(stop_when_enough)
    (report,) = reports
    assert report.status == "interrupted"
    assert counted.taken >= 200
    assert counted.delivered == list(range(counted.taken)), "an item taken was not delivered"
    assert report.items_written == len(counted.delivered)
    assert not worker_processes()


async def test_a_stopped_stream_ends_once_every_item_taken_has_come_out() -> None:
    counted = Counted(stop_after=100)
    pipeline = Pipeline([Stage(fns.slow_identity, kind="thread", workers=4)])
    control = pipeflow.RunControl()
    with anyio.fail_after(50):
        async with pipeline.stream(counted.async_source(), control=control) as results:
            async for value in results:
                await counted.sink(value)
                if counted.enough.is_set() and not control.stopping:
                    control.stop()
    assert control.report is not None and control.report.status == "interrupted"
    assert counted.delivered == list(range(counted.taken))


async def test_a_second_stop_cancels_a_run_whose_items_cannot_finish() -> None:
    holding = anyio.Event()
    never = anyio.Event()
    cancelled: list[int] = []

    async def stuck(n: int) -> int:
        holding.set()
        try:
            await never.wait()
        except anyio.get_cancelled_exc_class():
            cancelled.append(n)
            raise
        return n

    pipeline = Pipeline([Stage(stuck, kind="async", workers=1)], sink=pipeflow.ListSink())
    control = pipeflow.RunControl()
    reports: list[pipeflow.RunReport] = []

    async def run() -> None:
        reports.append(await pipeline.run(range(1000), control=control))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await holding.wait()
            control.stop()  # drains: the held item can never finish, so the run goes on
            assert control.report is not None and control.report.status == "running"
            control.stop()
    (report,) = reports
    assert report.status == "cancelled"
    assert cancelled, "the held item was not cancelled"
    assert pipeline.sink.items == []  # type: ignore[union-attr]


async def test_a_stop_before_the_run_starts_takes_effect_as_it_starts() -> None:
    sink = pipeflow.ListSink()
    control = pipeflow.RunControl()
    control.stop()
    with anyio.fail_after(30):
        report = await Pipeline([Stage(fns.square, kind="thread")], sink=sink).run(
            range(10**9), control=control
        )
    assert report.status == "interrupted"
    assert report.items_read == len(sink.items) == 0


async def test_one_handle_serves_one_run() -> None:
    pipeline = Pipeline([Stage(fns.square, kind="thread")], sink=pipeflow.ListSink())
    control = pipeflow.RunControl()
    await pipeline.run(range(3), control=control)
    with pytest.raises(pipeflow.PipeflowError, match="serves one run"):
        await pipeline.run(range(3), control=control)
