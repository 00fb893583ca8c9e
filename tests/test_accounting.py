"""What the report counts is what the sinks hold, items run once, and memory is bounded.

Each test runs a real pipeline (process pools, files, the `pipeflow` command) and checks
what a user sees: the report's counts against the lines in the output and dead-letter
files, the exit code and the one-line error.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import accounting_fns as fns
import pipeflow
from pipeflow import JsonlSink, ListSink, Pipeline, Stage
from test_cli import child_env
from test_cli import pipeflow as pipeflow_command


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- a dead-letter record is its own item's ---


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_each_dead_letter_record_carries_its_own_items_traceback(tmp_path: Path, kind: str) -> None:
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
        # the run's counts have no event to wait on: they are polled
        while not self.until():  # noqa: ASYNC110
            await anyio.sleep(0.001)
        await super().write(values)


def dead_letter_pipeline(dead: HeldRecords, **options: Any) -> Pipeline:
    """Odd items are dead-lettered; item 100 fails the run."""
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
    return pipeline


def test_a_run_failed_by_another_stage_writes_every_dead_letter_it_counted() -> None:
    dead = HeldRecords()
    pipeline = dead_letter_pipeline(dead)
    control = pipeflow.RunControl()
    dead.until = lambda: control.report is not None and control.report.stages[1].failed == 1
    with pytest.raises(pipeflow.PipelineError, match="item 100 is fatal") as caught:
        pipeline.run_sync(control=control)
    counted = caught.value.report.stages[0].dead_lettered  # type: ignore[attr-defined]
    assert counted >= 50  # every odd item before 100 at least
    assert sorted(r["index"] for r in dead.items) == list(range(1, 2 * counted, 2))


def test_a_run_over_its_error_budget_writes_every_dead_letter_it_counted() -> None:
    dead = HeldRecords()
    pipeline = dead_letter_pipeline(dead, max_errors=30)
    control = pipeflow.RunControl()
    dead.until = lambda: control.report is not None and control.report.stages[0].dead_lettered > 30
    with pytest.raises(pipeflow.ErrorBudgetExceeded) as caught:
        pipeline.run_sync(control=control)
    counted = caught.value.report.stages[0].dead_lettered  # type: ignore[attr-defined]
    assert counted == 31
    assert sorted(r["index"] for r in dead.items) == list(range(1, 62, 2))


@pytest.mark.anyio
async def test_a_cancelled_run_writes_every_dead_letter_it_counted() -> None:
    dead = HeldRecords()
    control = pipeflow.RunControl()
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
        await pipeline.run(control=control)
    report = control.report
    assert report is not None
    assert report.status == "cancelled"
    counted = report.stages[0].dead_lettered
    assert counted >= 30
    assert sorted(r["index"] for r in dead.items) == list(range(1, 2 * counted, 2))


# --- the report counts what reached the sink; files hold whole rows ---


def test_a_sink_failing_mid_batch_is_counted_up_to_its_last_delivered_item() -> None:
    received: list[int] = []

    def take(value: int) -> None:
        if len(received) == 49:
            raise OSError("the service went away")
        received.append(value)

    pipeline = Pipeline(
        [Stage(fns.identity, kind="thread", batch=64)],
        source=range(1000),
        sink=pipeflow.CallableSink(take),
    )
    with pytest.raises(pipeflow.PipelineError, match="the service went away") as caught:
        pipeline.run_sync()
    assert caught.value.report.items_written == 49  # type: ignore[attr-defined]
    assert received == list(range(49))


def run_with_file_size_limit(config: Path, limit: int, stdout: Path) -> subprocess.Popen[str]:
    def limit_file_size() -> None:  # writes past `limit` bytes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with stdout.open("w") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeflow",
                "run",
                str(config),
                "--quiet",
                "--report",
                str(config.with_suffix(".report.json")),
            ],
            cwd=Path(__file__).parent,
            env=child_env(),
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limit_file_size,
        )


@pytest.mark.parametrize("sink", ["jsonl", "csv", "stdout"])
def test_a_file_that_fills_up_mid_write_keeps_whole_rows_and_the_report_counts_them(
    tmp_path: Path, sink: str
) -> None:
    out = tmp_path / f"out.{sink}"
    target = {"jsonl": f"jsonl: {out}", "csv": f"csv: {out}", "stdout": "stdout: {}"}[sink]
    config = tmp_path / "fills.yaml"
    config.write_text(
        "source: {range: {stop: 200000}}\n"
        "stages:\n"
        "  - {fn: accounting_fns:identity, kind: thread}\n"
        f"sink: {{{target}}}\n"
    )
    stdout = out if sink == "stdout" else tmp_path / "stdout.txt"
    with run_with_file_size_limit(config, 100_003, stdout) as process:  # mid-row
        _, errors = process.communicate(timeout=50)
    assert process.returncode == 1, errors
    assert "File too large" in errors and "Traceback" not in errors
    text = out.read_bytes().decode().replace("\r\n", "\n")  # csv ends rows with CRLF
    assert "\r" not in text
    rows = text.splitlines()
    written = json.loads(config.with_suffix(".report.json").read_text())["items_written"]
    if sink == "csv":
        assert rows[0] == "" or rows[0].isdigit()  # no header for plain values
    if sink == "stdout":  # a stream cannot be cut back: what it took whole is counted
        assert rows[:written] == [str(n) for n in range(written)]
        assert len(text.split("\n")) - 1 == written
    else:
        assert text.endswith("\n")
        assert rows == [str(n) for n in range(written)]
    assert 10_000 < written < 200_000


def test_a_csv_row_with_a_key_the_first_row_lacks_fails_naming_the_row_and_the_key(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.csv"
    config = tmp_path / "keys.yaml"
    config.write_text(
        "source: {items: [{a: 1}, {a: 2, b: 3}]}\n"
        "stages:\n"
        "  - {fn: accounting_fns:identity, kind: thread}\n"
        f"sink: {{csv: {out}}}\n"
    )
    done = pipeflow_command("run", config, "--quiet")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[0] == (
        "error: stage 'sink' failed: ValueError: csv sink: row 2 has the key 'b', which is "
        "not a column (the columns are the first row's keys: a); name every column with "
        "`fields:`"
    )
    assert out.read_text().splitlines() == ["a", "1"]


def test_a_csv_sink_with_chosen_fields_writes_those_columns_only(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    pipeline = Pipeline(
        [Stage(fns.identity)],
        source=[{"a": 1, "b": 2}, {"a": 3, "c": 4}],
        sink=pipeflow.CsvSink(out, fields=["a"]),
    )
    assert pipeline.run_sync().items_written == 2
    assert out.read_text().splitlines() == ["a", "1", "3"]


# --- the dead-letter sink through the command ---


def test_a_full_dead_letter_disk_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "full.yaml"
    config.write_text(
        "source: {range: {stop: 2000}}\n"
        "stages:\n"
        "  - {fn: accounting_fns:fail_odd, kind: thread, on_error: dead_letter}\n"
        f"sink: {{jsonl: {tmp_path}/out.jsonl}}\n"
        "dead_letter: {jsonl: /dev/full}\n"  # every write: ENOSPC
    )
    done = pipeflow_command("run", config, "--quiet")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert (
        "error: stage 'dead_letter' failed: OSError: [Errno 28] No space left on device: "
        "'/dev/full'"
    ) in lines
    assert "Traceback" not in done.stderr and "BrokenResourceError" not in done.stderr


@pytest.mark.timeout(60)
def test_ctrl_c_twice_still_writes_every_dead_letter_it_counted(tmp_path: Path) -> None:
    dead, report = tmp_path / "dead.txt", tmp_path / "report.json"
    config = tmp_path / "long.yaml"
    config.write_text(
        "source: {range: {stop: 10000000}}\n"
        "stages:\n"
        "  - {fn: accounting_fns:fail_all, kind: thread, on_error: dead_letter}\n"
        "sink: {null: {}}\n"
        "dead_letter: {fn: accounting_fns:record_slowly}\n"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeflow",
            "run",
            str(config),
            "--report",
            str(report),
            "--log-format",
            "json",
            "--quiet",
        ],
        cwd=Path(__file__).parent,
        env=child_env(ACCOUNTING_DEAD=str(dead)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stopping = threading.Event()

    def read_logs() -> None:  # a log line per failed item: the pipe must never fill
        assert process.stderr is not None
        for line in process.stderr:
            if '"stopping"' in line:
                stopping.set()

    reader = threading.Thread(target=read_logs)
    reader.start()
    try:
        while not (dead.exists() and dead.stat().st_size > 1000):  # well under way
            assert process.poll() is None, "the run ended early"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGINT)
        assert stopping.wait(20)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 130
    finally:
        if process.poll() is None:  # a failed check: end the run and what it started
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join()
        assert process.stderr is not None
        process.stderr.close()
    data = json.loads(report.read_text())
    assert data["status"] in ("cancelled", "interrupted")
    indices = [int(line) for line in dead.read_text().split()]
    assert len(indices) == data["stages"][0]["dead_lettered"]
    assert sorted(indices) == list(range(len(indices)))


# --- memory in bytes ---


@pytest.mark.timeout(180)
def test_large_items_through_a_process_stage_keep_the_parents_memory_bounded() -> None:
    # 2,000 items of 1 MiB (2 GiB in all) with the default batch: sized by time alone,
    # the batches held most of them at once (a 2.1 GiB peak); sized by bytes, the run
    # holds its queues and its calls in flight, a few MiB each.
    done = subprocess.run(
        [sys.executable, "accounting_memory.py", "2000"],
        cwd=Path(__file__).parent,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["read"] == result["written"] == 2000
    assert result["peak_mib"] < 400
