"""Structured errors: each on_error policy, retries, remote tracebacks, accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fns
import pipeflow
from pipeflow import Pipeline, Retry, Stage

pytestmark = pytest.mark.anyio

KINDS = ["thread", "process"]


@pytest.mark.parametrize("kind", KINDS)
async def test_fail_names_stage_and_item_with_the_remote_traceback(kind: str) -> None:
    pipeline = Pipeline([Stage(fns.fail_on_3, kind=kind, workers=2)])  # type: ignore[arg-type]
    with pytest.raises(pipeflow.PipelineError) as caught:
        await pipeline.run(range(10))
    error = caught.value
    assert "stage 'fail_on_3'" in str(error) and "item 3 (3)" in str(error)
    assert "ZeroDivisionError: integer division or modulo by zero" in str(error)
    assert isinstance(error.__cause__, ZeroDivisionError)
    assert error.stage == "fail_on_3" and error.index == 3
    assert "fns.py" in error.traceback and "in fail_on_3" in error.traceback
    if kind == "process":
        remote = error.__cause__.__cause__
        assert isinstance(remote, pipeflow.RemoteTraceback)
        assert "in fail_on_3" in remote.tb
    report = error.report  # type: ignore[attr-defined]
    assert report.status == "failed" and report.stages[0].failed == 1


async def test_fail_in_an_async_stage_keeps_the_real_traceback() -> None:
    async def explode(n: int) -> int:
        if n == 3:
            raise KeyError("missing")
        return n

    with pytest.raises(pipeflow.PipelineError, match="item 3") as caught:
        await Pipeline([Stage(explode, kind="async")]).run(range(10))
    assert isinstance(caught.value.__cause__, KeyError)
    assert caught.value.__cause__.__traceback__ is not None


@pytest.mark.parametrize("kind", KINDS)
async def test_skip_yields_the_other_items_and_counts(kind: str) -> None:
    pipeline = Pipeline([Stage(fns.fail_on_3, kind=kind, on_error="skip")])  # type: ignore[arg-type]
    assert await pipeline.collect(range(10)) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    report = await pipeline.run(range(10))
    stage = report.stages[0]
    assert (stage.items_in, stage.items_out, stage.skipped, stage.errors) == (10, 9, 1, 1)
    assert stage.items_in == stage.items_out + stage.skipped + stage.dead_lettered


async def test_one_bad_item_never_fails_its_batch_mates() -> None:
    pipeline = Pipeline([Stage(fns.fail_on_3, kind="process", batch=10, on_error="skip")])
    report = await pipeline.run(range(10))
    assert report.stages[0].calls == 1
    assert report.stages[0].items_out == 9


async def test_retry_succeeds_when_the_second_attempt_does() -> None:
    flaky = fns.FlakyOnce({3})
    pipeline = Pipeline(
        [Stage(flaky, name="flaky", kind="thread", retries=Retry(attempts=3, backoff=0.001))]
    )
    report_results = await pipeline.collect(range(10))
    assert report_results == list(range(10))
    flaky2 = fns.FlakyOnce({3, 7})
    report = await Pipeline(
        [Stage(flaky2, name="flaky", kind="thread", retries=Retry(attempts=2, backoff=0.001))]
    ).run(range(10))
    assert report.stages[0].retries == 2 and report.stages[0].errors == 0


async def test_retry_only_on_the_listed_exception_types() -> None:
    flaky = fns.FlakyOnce({3})
    pipeline = Pipeline(
        [
            Stage(
                flaky,
                name="flaky",
                kind="thread",
                retries=Retry(attempts=3, backoff=0.001, retry_on=(ValueError,)),
            )
        ]
    )
    with pytest.raises(pipeflow.PipelineError, match="ConnectionError"):
        await pipeline.run(range(10))


async def test_retries_exhausted_reports_the_attempts() -> None:
    pipeline = Pipeline(
        [Stage(fns.fail_on_3, kind="process", retries=Retry(attempts=3, backoff=0.001))]
    )
    with pytest.raises(pipeflow.PipelineError, match="after 3 attempts") as caught:
        await pipeline.run(range(10))
    assert caught.value.attempts == 3
    assert caught.value.report.stages[0].retries == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", KINDS)
async def test_dead_letter_writes_one_record_with_the_traceback(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "errors.jsonl"
    pipeline = Pipeline(
        [Stage(fns.fail_on_3, kind=kind, on_error="dead_letter")],  # type: ignore[arg-type]
        dead_letter=pipeflow.JsonlSink(path),
    )
    assert await pipeline.collect(range(10)) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert record["stage"] == "fail_on_3" and record["index"] == 3 and record["item"] == 3
    assert record["error"] == "ZeroDivisionError" and record["attempts"] == 1
    assert "in fail_on_3" in record["traceback"]
    assert set(record) == {"stage", "index", "item", "error", "message", "traceback", "attempts"}


async def test_an_unpicklable_exception_fails_only_its_item() -> None:
    pipeline = Pipeline([Stage(_raise_unpicklable, kind="process", on_error="skip")])
    report = await pipeline.run(range(5))
    assert report.stages[0].skipped == 1 and report.stages[0].items_out == 4


def _raise_unpicklable(n: int) -> int:
    if n == 2:
        raise fns.Unpicklable(1, 2)
    return n


async def test_source_error_names_the_source() -> None:
    def broken_source():  # type: ignore[no-untyped-def]
        yield 1
        raise OSError("disk gone")

    with pytest.raises(pipeflow.PipelineError, match="stage 'source'.*OSError: disk gone"):
        await Pipeline([Stage(fns.square)]).run(broken_source())


async def test_sink_error_names_the_sink() -> None:
    class BrokenSink(pipeflow.Sink):
        async def write(self, values: list[int]) -> None:
            raise OSError("sink full")

    with pytest.raises(pipeflow.PipelineError, match="stage 'sink'.*sink full"):
        await Pipeline([Stage(fns.square)], sink=BrokenSink()).run(range(3))
