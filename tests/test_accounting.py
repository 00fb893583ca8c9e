"""What the report counts is what the sinks hold, items run once, and memory is bounded.

Each test runs a real pipeline (process pools, files, the `pipeflow` command) and checks
what a user sees: the report's counts against the lines in the output and dead-letter
files, the exit code and the one-line error.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import accounting_fns as fns
import pipeflow
from pipeflow import JsonlSink, ListSink, Pipeline, Stage
from test_cli import pipeflow as pipeflow_command


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- a dead-letter record is its own item's ---


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_each_dead_letter_record_carries_its_own_items_traceback(
    tmp_path: Path, kind: str
) -> None:
    dead = tmp_path / "dead.jsonl"
    pipeline = Pipeline(
        [Stage(fns.fail_on_0_and_1, kind=kind, workers=1, batch=10, on_error="dead_letter")],
        source=range(10),
        sink=ListSink(),
        dead_letter=JsonlSink(dead),
    )
    report = pipeline.run_sync()
    assert report.stages[0].dead_lettered == 2
    by_index = {r["index"]: r for r in records(dead)}
    assert sorted(by_index) == [0, 1]
    assert "ValueError: bad item 0" in str(by_index[0]["traceback"])
    assert "ValueError: bad item 1" in str(by_index[1]["traceback"])
    assert "bad item 0" not in str(by_index[1]["traceback"])
    assert "During handling" not in str(by_index[1]["traceback"])


# --- an unpicklable result fails its own item only ---


def test_an_unpicklable_result_fails_its_item_and_runs_no_item_twice(tmp_path: Path) -> None:
    log, dead = tmp_path / "calls.txt", tmp_path / "dead.jsonl"
    log.touch()
    sink = ListSink()
    pipeline = Pipeline(
        [
            Stage(
                functools.partial(fns.lock_for_3_logging_calls, path=str(log)),
                kind="process",
                workers=2,
                batch=10,
                on_error="dead_letter",
            )
        ],
        source=range(10),
        sink=sink,
        dead_letter=JsonlSink(dead),
    )
    report = pipeline.run_sync()
    calls = sorted(int(line) for line in log.read_text().split())
    assert calls == list(range(10))  # each item ran once: no chunk was run again
    assert sorted(sink.items) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    (record,) = records(dead)
    assert record["index"] == 3
    assert "cannot be pickled" in str(record["message"])
    assert report.stages[0].dead_lettered == 1 and report.items_written == 9


# --- a dead-letter file of its own ---


def test_a_dead_letter_file_that_is_the_sinks_own_is_refused_by_the_api(tmp_path: Path) -> None:
    with pytest.raises(pipeflow.ConfigError, match="the sink's own file"):
        Pipeline(
            [Stage(fns.fail_odd, on_error="dead_letter")],
            sink=JsonlSink(tmp_path / "out.jsonl"),
            dead_letter=JsonlSink(tmp_path / "sub" / ".." / "out.jsonl"),
        )


def test_a_dead_letter_file_that_is_the_sinks_own_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "same.yaml"
    config.write_text(
        "source: {range: {stop: 5}}\n"
        "stages:\n"
        "  - {fn: accounting_fns:fail_odd, on_error: dead_letter}\n"
        f"sink: {{jsonl: {tmp_path}/out.jsonl}}\n"
        "dead_letter:\n"
        f"  jsonl: {tmp_path}/./out.jsonl\n"
    )
    done = pipeflow_command("run", config)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"{config}:6:3: dead_letter: writes to the sink's own file {tmp_path}/out.jsonl, "
        "which would mix results and dead-letter records in one file; give it a file of its own"
    ]
    assert not (tmp_path / "out.jsonl").exists()


# --- every dead-letter record counted is written ---


class HeldRecords(ListSink):
    """A dead-letter sink whose first write waits until `until()` holds: the records
    counted meanwhile wait in the run's queue when the run ends."""

    def __init__(self) -> None:
        super().__init__()
        self.until: Callable[[], bool] = lambda: True

    async def write(self, values: list[Any]) -> None:
        while not self.until():  # a wait on the run's own counts
            await anyio.sleep(0.001)
        await super().write(values)


def dead_letter_pipeline(dead: HeldRecords, **options: Any) -> tuple[Pipeline, list[Any]]:
    """Odd items are dead-lettered; item 100 fails the run; the runner lands in the list."""
    pipeline = Pipeline(
        [
            Stage(fns.fail_odd, kind="thread", workers=2, batch=8, on_error="dead_letter"),
            Stage(functools.partial(fns.fail_at, at=100), kind="thread", batch=8),
        ],
        source=range(2000),
        sink=ListSink(),
        dead_letter=dead,
        **options,
    )
    return pipeline, []


def test_a_run_failed_by_another_stage_writes_every_dead_letter_it_counted() -> None:
    dead = HeldRecords()
    pipeline, runners = dead_letter_pipeline(dead)
    dead.until = lambda: runners[0].report.stages[1].failed == 1
    with pytest.raises(pipeflow.PipelineError, match="item 100 is fatal") as caught:
        pipeline.run_sync(runner_ready=runners.append)
    counted = caught.value.report.stages[0].dead_lettered  # type: ignore[attr-defined]
    assert counted >= 50  # every odd item before 100 at least
    assert sorted(r["index"] for r in dead.items) == list(range(1, 2 * counted, 2))


def test_a_run_over_its_error_budget_writes_every_dead_letter_it_counted() -> None:
    dead = HeldRecords()
    pipeline, runners = dead_letter_pipeline(dead, max_errors=30)
    dead.until = lambda: runners[0].report.stages[0].dead_lettered > 30
    with pytest.raises(pipeflow.ErrorBudgetExceeded) as caught:
        pipeline.run_sync(runner_ready=runners.append)
    counted = caught.value.report.stages[0].dead_lettered  # type: ignore[attr-defined]
    assert counted == 31
    assert sorted(r["index"] for r in dead.items) == list(range(1, 62, 2))


@pytest.mark.anyio
async def test_a_cancelled_run_writes_every_dead_letter_it_counted() -> None:
    dead = HeldRecords()
    runners: list[Any] = []
    results = 0

    async def cancel_after_40(_: Any) -> None:
        nonlocal results
        results += 1
        if results == 40:
            scope.cancel()

    dead.until = lambda: scope.cancel_called
    pipeline = Pipeline(
        [Stage(fns.fail_odd, kind="thread", workers=2, batch=8, on_error="dead_letter")],
        source=range(100_000),
        sink=pipeflow.CallableSink(cancel_after_40),
        dead_letter=dead,
    )
    with anyio.CancelScope() as scope:
        await pipeline.run(runner_ready=runners.append)
    report = runners[0].report
    assert report.status == "cancelled"
    counted = report.stages[0].dead_lettered
    assert counted >= 30
    assert sorted(r["index"] for r in dead.items) == list(range(1, 2 * counted, 2))


