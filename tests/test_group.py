"""Groups (`group:` of a map_batch stage): calls of exactly N items, or of what arrived
within a time, optionally per key, whatever the pace of the source.

A slow source is an async generator that yields its next item only once the stage holds
the one before (events, not sleeps): without groups, every call would hold one item.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

import fns
import pipeflow
from pipeflow import Group, Pipeline, Stage
from test_cli import pipeflow as run_command

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


class Calls:
    """A map_batch function that keeps the group of each call."""

    def __init__(self) -> None:
        self.groups: list[list[Any]] = []

    def __call__(self, items: list[Any]) -> list[Any]:
        self.groups.append(list(items))
        return items


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["thread", "async"])
async def test_groups_hold_exactly_size_items_while_the_source_is_slow(kind: str) -> None:
    calls = Calls()
    fn: Any = calls
    if kind == "async":

        async def fn(items: list[Any]) -> list[Any]:
            return calls(items)

    group = Group(size=4, by=fns.held_by_stage)
    pipeline = Pipeline([Stage(fn, name="insert", kind=kind, op="map_batch", group=group)])
    pipeline.sink = pipeflow.ListSink()
    with anyio.fail_after(30):
        report = await pipeline.run(fns.stepped(10))
    assert calls.groups == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert pipeline.sink.items == list(range(10))
    stage = report.stage("insert")
    assert (stage.items_in, stage.items_out, stage.calls) == (10, 10, 3)


def test_the_command_makes_groups_of_size_from_a_slow_source(tmp_path: Path) -> None:
    config = tmp_path / "grouped.yaml"
    config.write_text(
        f"""
source:
  fn: {{fn: "fns:stepped", args: [10]}}
stages:
  - name: insert
    fn: fns:group_as_one
    kind: process
    op: map_batch
    group: {{size: 4, within: 60m, by: fns:held_by_stage}}
sink:
  jsonl: {tmp_path / "out.jsonl"}
"""
    )
    done = run_command("run", config, "--report", tmp_path / "report.json")
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    stage = json.loads((tmp_path / "report.json").read_text())["stages"][0]
    assert (stage["items_in"], stage["items_out"], stage["errors"]) == (10, 3, 0)


@pytest.mark.anyio
async def test_a_group_leaves_when_its_oldest_item_has_waited_within() -> None:
    calls = Calls()
    called = asyncio.Event()

    async def insert(items: list[int]) -> list[int]:
        called.set()
        return calls(items)

    async def source() -> Any:
        yield 0
        await called.wait()  # the group is not full: only `within` can send it
        for item in range(1, 8):
            yield item

    stage = Stage(insert, op="map_batch", group=Group(size=5, within=0.2))
    with anyio.fail_after(30):
        await Pipeline([stage], sink=pipeflow.ListSink()).run(source())
    assert calls.groups[0] == [0]
    assert all(1 <= len(group) <= 5 for group in calls.groups)
    assert [item for group in calls.groups for item in group] == list(range(8))


@pytest.mark.anyio
async def test_a_full_group_does_not_wait_for_within() -> None:
    calls = Calls()
    called = asyncio.Event()

    async def insert(items: list[int]) -> list[int]:
        called.set()
        return calls(items)

    async def source() -> Any:
        for item in range(3):
            yield item
        await called.wait()  # a full group leaves at once, an hour before its `within`
        yield 3

    stage = Stage(insert, op="map_batch", group=Group(size=3, within=3600))
    with anyio.fail_after(30):
        await Pipeline([stage], sink=pipeflow.ListSink()).run(source())
    assert calls.groups == [[0, 1, 2], [3]]


def test_groups_by_key_leave_as_they_fill_then_oldest_first() -> None:
    calls = Calls()
    stage = Stage(calls, name="insert", op="map_batch", group=Group(size=3, by=lambda n: n % 2))
    pipeline = Pipeline([stage], sink=pipeflow.ListSink())
    report = pipeline.run_sync(range(10))
    assert calls.groups == [[0, 2, 4], [1, 3, 5], [6, 8], [7, 9]]
    assert pipeline.sink.items == [0, 2, 4, 1, 3, 5, 6, 8, 7, 9]  # in the order groups left
    assert (report.stage("insert").items_in, report.stage("insert").items_out) == (10, 10)


def test_a_new_key_beyond_max_keys_sends_the_oldest_group_first() -> None:
    calls = Calls()
    group = Group(size=10, by=lambda n: n % 3, max_keys=2)
    Pipeline([Stage(calls, op="map_batch", group=group)]).run_sync(range(6))
    assert calls.groups == [[0], [1], [2], [3], [4], [5]]


def test_a_failing_group_dead_letters_each_of_its_items(tmp_path: Path) -> None:
    config = tmp_path / "grouped.yaml"
    config.write_text(
        f"""
source:
  range: {{stop: 10}}
stages:
  - name: insert
    fn: fns:fail_group_with_5
    kind: thread
    op: map_batch
    group: 4
    on_error: dead_letter
sink:
  jsonl: {tmp_path / "out.jsonl"}
dead_letter:
  jsonl: {tmp_path / "dead.jsonl"}
"""
    )
    done = run_command("run", config, "--report", tmp_path / "report.json")
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out == [0, 1, 2, 3, 8, 9]
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert [(record["item"], record["error"]) for record in dead] == [
        (4, "ValueError"),
        (5, "ValueError"),
        (6, "ValueError"),
        (7, "ValueError"),
    ]
    stage = json.loads((tmp_path / "report.json").read_text())["stages"][0]
    assert (stage["items_in"], stage["items_out"], stage["dead_lettered"]) == (10, 6, 4)


def test_a_key_function_that_raises_fails_the_run_naming_the_item() -> None:
    def key(item: int) -> int:
        return 1 // (item - 3)

    stage = Stage(Calls(), name="insert", op="map_batch", group=Group(size=2, by=key))
    with pytest.raises(pipeflow.PipelineError) as caught:
        Pipeline([stage]).run_sync(range(6))
    assert (caught.value.stage, caught.value.index, caught.value.error_type) == (
        "insert",
        3,
        "ZeroDivisionError",
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"group": 3}, "stage 'abs': group applies to op: map_batch"),
        ({"op": "map_batch", "batch": 5, "group": 3}, "stage 'abs': give batch or group"),
        ({"op": "map_batch", "group": 0}, "stage 'abs': group size must be an int from 1"),
        ({"op": "map_batch", "group": "3"}, "stage 'abs': group must be a Group or an int"),
    ],
)
def test_a_bad_group_is_a_config_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(pipeflow.ConfigError) as caught:
        Stage(abs, **options)
    assert str(caught.value).startswith(message)


def test_a_group_needs_a_size_or_within() -> None:
    with pytest.raises(pipeflow.ConfigError, match="a group needs a size, a within, or both"):
        Group(by=abs)


def test_validate_shows_each_bad_group_at_its_line(tmp_path: Path) -> None:
    config = tmp_path / "bad_group.yaml"
    config.write_text(
        """source: {range: {stop: 5}}
stages:
  - fn: builtins:list
    op: map_batch
    group: {size: 0, within: 5 sec}
  - name: b
    fn: builtins:abs
    group: 3
  - name: c
    fn: builtins:list
    op: map_batch
    group: {within: 1s, by: nowhere:key}
sink: {null: {}}
"""
    )
    done = run_command("validate", config)
    assert done.returncode == 2
    assert [line.split(": ", 1)[0].rsplit(":", 2)[1:] for line in done.stderr.splitlines()] == [
        ["5", "19"],
        ["5", "30"],
        ["8", "12"],
        ["12", "29"],
    ]
    assert done.stderr.splitlines()[2].endswith(
        "stages.b.group: group applies to op: map_batch (fn takes the group as a list), not map"
    )
    assert "cannot import nowhere:key" in done.stderr.splitlines()[3]
    assert "Traceback" not in done.stderr


def test_the_schema_describes_group() -> None:
    group = pipeflow.schema()["$defs"]["StageSpec"]["properties"]["group"]
    assert {"$ref": "#/$defs/GroupSpec"} in group["anyOf"]
