"""Rate limits (`rate:`): calls of a stage's function start no faster than its rate.

A loaded machine can delay a call, never make it early: so each test checks a lower bound
on the start times that the design guarantees, never an upper bound on time. A call's
start time is taken once its item has reached the stage, after the source yielded it, and
the slots of one stage are spaced `per / calls` apart (`burst` may share one instant):
so among the items yielded at `x` or later, at most `burst + (t - x) // interval` can
have started by `t`.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import pipeflow
from test_cli import pipeflow as run_command

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


def too_fast(items: list[dict[str, int]], calls: float, per: float, burst: int) -> list[str]:
    """Each (x, t) where more items yielded at x or later started by t than the rate allows."""
    interval = math.ceil(per * 1e9 / calls)
    found = []
    for x in sorted({item["yielded"] for item in items}):
        starts = sorted(item["started"] for item in items if item["yielded"] >= x)
        for count, t in enumerate(starts, 1):
            allowed = burst + (t - x) // interval
            if count > allowed:
                found.append(f"{count} started in {(t - x) / 1e6:.1f} ms, at most {allowed}")
    return found


def write_config(tmp_path: Path, kind: str, rate: str, count: int) -> Path:
    config = tmp_path / "rated.yaml"
    config.write_text(
        f"""
source:
  fn: {{fn: "fns:stamped", args: [{count}]}}
stages:
  - name: call_api
    fn: fns:stamp_start
    kind: {kind}
    workers: 4
    rate: {rate}
sink:
  jsonl: {tmp_path / "out.jsonl"}
"""
    )
    return config


@pytest.mark.parametrize("kind", ["thread", "process"])
@pytest.mark.parametrize("burst", [1, 5])
def test_the_command_starts_no_more_calls_than_the_rate_allows(
    tmp_path: Path, kind: str, burst: int
) -> None:
    config = write_config(tmp_path, kind, f"{{limit: 50/s, burst: {burst}}}", 100)
    done = run_command("run", config, "--report", tmp_path / "report.json")
    assert done.returncode == 0, done.stderr
    items = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [item["i"] for item in items] == list(range(100))
    assert too_fast(items, 50, 1.0, burst) == []
    stage = json.loads((tmp_path / "report.json").read_text())["stages"][0]
    assert (stage["items_in"], stage["items_out"], stage["errors"]) == (100, 100, 0)


def test_the_check_finds_a_stage_without_a_rate(tmp_path: Path) -> None:
    # the same run without `rate:` breaks the bound at once: the check above can fail
    done = run_command("run", write_config(tmp_path, "thread", "null", 100))
    assert done.returncode == 0, done.stderr
    items = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert too_fast(items, 50, 1.0, 1) != []


class FailsFirst:
    """Fails each item's first call; keeps the start time (ns) of every call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[int, list[int]] = {}

    def __call__(self, item: int) -> int:
        started = time.time_ns()
        with self.lock:
            self.calls.setdefault(item, []).append(started)
            first = len(self.calls[item]) == 1
        if first:
            raise ConnectionError("try again")
        return item


def test_retries_take_their_own_start_times() -> None:
    fn = FailsFirst()
    stage = pipeflow.Stage(
        fn,
        kind="thread",
        workers=4,
        rate=pipeflow.Rate(50, per=1.0),
        retries=pipeflow.Retry(attempts=2, backoff=0.0, jitter=False),
    )
    before = time.time_ns()
    report = pipeflow.Pipeline([stage]).run_sync(range(20))
    assert report.stage("FailsFirst").retries == 20
    calls = [
        {"yielded": before, "started": started}
        for starts in fn.calls.values()
        for started in starts
    ]
    assert len(calls) == 40
    assert too_fast(calls, 50, 1.0, 1) == []


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_an_items_timeout_counts_from_its_start_time(kind: str) -> None:
    # 8 items at 10/s wait up to 0.7 s for their start, and 4 calls in flight hold
    # start times up to 0.4 s ahead: far past their 0.1 s timeout
    stage = pipeflow.Stage(abs, kind=kind, workers=4, rate="10/s", timeout=0.1)
    pipeline = pipeflow.Pipeline([stage], sink=pipeflow.ListSink())
    report = pipeline.run_sync(range(8))
    assert (report.status, report.stage("abs").timed_out) == ("ok", 0)
    assert sorted(pipeline.sink.items) == list(range(8))


@pytest.mark.parametrize(
    ("rate", "message"),
    [
        ("10/sec", "stage 'abs': bad rate '10/sec': write calls/period, e.g. 10/s"),
        ("0/s", "stage 'abs': bad rate '0/s': the calls and the period must be positive"),
        (10, "stage 'abs': rate must be a Rate or a text such as '10/s', got 10"),
    ],
)
def test_a_bad_rate_is_a_config_error(rate: Any, message: str) -> None:
    with pytest.raises(pipeflow.ConfigError) as caught:
        pipeflow.Stage(abs, rate=rate)
    assert str(caught.value).startswith(message)


def test_a_rate_parses_its_text() -> None:
    assert pipeflow.Rate.parse("100/min") == pipeflow.Rate(100, per=60.0)
    assert pipeflow.Rate.parse("5/250ms", burst=3) == pipeflow.Rate(5, per=0.25, burst=3)
    with pytest.raises(pipeflow.ConfigError, match="rate burst must be an int from 1"):
        pipeflow.Rate(10, burst=0)


def test_validate_shows_each_bad_rate_at_its_line(tmp_path: Path) -> None:
    config = tmp_path / "bad_rate.yaml"
    config.write_text(
        """source: {range: {stop: 5}}
stages:
  - fn: builtins:abs
    rate: 10/sec
  - name: b
    fn: builtins:abs
    rate: {limit: 5/s, burst: 0}
sink: {null: {}}
"""
    )
    done = run_command("validate", config)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"{config}:4:11: stages.abs.rate.limit: bad rate '10/sec': write calls/period, "
        "e.g. 10/s, 100/min or 5/250ms",
        f"{config}:7:31: stages.b.rate.burst: input should be greater than 0, got 0",
    ]
    assert "Traceback" not in done.stderr


def test_the_schema_describes_rate() -> None:
    rate = pipeflow.schema()["$defs"]["StageSpec"]["properties"]["rate"]
    assert {"$ref": "#/$defs/RateSpec"} in rate["anyOf"]


@pytest.mark.parametrize("where", ["lent process pool", "dask"])
def test_a_lent_pool_and_dask_keep_the_rate(where: str) -> None:
    import fns

    options: dict[str, Any]
    if where == "dask":
        pytest.importorskip("distributed", reason="the dask extra is not installed")
        options = {"kind": "dask", "workers": 2}
    else:
        pool = concurrent.futures.ProcessPoolExecutor(2)
        options = {"executor": pool}
    try:
        stage = pipeflow.Stage(fns.stamp_start, rate=pipeflow.Rate(50, burst=3), **options)
        pipeline = pipeflow.Pipeline([stage], sink=pipeflow.ListSink())
        report = pipeline.run_sync(fns.stamped(60))
    finally:
        if where != "dask":
            pool.shutdown()
    assert report.stage("stamp_start").items_out == 60
    items = pipeline.sink.items
    assert sorted(item["i"] for item in items) == list(range(60))
    assert too_fast(items, 50, 1.0, 3) == []


def test_an_async_stage_keeps_the_rate() -> None:
    import fns

    async def stamp_start(item: dict[str, int]) -> dict[str, int]:
        return {**item, "started": time.time_ns()}

    stage = pipeflow.Stage(stamp_start, rate=pipeflow.Rate(50, burst=2))
    pipeline = pipeflow.Pipeline([stage], sink=pipeflow.ListSink())
    report = pipeline.run_sync(fns.stamped(40))
    assert report.stage("stamp_start").items_out == 40
    assert too_fast(pipeline.sink.items, 50, 1.0, 2) == []
