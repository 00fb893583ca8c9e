"""What `pipeflow` draws on an 80-column terminal: whole tables, and a bar when the length
of the source is known."""

from __future__ import annotations

import io
import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import pipeflow
from pipeflow._cli.console import LiveProgress, print_summary
from pipeflow._report import RunReport, StageReport
from pipeflow._sources import FileSource, text_lines
from test_cli import ROOT, child_env, run_on_a_terminal

# a report whose names, figures and error counts all ask for room
WIDE = RunReport(
    name="producer_consumer",
    status="ok",
    wall_s=12.3456,
    items_read=1_000_000,
    items_written=999_990,
    stages=[
        StageReport(
            name="producer_stage",
            kind="process",
            workers=16,
            items_in=1_000_000,
            items_out=999_970,
            errors=30,
            retries=20,
            skipped=10,
            dead_lettered=20,
            busy_s=1234.5,
        ),
        StageReport(name="consume", kind="thread", workers=4, items_in=999_970, items_out=999_970),
    ],
)


def assert_fits_80_columns(text: str) -> None:
    assert text.strip()
    assert "…" not in text, text
    for line in text.splitlines():
        assert len(line.rstrip()) <= 80, line


def run_80_columns(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeflow", *args],
        cwd=ROOT,
        env=child_env(COLUMNS="80"),
        capture_output=True,
        text=True,
        timeout=50,
    )


def test_the_summary_fits_80_columns_with_every_figure_whole() -> None:
    console = Console(width=80, record=True, file=io.StringIO())
    print_summary(console, WIDE)
    shown = console.export_text()
    assert_fits_80_columns(shown)
    for figure in ("1000000", "999970", "30", "20", "10", "100%"):
        assert re.search(rf"(?<!\d){figure}(?!\d)", shown), figure
    assert "producer" in shown and "process" in shown


def test_the_summary_keeps_every_column_when_wide() -> None:
    console = Console(width=120, record=True, file=io.StringIO())
    print_summary(console, WIDE)
    shown = console.export_text()
    for header in ("errors", "retries", "skipped", "dead", "busy s", "util", "1234.50"):
        assert header in shown


def test_the_command_summary_fits_80_columns() -> None:
    done = run_80_columns("run", "configs/errors_skip.yaml")
    assert done.returncode == 0, done.stderr
    summary = done.stderr[done.stderr.index("errors_skip: ok in") :]
    assert_fits_80_columns(summary)
    assert "skip" in summary


@pytest.mark.slow
def test_the_bench_tables_fit_80_columns() -> None:
    done = run_80_columns(
        "bench",
        "configs/squares.yaml",
        "--matrix",
        "stages.square.workers=1,2",
        "--matrix",
        "stages.square.kind=thread,process",
        "--repeat",
        "1",
        "--warmup",
        "0",
    )
    assert done.returncode == 0, done.stderr
    tables = done.stdout[: done.stdout.index("Recommendation")]
    assert_fits_80_columns(tables)
    for header in ("items/s", "pickling", "slowest", "RSS MB", "bytes", "calls", "blocked"):
        assert header in tables
    assert tables.count("kind=process") >= 2  # every table names its rows


def test_the_live_display_shows_a_bar_a_percentage_and_an_eta() -> None:
    console = Console(width=80, record=True, file=io.StringIO())
    progress = LiveProgress(console, total=2_000_000)
    progress.render(WIDE)
    WIDE.stages[0].items_out += 30
    console.print(progress.render(WIDE))
    WIDE.stages[0].items_out -= 30
    shown = console.export_text()
    assert_fits_80_columns(shown)
    assert re.search(r"━+.* 50% 1000030/2000000 ETA \d+:\d\d:\d\d", shown), shown


def test_no_bar_when_the_length_is_unknown() -> None:
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(LiveProgress(console, total=None).render(WIDE))
    assert "ETA" not in console.export_text()


def test_a_file_source_knows_its_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = tmp_path / "words.txt"
    path.write_text("alpha\nbeta\ngamma")  # no newline at the end
    assert operator.length_hint(FileSource(text_lines, path)) == 3
    (tmp_path / "table.csv").write_text("a,b\n1,2\n3,4\n")
    config = tmp_path / "config.yaml"
    config.write_text("source: {csv: table.csv}\nstages: [{fn: builtins:len}]\nsink: {null: {}}\n")
    pipeline = pipeflow.load(config, app_dir=tmp_path)
    assert operator.length_hint(pipeline.source) == 2
    assert pipeline.run_sync().items_read == 2


def test_the_command_shows_the_bar_on_a_terminal() -> None:
    code, shown = run_on_a_terminal("run", "cli_configs/slow.yaml", "--set", "source.range.stop=40")
    assert code == 0
    assert re.search(r"\d+% \d+/40 ETA", shown), shown
