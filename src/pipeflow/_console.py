"""What `pipeflow run` shows on stderr: live progress, the summary table, a failure."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ._errors import PipeflowError, PipelineError
from ._log import logger
from ._report import RunReport, StageReport

__all__ = ["LiveProgress", "log_failure", "log_summary", "print_failure", "print_summary"]

# Rates are measured over this many recent progress updates (about 5 a second).
_RATE_WINDOW = 10


def _done(stage: StageReport) -> int:
    return stage.items_out + stage.skipped + stage.dead_lettered + stage.failed + stage.filtered_out


class LiveProgress:
    """A table redrawn from the live report each time the run calls `update`.

    Use as a context manager around the run; while it is open, writes to `sys.stderr` (log
    lines) are printed above the table instead of tearing it.

    Args:
        console: The stderr console to draw on.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
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

    def _rate(self, stage: StageReport, now: float) -> float:
        points = self.history.setdefault(stage.name, deque(maxlen=_RATE_WINDOW))
        points.append((now, _done(stage)))
        (first_t, first_n), (last_t, last_n) = points[0], points[-1]
        return (last_n - first_n) / (last_t - first_t) if last_t > first_t else 0.0

    def render(self, report: RunReport) -> Group:
        """The progress table for one moment of the run."""
        now = time.perf_counter()
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("stage", "kind", "done", "rate/s", "queue", "errors"):
            table.add_column(column, justify="left" if column in ("stage", "kind") else "right")
        for stage in report.stages:
            fill = f"{stage.queue_high_water}/{stage.queue_size}" if stage.queue_size else "-"
            errors = Text(str(stage.errors), style="red" if stage.errors else "")
            table.add_row(
                stage.name,
                f"{stage.kind} x{stage.workers}",
                f"{_done(stage)}/{stage.items_in}",
                f"{self._rate(stage, now):,.0f}",
                fill,
                errors,
            )
        elapsed = now - self.started
        head = Text(
            f"{report.name}: {elapsed:.1f}s, {report.items_read} read, "
            f"{report.items_written} written",
            style="bold",
        )
        return Group(head, table)


def print_summary(console: Console, report: RunReport) -> None:
    """The table of what each stage did, under a line with the run's outcome."""
    style = {"ok": "green", "failed": "red"}.get(report.status, "yellow")
    table = Table(
        title=Text(
            f"{report.name}: {report.status} in {report.wall_s:.2f}s, {report.items_read} "
            f"read, {report.items_written} written",
            style=style,
        ),
        title_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    columns = (
        "stage",
        "kind",
        "workers",
        "in",
        "out",
        "errors",
        "retries",
        "skipped",
        "dead",
        "busy s",
        "util",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("stage", "kind") else "right")
    for stage in report.stages:
        table.add_row(
            stage.name,
            stage.kind,
            str(stage.workers),
            str(stage.items_in),
            str(stage.items_out),
            str(stage.errors),
            str(stage.retries),
            str(stage.skipped),
            str(stage.dead_lettered),
            f"{stage.busy_s:.2f}",
            f"{report.utilisation(stage.name):.0%}",
        )
    console.print(table)


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
