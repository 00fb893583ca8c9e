"""pipeflow's log records as an app sees them, and `--log-format json` as a tool reads it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_cli import pipeflow

# A pipeline with one skipped item: the engine logs `item_error` at warning level.
APP = """
import pipeflow

def guard(n):
    if n == 7:
        raise ValueError("seven is not allowed")
    return n

{setup}
pipeline = pipeflow.Pipeline(
    [pipeflow.Stage(guard, kind="thread", on_error="skip")], source=range(10)
)
report = pipeline.run_sync()
print(report.stage("guard").skipped)
"""


def run_app(tmp_path: Path, setup: str = "") -> subprocess.CompletedProcess[str]:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(APP).format(setup=setup))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=50, cwd=tmp_path
    )


def test_an_app_without_logging_configured_sees_nothing_on_stderr(tmp_path: Path) -> None:
    done = run_app(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1\n"
    assert done.stderr == ""


def test_an_app_with_logging_configured_gets_readable_lines(tmp_path: Path) -> None:
    done = run_app(
        tmp_path, 'import logging\nlogging.basicConfig(format="%(levelname)s %(name)s %(message)s")'
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines == [line for line in lines if "{" not in line], "no dict repr"
    (line,) = [line for line in lines if "item_error" in line]
    assert line.startswith("WARNING pipeflow item_error stage=guard index=7 item=7 ")
    assert "error=ValueError message='seven is not allowed'" in line


def test_configure_logging_renders_events_as_json_in_an_app(tmp_path: Path) -> None:
    done = run_app(tmp_path, 'pipeflow.configure_logging("json")')
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert [e["event"] for e in events] == ["run_start", "item_error", "run_end"]
    assert events[1]["level"] == "warning" and events[1]["index"] == 7
    assert events[1]["message"] == "seven is not allowed"


def json_lines(stderr: str) -> list[dict[str, object]]:
    """Every line of `stderr` as a JSON object (fails on any other line)."""
    assert stderr.endswith("\n")
    return [json.loads(line) for line in stderr.splitlines()]


def test_json_stderr_of_a_run_is_json_lines_with_the_summary(tmp_path: Path) -> None:
    done = pipeflow(
        "run", "cli_configs/dead_letters.yaml", "--log-format", "json", OUT_DIR=str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    events = json_lines(done.stderr)
    assert [e["event"] for e in events][-2:] == ["run_end", "run_summary"]
    report = events[-1]["report"]
    assert isinstance(report, dict)
    assert report["status"] == "ok"
    assert {stage["name"]: stage["dead_lettered"] for stage in report["stages"]}["picky"] == 1


def test_json_stderr_of_a_failed_run_is_json_lines_with_the_failure() -> None:
    done = pipeflow("run", "cli_configs/fails.yaml", "--log-format", "json")
    assert done.returncode == 1
    events = json_lines(done.stderr)
    (failed,) = [e for e in events if e["event"] == "run_failed"]
    assert failed["stage"] == "picky" and failed["index"] == 2
    assert failed["error"] == "ValueError" and failed["message"] == "three is not allowed (got 3)"
    assert "raise ValueError" in str(failed["traceback"])
    assert events[-1]["event"] == "run_summary"


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["broken_configs/unknown_key.yaml"], "broken_configs/unknown_key.yaml:"),
        (["no_such_file.yaml"], "no_such_file.yaml:"),
        (["cli_configs/fails.yaml", "--set", "workers"], "--set workers:"),
    ],
)
def test_json_stderr_of_a_bad_config_is_json_lines(args: list[str], start: str) -> None:
    done = pipeflow("run", *args, "--log-format", "json")
    assert done.returncode == 2
    events = json_lines(done.stderr)
    assert events and all(e["event"] == "config_error" for e in events)
    assert all(str(e["problem"]).startswith(start) for e in events)


def test_json_quiet_keeps_the_failure_only() -> None:
    done = pipeflow("run", "cli_configs/fails.yaml", "--log-format", "json", "--quiet")
    assert done.returncode == 1
    assert [e["event"] for e in json_lines(done.stderr)] == ["item_error", "run_failed"]
