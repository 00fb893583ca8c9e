"""Ctrl-C and SIGTERM on a real `pipeflow run` with process workers and a file sink."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from test_cli import child_env, ended_on_failure, wait_for_line

TESTS = Path(__file__).parent


@contextlib.contextmanager
def start_long_run(out: Path, report: Path) -> Iterator[subprocess.Popen[str]]:
    with start_run(
        "long_process.yaml",
        "--report",
        str(report),
        "--log-format",
        "json",
        PIPEFLOW_TEST_OUT=str(out),
    ) as process:
        yield process


def wait_for_output(path: Path) -> None:
    """Until the sink has written at least one line (the run is well under way)."""
    deadline = time.monotonic() + 30
    while not (path.exists() and path.stat().st_size > 0):
        assert time.monotonic() < deadline, "the run wrote nothing"
        time.sleep(0.05)


def assert_clean_end(path: Path, children: list[psutil.Process], errors: str) -> None:
    lines = path.read_text().splitlines()
    assert lines, "nothing was written"
    for line in lines:
        json.loads(line)  # every line is complete JSON
    assert path.read_text().endswith("\n")
    _, alive = psutil.wait_procs(children, timeout=2)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
    assert "resource_tracker" not in errors and "leaked" not in errors
    assert "Traceback" not in errors


@pytest.mark.timeout(60)
def test_ctrl_c_to_the_process_group_stops_the_run_and_loses_nothing(tmp_path: Path) -> None:
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    with start_long_run(out, report) as process:
        assert process.stderr is not None
        wait_for_line(process.stderr, "run_start")
        wait_for_output(out)
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 2
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, errors = process.communicate(timeout=30)  # the whole run would take minutes
    assert process.returncode == 130, errors
    data = json.loads(report.read_text())
    assert data["status"] == "interrupted"
    assert data["items_read"] < 1_000_000  # it stopped, rather than ran to the end
    assert data["items_written"] == data["items_read"] == len(out.read_text().splitlines())
    assert_clean_end(out, children, errors)


@pytest.mark.timeout(60)
def test_a_second_signal_cancels_at_once_and_still_leaves_whole_lines(tmp_path: Path) -> None:
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    with start_long_run(out, report) as process:
        assert process.stderr is not None
        wait_for_line(process.stderr, "run_start")
        wait_for_output(out)
        children = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        wait_for_line(process.stderr, "stopping")
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 143, errors
    assert json.loads(report.read_text())["status"] in ("cancelled", "interrupted")
    assert_clean_end(out, children, errors)


@pytest.mark.timeout(60)
def test_a_thread_stuck_past_its_timeout_does_not_keep_the_command_alive() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeflow", "run", "cli_configs/hung_thread.yaml", "--quiet"],
        cwd=TESTS,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,  # the stuck thread sleeps for an hour: ending at all is the point
    )
    assert done.returncode == 0, done.stderr
    assert [int(line) for line in done.stdout.split()] == [n for n in range(20) if n != 5]
    assert "thread_abandoned" in done.stderr and "item_error" in done.stderr


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


@contextlib.contextmanager
def start_run(config: str, *args: str, **env: str) -> Iterator[subprocess.Popen[str]]:
    """`pipeflow run` of a test config in its own process group, as a shell runs a
    foreground job; the group is killed if the test fails."""
    with (
        subprocess.Popen(
            [sys.executable, "-m", "pipeflow", "run", f"cli_configs/{config}", *args],
            cwd=TESTS,
            env=child_env(**env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as process,
        ended_on_failure(process),
    ):
        yield process


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_config_loads_exits_with_its_code_and_no_traceback(
    tmp_path: Path, signum: signal.Signals
) -> None:
    marker = tmp_path / "importing"
    with start_run(
        "../signal_configs/slow_import.yaml", PIPEFLOW_TEST_MARKER=str(marker)
    ) as process:
        wait_for_file(marker)  # load() is importing the stage's module
        os.killpg(process.pid, signum)
        _, errors = process.communicate(timeout=20)
    assert process.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], errors
    assert "Traceback" not in errors and "KeyboardInterrupt" not in errors


@pytest.mark.timeout(60)
def test_ctrl_c_while_the_process_pool_starts_exits_130_and_no_traceback(tmp_path: Path) -> None:
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    with start_long_run(out, report) as process:
        assert process.stderr is not None
        wait_for_line(process.stderr, "run_start")  # logged before the pools start
        os.killpg(process.pid, signal.SIGINT)  # the forkserver, starting, gets it too
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 130, errors
    assert "Traceback" not in errors and "KeyboardInterrupt" not in errors
    data = json.loads(report.read_text())
    assert data["status"] in ("interrupted", "cancelled", "failed")
    written = out.read_text().splitlines() if out.exists() else []
    assert data["items_written"] == len(written)


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_ends_a_run_whose_thread_is_stuck_for_good(tmp_path: Path) -> None:
    out, report, marker = tmp_path / "out.jsonl", tmp_path / "report.json", tmp_path / "stuck"
    with start_run(
        "stuck_thread.yaml",
        "--report",
        str(report),
        "--log-format",
        "json",
        PIPEFLOW_TEST_OUT=str(out),
        PIPEFLOW_TEST_MARKER=str(marker),
    ) as process:
        assert process.stderr is not None
        wait_for_file(marker)  # item 5's thread is stuck, and no timeout will free it
        process.send_signal(signal.SIGINT)
        wait_for_line(process.stderr, "stopping")
        process.send_signal(signal.SIGINT)
        try:
            _, errors = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("two Ctrl-C did not end the command")
    assert process.returncode == 130, errors
    assert "Traceback" not in errors
    data = json.loads(report.read_text())
    assert data["status"] == "cancelled"
    lines = out.read_text().splitlines()
    assert out.read_text().endswith("\n")
    assert data["items_written"] == len(lines) and 5 not in [json.loads(x) for x in lines]


@pytest.mark.timeout(60)
def test_workers_end_when_the_run_is_killed_with_sigkill(tmp_path: Path) -> None:
    marker = tmp_path / "stuck"
    with start_run(
        "stuck_process.yaml",
        PIPEFLOW_TEST_OUT=str(tmp_path / "out.jsonl"),
        PIPEFLOW_TEST_MARKER=str(marker),
    ) as process:
        wait_for_file(marker)  # a worker is inside item 5, for good
        children = psutil.Process(process.pid).children(recursive=True)
        workers = [p for p in children if p.pid == int(marker.read_text())]
        assert workers and len(children) >= 3  # the forkserver and its 2 workers
        process.kill()  # as the OOM killer does: no cleanup runs in the parent
        process.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=20)
    for left in alive:  # leave no orphan behind when the check fails
        left.kill()
    assert not alive, f"outlived the run: {[p.pid for p in alive]}"


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_ends_a_run_whose_stage_holds_the_event_loop(tmp_path: Path) -> None:
    report, marker = tmp_path / "report.json", tmp_path / "holding"
    with start_run(
        "held_loop.yaml", "--report", str(report), PIPEFLOW_TEST_MARKER=str(marker)
    ) as process:
        wait_for_file(marker)  # the loop is held: nothing on it runs, the receiver included
        deadline = time.monotonic() + 30
        while process.poll() is None:  # Ctrl-C until the command ends (the first one stops)
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail("two Ctrl-C did not end the command")
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1)
        _, errors = process.communicate(timeout=10)
    assert process.returncode == 130, errors
    assert "Traceback" not in errors
    assert "did not end within 5s of the second signal" in errors
    assert json.loads(report.read_text())["status"] == "cancelled"
