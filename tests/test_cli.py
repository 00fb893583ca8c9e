"""The `pipeflow` command, run for real in a subprocess: output, exit codes, signals, terminal."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parent
SCRIPT = Path(sys.executable).parent / "pipeflow"
PROBLEM = re.compile(r"^broken_configs/[\w.]+\.yaml:\d+:\d+: [^:]+: .+$")
REPORT_STAGE_FIELDS = {
    "name",
    "kind",
    "workers",
    "items_in",
    "items_out",
    "errors",
    "retries",
    "skipped",
    "dead_lettered",
    "busy_s",
}


def child_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS")
    }
    env.pop("PIPEFLOW_TEST_UNSET_STOP", None)
    env.pop("PIPEFLOW_TEST_UNSET_WORKERS", None)
    return {**env, **extra}


def pipeflow(*args: str | Path, cwd: Path = TESTS, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeflow", *map(str, args)],
        cwd=cwd,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=50,
    )


@contextlib.contextmanager
def ended_on_failure(process: subprocess.Popen[str]) -> Iterator[None]:
    """Kill `process`'s whole group (started with `start_new_session`) if the block fails.

    A failing check must not leave a run and its workers behind, nor wait for them forever
    when `Popen` closes.
    """
    try:
        yield
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise


@contextlib.contextmanager
def start(*args: str | Path, **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    """`pipeflow ARGS` in its own process group, ended if the test fails."""
    with (
        subprocess.Popen(
            [sys.executable, "-m", "pipeflow", *map(str, args)],
            cwd=TESTS,
            env=child_env(),
            text=True,
            start_new_session=True,
            **kwargs,
        ) as process,
        ended_on_failure(process),
    ):
        yield process


def wait_for_line(stream: Any, needle: str) -> None:
    for line in stream:
        if needle in line:
            return
    raise AssertionError(f"{needle!r} never appeared")


# --- running ---


def test_readme_command_prints_the_squares() -> None:
    done = subprocess.run(
        [SCRIPT, "run", "configs/squares.yaml"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(f"{n * n}\n" for n in range(1, 11))
    assert "squares: ok" in done.stderr  # the summary
    assert "rate/s" not in done.stderr  # no live progress: stderr is not a terminal


def test_process_workers_import_from_the_current_dir_with_spawn_too() -> None:
    done = pipeflow(
        "run",
        "configs/squares.yaml",
        "--set",
        "stages.square.start_method=spawn",
        "--quiet",
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(n * n) for n in range(1, 11)]


def test_set_changes_the_pool_size_seen_in_the_report(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = pipeflow(
        "run",
        "configs/squares.yaml",
        "--set",
        "stages.square.workers=8",
        "--report",
        report,
        "--quiet",
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert data["stages"][0]["workers"] == 8
    assert data["status"] == "ok"


def test_report_has_the_design_fields_and_every_item_is_accounted_for(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = pipeflow(
        "run",
        "cli_configs/dead_letters.yaml",
        "--report",
        report,
        "--app-dir",
        tmp_path,
        OUT_DIR=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert data["status"] == "ok" and data["wall_s"] > 0
    assert data["items_read"] == 6 and data["items_written"] == 5
    picky, double = data["stages"]
    for stage in data["stages"]:
        assert set(stage) >= REPORT_STAGE_FIELDS
        assert stage["items_in"] == (
            stage["items_out"] + stage["skipped"] + stage["dead_lettered"] + stage["failed"]
        )
    assert (picky["items_in"], picky["dead_lettered"], picky["errors"]) == (6, 1, 1)
    assert (double["kind"], double["workers"], double["items_out"]) == ("process", 2, 5)
    assert len((tmp_path / "errors.jsonl").read_text().splitlines()) == 1


def test_a_failed_run_exits_1_naming_stage_item_error_and_worker_traceback(
    tmp_path: Path,
) -> None:
    report = tmp_path / "report.json"
    done = pipeflow("run", "cli_configs/fails.yaml", "--report", report)
    assert done.returncode == 1
    assert "error: stage 'picky', item 2 (3) failed: ValueError: three is not allowed" in (
        done.stderr
    )
    assert 'config_fns.py", line' in done.stderr  # the worker's traceback
    assert "raise ValueError" in done.stderr
    engine = ("_runner.py", "_pump.py", "_stagerun.py", "_settle.py", "_calls.py")
    for internal in (*engine, "_cli.py", "anyio", "typer"):
        assert internal not in done.stderr
    assert json.loads(report.read_text())["status"] == "failed"


def test_quiet_shows_neither_progress_nor_summary_nor_info_logs() -> None:
    done = pipeflow("run", "configs/squares.yaml", "--quiet", cwd=ROOT)
    assert done.returncode == 0
    assert done.stderr == ""


def test_json_logs() -> None:
    done = pipeflow("run", "configs/squares.yaml", "--log-format", "json", cwd=ROOT)
    assert done.returncode == 0
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert [e["event"] for e in events] == ["run_start", "run_end", "run_summary"]
    assert events[1]["status"] == "ok"


def test_app_dir_is_where_fns_are_imported_and_paths_start(tmp_path: Path) -> None:
    done = pipeflow(
        "run",
        TESTS / "cli_configs" / "dead_letters.yaml",
        "--app-dir",
        TESTS,
        "--quiet",
        cwd=tmp_path,
        OUT_DIR=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.jsonl").read_text().split() == ["2", "4", "8", "10", "12"]


def test_a_closed_stdout_ends_the_run_quietly_with_141() -> None:
    with start(
        "run", "cli_configs/many.yaml", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline() == "0\n"
        process.stdout.close()
        errors = process.stderr.read()
        assert process.wait(timeout=50) == 141
    assert "Traceback" not in errors and "BrokenPipe" not in errors


# --- signals ---


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_gracefully(tmp_path: Path, signum: int, code: int) -> None:
    report = tmp_path / "report.json"
    with start(
        "run",
        "cli_configs/slow_stdout.yaml",
        "--report",
        report,
        "--log-format",
        "json",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        process.stdout.readline()  # the first item is through: the run is under way
        process.send_signal(signum)
        _, errors = process.communicate(timeout=50)
    assert process.returncode == code, errors
    data = json.loads(report.read_text())
    assert data["status"] == "interrupted"
    assert 0 < data["items_read"] < 100
    assert data["items_written"] == data["items_read"], "items already read are finished"
    assert "Traceback" not in errors


def test_a_second_signal_cancels_at_once(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    with start(
        "run",
        "cli_configs/slow_stdout.yaml",
        "--report",
        report,
        "--log-format",
        "json",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        process.stdout.readline()  # the first item is through: the run is under way
        process.send_signal(signal.SIGINT)
        wait_for_line(process.stderr, "stopping")
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=50)
    assert process.returncode == 130, errors
    data = json.loads(report.read_text())
    assert data["status"] == "cancelled"
    assert data["items_written"] < data["items_read"]


# --- the terminal ---


def run_on_a_terminal(*args: str) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal; return the exit code and what it showed."""
    leader, follower = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeflow", *args],
        cwd=TESTS,
        env=child_env(TERM="xterm-256color"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    shown = bytearray()
    try:
        while chunk := os.read(leader, 65536):
            shown += chunk
    except OSError:  # EIO: every writer of the terminal has closed it
        pass
    finally:
        os.close(leader)
    with process:
        return process.wait(timeout=50), shown.decode(errors="replace")


def test_progress_is_shown_on_a_terminal() -> None:
    code, shown = run_on_a_terminal("run", "cli_configs/slow.yaml")
    assert code == 0
    frames = re.findall(r"slow: \d+\.\d+s, (\d+) read, (\d+) written", shown)
    assert len(frames) >= 5, shown  # redrawn several times during the 5 s run
    assert len({written for _, written in frames}) >= 3, "the counts move"
    assert "rate/s" in shown and "queue" in shown
    assert "slow: ok in" in shown  # the summary after it


def test_progress_is_not_shown_when_piped_or_quiet() -> None:
    done = pipeflow("run", "cli_configs/slow.yaml", "--set", "source.range.stop=3")
    assert done.returncode == 0
    assert "rate/s" not in done.stderr and "slow: ok in" in done.stderr
    code, shown = run_on_a_terminal(
        "run", "cli_configs/slow.yaml", "--quiet", "--set", "source.range.stop=3"
    )
    assert code == 0
    assert shown == ""


# --- config problems and usage ---


@pytest.mark.parametrize("config", sorted(p.name for p in (TESTS / "broken_configs").iterdir()))
@pytest.mark.parametrize("command", ["run", "validate", "graph"])
def test_broken_configs_exit_2_with_one_located_line_per_problem(command: str, config: str) -> None:
    done = pipeflow(command, f"broken_configs/{config}")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(PROBLEM.match(line) for line in lines), done.stderr


def test_several_problems_several_lines() -> None:
    done = pipeflow("validate", "broken_configs/wrong_type.yaml")
    assert done.returncode == 2
    assert [line.split(": ")[1] for line in done.stderr.splitlines()] == [
        "source.range.stop",
        "stages.square.workers",
        "stages.square.ordered",
    ]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["run"],
        ["nosuch"],
        ["run", "x.yaml", "--nosuch"],
        ["run", "../configs/squares.yaml", "--log-format", "xml"],
        ["graph", "../configs/squares.yaml", "--format", "png"],
        ["run", "../configs/squares.yaml", "--set", "workers"],
        ["run", "no_such_config.yaml"],
    ],
)
def test_usage_errors_exit_2_without_traceback(args: list[str]) -> None:
    done = pipeflow(*args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == "" or "Usage" in done.stdout


def test_validate_says_ok() -> None:
    done = pipeflow("validate", "configs/squares.yaml", cwd=ROOT)
    assert (done.returncode, done.stdout) == (0, "configs/squares.yaml: ok (1 stage: square)\n")


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (
            "text",
            [
                "pipeline squares",
                "source  range(1, 11)",
                "square  process x4, map",
                "queue 8",
                "sink    stdout",
            ],
        ),
        (
            "mermaid",
            [
                "flowchart LR",
                's0["square<br/>process x4, map',
                'source -->|"queue 8"| s0',
                's0 -->|"queue 8"| sink',
            ],
        ),
        (
            "dot",
            [
                'digraph "squares" {',
                's0 [label="square\\nprocess x4, map',
                'source -> s0 [label="queue 8"];',
            ],
        ),
    ],
)
def test_graph(fmt: str, expected: list[str]) -> None:
    done = pipeflow("graph", "configs/squares.yaml", "--format", fmt, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for text in expected:
        assert text in done.stdout


def test_graph_shows_overrides() -> None:
    done = pipeflow(
        "graph",
        "configs/squares.yaml",
        "--set",
        "stages.square.workers=2",
        "--set",
        "stages.square.queue_size=3",
        cwd=ROOT,
    )
    assert "square  process x2" in done.stdout and "queue 3" in done.stdout


def test_graph_shows_a_stages_rate_and_group(tmp_path: Path) -> None:
    config = tmp_path / "paced.yaml"
    config.write_text(
        """
source:
  range: {stop: 10}
stages:
  - name: fetch
    fn: fns:square
    kind: thread
    rate: {limit: 5/250ms, burst: 3}
  - name: insert
    fn: fns:group_as_one
    op: map_batch
    group: {size: 4, within: 2s, by: fns:held_by_stage}
sink:
  null: {}
"""
    )
    done = pipeflow("graph", config)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(
        line.startswith("  fetch") and line.endswith("rate 5/250ms burst 3") for line in lines
    )
    assert any(
        line.startswith("  insert") and line.endswith("group size 4 within 2s by held_by_stage")
        for line in lines
    )
    mermaid = pipeflow("graph", config, "--format", "mermaid")
    assert "rate 5/250ms burst 3" in mermaid.stdout and "group size 4" in mermaid.stdout


def test_schema_is_json_schema() -> None:
    done = pipeflow("schema")
    assert done.returncode == 0
    schema = json.loads(done.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert set(schema["required"]) == {"source", "stages", "sink"}


def test_version_and_help() -> None:
    version = pipeflow("--version")
    assert version.returncode == 0 and re.fullmatch(r"pipeflow \S+\n", version.stdout)
    helped = pipeflow("--help")
    assert helped.returncode == 0
    for command in ("run", "validate", "graph", "schema"):
        assert command in helped.stdout
    run_help = pipeflow("run", "--help")
    for option in ("--set", "--report", "--log-format", "--quiet", "--app-dir"):
        assert option in run_help.stdout


# --- output files ---


def test_a_report_in_a_folder_that_does_not_exist_creates_it(tmp_path: Path) -> None:
    report = tmp_path / "out" / "runs" / "run.json"
    done = pipeflow(
        "run",
        "configs/squares.yaml",
        "--set",
        "stages.square.kind=thread",
        "--report",
        report,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert (
        (data["status"], data["items_written"])
        == ("ok", len(done.stdout.splitlines()))
        == ("ok", 10)
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_a_report_path_that_cannot_be_a_file_is_refused_before_the_run(
    tmp_path: Path, where: str
) -> None:
    (tmp_path / "taken").write_text("")
    report = tmp_path if where == "folder" else tmp_path / "taken" / "run.json"
    done = pipeflow("run", "configs/squares.yaml", "--report", report, cwd=ROOT)
    assert done.returncode == 2
    assert done.stdout == ""  # nothing ran: the squares would be on stdout
    [line] = done.stderr.splitlines()
    assert line.startswith(f"--report {report}: ")
    assert "Traceback" not in done.stderr


def test_an_async_stage_that_blocks_the_loop_is_named_with_how_long(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = pipeflow(
        "run", "cli_configs/blocking_async.yaml", "--report", report, "--log-format", "json"
    )
    assert done.returncode == 0, done.stderr
    assert [int(line) for line in done.stdout.split()] == [0, 2, 4, 6, 8]
    stages = {stage["name"]: stage for stage in json.loads(report.read_text())["stages"]}
    hog, polite = stages["hog"], stages["polite"]
    assert hog["max_loop_block_s"] >= 0.9  # the 1 s of time.sleep
    assert hog["loop_blocked_s"] >= hog["max_loop_block_s"]
    assert polite["max_loop_block_s"] < hog["max_loop_block_s"]
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    [warning] = [e for e in events if e["event"] == "loop_blocked"]
    assert (warning["stage"], warning["level"]) == ("hog", "warning")
    assert warning["seconds"] >= 0.9
