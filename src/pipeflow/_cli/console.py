"""What `pipeflow run` shows on stderr: live progress, the summary table, a failure."""

from __future__ import annotations

import datetime
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .._errors import PipeflowError, PipelineError
from .._log import logger
from .._report import RunReport, StageReport

__all__ = ["LiveProgress", "log_failure", "log_summary", "print_failure", "print_summary"]

# Rates are measured over this many recent progress updates (about 5 a second).
_RATE_WINDOW = 10
# The width the summary needs with every column; narrower, the all-zero counts go.
_SUMMARY_WIDTH = 100


def _workers(stage: StageReport) -> str:
    """`thread x4`, or `thread x4 auto` while `workers: auto` tunes it."""
    return f"{stage.kind} x{stage.workers}" + (" auto" if stage.workers_auto else "")


def _done(stage: StageReport) -> int:
    return stage.items_out + stage.skipped + stage.dead_lettered + stage.failed + stage.filtered_out


class LiveProgress:
    """A table redrawn from the live report each time the run calls `update`.

    Use as a context manager around the run; while it is open, writes to `sys.stderr` (log
    lines) are printed above the table instead of tearing it.

    Args:
        console: The stderr console to draw on.
        total: How many items the source holds, when known: a bar, a percentage and an
            estimate of the time left are shown above the table.
    """

    def __init__(self, console: Console, total: int | None = None) -> None:
        self.console = console
        self.total = total if total else None
        self.live = Live(console=console, auto_refresh=False, transient=True, redirect_stderr=True)
        self.started = time.perf_counter()
        self.history: dict[str, deque[tuple[float, int]]] = {}

    def __enter__(self) -> LiveProgress:
        self.live.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.live.__exit__(*exc_info)

    def update(self, report: RunReport) -> None:
        """Redraw from `report` (the run's progress callback)."""
        self.live.update(self.render(report), refresh=True)

    def _rate(self, name: str, done: int, now: float) -> float:
        points = self.history.setdefault(name, deque(maxlen=_RATE_WINDOW))
        points.append((now, done))
        (first_t, first_n), (last_t, last_n) = points[0], points[-1]
        return (last_n - first_n) / (last_t - first_t) if last_t > first_t else 0.0

    def render(self, report: RunReport) -> Group:
        """The progress table for one moment of the run."""
        now = time.perf_counter()
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("stage", "kind", "done", "rate/s", "queue", "errors"):
            table.add_column(
                column,
                justify="left" if column in ("stage", "kind") else "right",
                overflow="fold",
            )
        for stage in report.stages:
            fill = f"{stage.queue_high_water}/{stage.queue_size}" if stage.queue_size else "-"
            errors = Text(str(stage.errors), style="red" if stage.errors else "")
            table.add_row(
                stage.name,
                _workers(stage),
                f"{_done(stage)}/{stage.items_in}",
                f"{self._rate(stage.name, _done(stage), now):,.0f}",
                fill,
                errors,
            )
        elapsed = now - self.started
        head = Text(
            f"{report.name}: {elapsed:.1f}s, {report.items_read} read, "
            f"{report.items_written} written",
            style="bold",
        )
        if self.total is None or not report.stages:
            return Group(head, table)
        return Group(head, self._bar(report, now), table)

    def _bar(self, report: RunReport, now: float) -> Table:
        assert self.total is not None
        # the source's items that the first stage is done with: the queues after it are
        # bounded, so the last stage is never far behind
        done = min(_done(report.stages[0]), self.total)
        rate = self._rate("", done, now)
        left = (self.total - done) / rate if rate > 0 else None
        eta = "-:--:--" if left is None else str(datetime.timedelta(seconds=round(left)))
        bar = Table.grid(padding=(0, 1))
        bar.add_column(ratio=1)
        bar.add_column(justify="right")
        bar.add_row(
            ProgressBar(total=self.total, completed=done),
            f"{done / self.total:4.0%} {done}/{self.total} ETA {eta}",
        )
        return bar


def print_summary(console: Console, report: RunReport) -> None:
    """The table of what each stage did, under a line with the run's outcome.

    When the console is narrower than the whole table, headers are shorter, busy seconds
    (`util` says it too) and the error columns whose counts are all 0 are left out, and
    long names wrap: nothing is cut.
    """
    style = {"ok": "green", "failed": "red"}.get(report.status, "yellow")
    # the outcome is a line of its own, as wide as the console, not the table
    console.print(
        Text(
            f"{report.name}: {report.status} in {report.wall_s:.2f}s, {report.items_read} "
            f"read, {report.items_written} written",
            style=style,
        )
    )
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    narrow = console.width < _SUMMARY_WIDTH
    counts: dict[str, Callable[[StageReport], int]] = {
        "err" if narrow else "errors": lambda s: s.errors,
        "retry" if narrow else "retries": lambda s: s.retries,
        "skip" if narrow else "skipped": lambda s: s.skipped,
        "dead": lambda s: s.dead_lettered,
    }
    if narrow:
        counts = {k: f for k, f in counts.items() if any(f(s) for s in report.stages)}
    table.add_column("stage", overflow="fold")
    table.add_column("kind", overflow="fold")
    # figures never wrap: the names make room for them
    for column in ["in", "out", *counts, *([] if narrow else ["busy s"]), "util"]:
        table.add_column(column, justify="right", no_wrap=True)
    for stage in report.stages:
        table.add_row(
            stage.name,
            _workers(stage),
            str(stage.items_in),
            str(stage.items_out),
            *(str(count(stage)) for count in counts.values()),
            *([] if narrow else [f"{stage.busy_s:.2f}"]),
            f"{report.utilisation(stage.name):.0%}",
        )
    console.print(table)
    for stage in report.stages:
        if line := auto_choice(stage):
            console.print(Text(line), soft_wrap=True, highlight=False)


def auto_choice(stage: StageReport) -> str | None:
    """What `kind: auto` and `workers: auto` chose for a stage, and why, or None."""
    lines = []
    if stage.kind_choice:
        lines.append(
            f"{stage.name}: kind auto chose {stage.kind_choice['kind']} "
            f"({stage.kind_choice['reason']})"
        )
    if workers := _workers_choice(stage):
        lines.append(workers)
    return "\n".join(lines) or None


def _workers_choice(stage: StageReport) -> str | None:
    if not stage.workers_auto:
        return None
    bounds = f"{stage.workers_auto['min']}-{stage.workers_auto['max']}"
    steps = [w for _, w in stage.concurrency]
    path = " -> ".join(map(str, steps[-8:])) if steps else str(stage.workers)
    last = stage.decisions[-1]["reason"] if stage.decisions else "no measurement"
    return (
        f"{stage.name}: workers auto chose {stage.workers} of {bounds} (path {path}; last: {last})"
    )


def print_failure(console: Console, error: PipelineError) -> None:
    """Where the run failed and the worker's traceback, without pipeflow's own frames."""
    console.print(Text(f"error: {error}", style="bold red"), soft_wrap=True)
    if error.traceback:
        console.print(Text(error.traceback.rstrip("\n")), soft_wrap=True, highlight=False)


def log_summary(report: RunReport) -> None:
    """The run's report as one `run_summary` log event (for `--log-format json`)."""
    logger.info("run_summary", report=report.to_dict())


def log_failure(error: PipeflowError) -> None:
    """Why the run failed, as one `run_failed` log event (for `--log-format json`)."""
    if isinstance(error, PipelineError):
        logger.error(
            "run_failed",
            stage=error.stage,
            index=error.index,
            item=error.item_repr,
            error=error.error_type,
            message=error.error_message,
            attempts=error.attempts,
            traceback=error.traceback,
        )
    else:
        logger.error("run_failed", error=type(error).__name__, message=str(error))
