"""The `pipeflow` command: a thin layer that parses, calls `load()` and `run()`, and renders.

Exit codes: 0 done; 1 the pipeline failed; 2 bad usage or config; 130 SIGINT; 143 SIGTERM;
141 when stdout is closed early (`pipeflow run x | head`), quietly, as a tool killed by
SIGPIPE would. Results go to stdout, everything else to stderr.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import operator
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import anyio
import typer
from rich.console import Console
from rich.text import Text

from .. import __version__
from .._config.config import load, schema
from .._control import RunControl
from .._errors import ConfigError, PipeflowError, PipelineError
from .._log import configure_logging, logger
from .._pipeline import Pipeline
from .._report import RunReport
from .console import LiveProgress, log_failure, log_summary, print_failure, print_summary

if TYPE_CHECKING:
    from .._bench.figures import PointResult

__all__ = ["app", "main"]

EXIT_FAILED, EXIT_USAGE, EXIT_BROKEN_PIPE = 1, 2, 141
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
# after a second signal, how long a run that cannot be cancelled (its event loop held by a
# stage that never awaits) may take before the command writes the report and exits
SECOND_SIGNAL_GRACE_S = 5.0
# How long the command waits at exit for threads that are ending before it takes them for stuck.
STUCK_THREAD_PATIENCE_S = 1.0

app = typer.Typer(
    name="pipeflow",
    help="Run data pipelines that mix coroutines, threads and processes, declared in YAML.",
    epilog="Example: pipeflow run configs/squares.yaml --set stages.square.workers=8",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


class LogFormat(enum.StrEnum):
    console = "console"
    json = "json"


class GraphFormat(enum.StrEnum):
    text = "text"
    mermaid = "mermaid"
    dot = "dot"


ConfigArg = Annotated[str, typer.Argument(help="The pipeline's YAML file.", show_default=False)]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="PATH=VALUE",
        help="Override a config value, stages by name: stages.square.workers=8 (repeatable).",
    ),
]
AppDirOption = Annotated[
    Path | None,
    typer.Option(
        "--app-dir",
        help="Import fn modules and resolve relative paths from here (default: the current dir).",
    ),
]


def _width(stream: Any, piped: int) -> int | None:
    # a terminal's own width, or COLUMNS when set; else wide enough for the tables
    return None if stream.isatty() or "COLUMNS" in os.environ else piped


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, width=_width(sys.stderr, 120))


def _usage_error(lines: list[str], *, as_json: bool = False) -> NoReturn:
    for line in lines:
        if as_json:
            logger.error("config_error", problem=line)
        else:
            print(line, file=sys.stderr)
    raise typer.Exit(EXIT_USAGE)


def _overrides(sets: list[str] | None, *, as_json: bool = False) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in sets or []:
        path, equals, value = item.partition("=")
        if not equals or not path:
            _usage_error(
                [f"--set {item}: write --set PATH=VALUE, e.g. stages.square.workers=8"],
                as_json=as_json,
            )
        overrides[path.strip()] = value
    return overrides


def _load(
    config: str, sets: list[str] | None, app_dir: Path | None, *, as_json: bool = False
) -> Pipeline:
    overrides = _overrides(sets, as_json=as_json)
    try:
        return load(config, overrides, app_dir=app_dir)
    except ConfigError as exc:
        _usage_error(exc.problems, as_json=as_json)


def _version(value: bool) -> None:
    if value:
        print(f"pipeflow {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Run data pipelines that mix coroutines, threads and processes, declared in YAML."""


@app.command()
def run(
    config: ConfigArg,
    sets: SetOption = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write the run's JSON report here.")
    ] = None,
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="How log lines look on stderr.")
    ] = LogFormat.console,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress, no summary, warnings only.")
    ] = False,
    app_dir: AppDirOption = None,
) -> None:
    """Run the pipeline: results to stdout, progress and a summary to stderr.

    Exits 0 when done, 1 when the pipeline failed, 2 for a bad config, 130 on Ctrl-C and
    143 on SIGTERM (the first signal stops reading and finishes the items already read,
    a second one cancels at once).
    """
    configure_logging(log_format.value, logging.WARNING if quiet else logging.INFO)
    as_json = log_format is LogFormat.json
    pipeline = _load(config, sets, app_dir, as_json=as_json)
    console = _stderr()
    # with json, every line of stderr is a JSON object: no live table, no rich text
    show_progress = console.is_terminal and not quiet and not as_json
    outcome = _Outcome(report)
    if report is not None:
        _prepare_output(report, "--report")
    try:
        if show_progress:
            total = operator.length_hint(pipeline.source, 0) or None
            with LiveProgress(console, total) as live:
                # log lines written meanwhile go through the live display, above the table
                configure_logging(log_format.value, logging.INFO)
                try:
                    anyio.run(_run, pipeline, live.update, outcome)
                finally:
                    configure_logging(log_format.value, logging.INFO)
        else:
            anyio.run(_run, pipeline, None, outcome)
    finally:
        outcome.finished.set()
        # the run's signal receiver leaves Python's defaults behind (a KeyboardInterrupt)
        _exit_on_signals()
    _finish(outcome, report, console, quiet, as_json)


def _prepare_output(path: Path, option: str) -> None:
    """Create the folder of an output file before the work, and refuse a path that is not one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _usage_error([f"{option} {path}: cannot create its folder: {exc.strerror or exc}"])
    if path.is_dir():
        _usage_error([f"{option} {path}: is a directory; give a file path"])


class _Outcome:
    """What `_run` learned: the report, the error if the run raised, the signals received."""

    def __init__(self, report_file: Path | None = None) -> None:
        self.control = RunControl()
        self.report: RunReport | None = None
        self.error: Exception | None = None
        self.signals: list[int] = []
        self.report_file = report_file
        self.finished = threading.Event()
        self._received = 0

    def count_signal(self, signum: int, frame: Any) -> None:
        """The Python-level handler during a run, beside the run's signal receiver.

        asyncio's wakeup fd still hands every signal to the receiver on the event loop;
        this handler runs even while a stage holds the loop, so a second signal ends the
        command then too.
        """
        self._received += 1
        if self._received == 2:
            threading.Thread(
                target=self._end_if_stuck, args=(signum,), name="pipeflow-stop", daemon=True
            ).start()

    def _end_if_stuck(self, signum: int) -> None:
        if self.finished.wait(SECOND_SIGNAL_GRACE_S):
            return
        report = self.control.report
        if report is not None and self.report_file is not None:
            if report.status == "running":
                report.status = "cancelled"
            with contextlib.suppress(OSError):
                self.report_file.write_text(report.to_json() + "\n", encoding="utf-8")
        message = (
            f"error: the run did not end within {SECOND_SIGNAL_GRACE_S:g}s of the second "
            "signal (a stage holds the event loop): exiting\n"
        )
        os.write(sys.stderr.fileno(), message.encode())
        os._exit(_SIGNAL_EXIT.get(signal.Signals(signum), 130))


async def _run(
    pipeline: Pipeline, progress: Callable[[RunReport], Any] | None, outcome: _Outcome
) -> None:
    control = outcome.control

    async def watch_signals(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
            for signum in _SIGNAL_EXIT:
                signal.signal(signum, outcome.count_signal)
            task_status.started()
            async for signum in received:
                outcome.signals.append(signum)
                if len(outcome.signals) == 1:
                    logger.warning(
                        "stopping",
                        signal=signal.Signals(signum).name,
                        hint="finishing the items already read; signal again to cancel",
                    )
                # as an app stops a run: the first stop drains, the second cancels
                control.stop()

    async with anyio.create_task_group() as tg:
        await tg.start(watch_signals)
        try:
            outcome.report = await pipeline.run(progress=progress, control=control)
        except Exception as exc:
            outcome.error = exc
        finally:
            tg.cancel_scope.cancel()
    if outcome.report is None:
        outcome.report = getattr(outcome.error, "report", None) or control.report
    _abandoned_threads.append(control.abandoned_threads)


def _broken_pipe(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, BrokenPipeError):
            return True
        error = error.__cause__
    return False


def _finish(
    outcome: _Outcome, report_file: Path | None, console: Console, quiet: bool, as_json: bool
) -> None:
    report, error = outcome.report, outcome.error
    if report_file is not None and report is not None:
        report_file.write_text(report.to_json() + "\n", encoding="utf-8")
    if _broken_pipe(error):
        # stdout's reader left: no message, and no second BrokenPipeError at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_BROKEN_PIPE)
    if isinstance(error, PipeflowError) and as_json:
        log_failure(error)
    elif isinstance(error, PipelineError):
        print_failure(console, error)
    elif isinstance(error, PipeflowError) or (error is not None and outcome.signals):
        # an error after a signal is the signal's doing (a pool interrupted while starting)
        console.print(Text(f"error: {type(error).__name__}: {error}", style="bold red"))
    elif error is not None:
        raise error
    if report is not None and as_json:
        log_summary(report)
    elif report is not None and not quiet:
        print_summary(console, report)
    if outcome.signals:
        raise typer.Exit(_SIGNAL_EXIT.get(signal.Signals(outcome.signals[0]), 130))
    if error is not None:
        # a config problem found only once the run started (a pool that cannot start) is
        # still a config problem
        raise typer.Exit(EXIT_USAGE if isinstance(error, ConfigError) else EXIT_FAILED)


@app.command()
def validate(config: ConfigArg, sets: SetOption = None, app_dir: AppDirOption = None) -> None:
    """Check the config: its keys and values, every fn imports, process callables pickle.

    Exits 0 when the config is good, 2 with one `FILE:LINE:COL: where: what` line per problem.
    """
    pipeline = _load(config, sets, app_dir)
    names = ", ".join(str(stage.name) for stage in pipeline.stages)
    count = len(pipeline.stages)
    print(f"{config}: ok ({count} stage{'s' if count > 1 else ''}: {names})")


@app.command()
def graph(
    config: ConfigArg,
    fmt: Annotated[
        GraphFormat, typer.Option("--format", "-f", help="text, mermaid or dot.")
    ] = GraphFormat.text,
    sets: SetOption = None,
    app_dir: AppDirOption = None,
) -> None:
    """Draw the pipeline: each stage's kind, workers, op and input queue bound."""
    from .graph import draw  # as the bench: `pipeflow run` does not import what only draws

    pipeline = _load(config, sets, app_dir)
    sys.stdout.write(draw(pipeline, fmt.value))


@app.command()
def bench(
    config: ConfigArg,
    matrix: Annotated[
        list[str] | None,
        typer.Option(
            "--matrix",
            "-m",
            metavar="PATH=V1,V2,...",
            help="Values to try at a config path (repeatable: every combination is run); "
            "default: the config's bench: matrix.",
        ),
    ] = None,
    repeat: Annotated[
        int | None, typer.Option("--repeat", "-n", help="Timed runs per point [default: 3].")
    ] = None,
    warmup: Annotated[
        int | None, typer.Option("--warmup", help="Untimed runs per point first [default: 1].")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the results as JSON (CSV if FILE ends .csv)."),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Chart throughput against workers (PNG).")
    ] = None,
    sets: SetOption = None,
    app_dir: AppDirOption = None,
) -> None:
    """Run the pipeline once per point of a matrix, and say where the time goes.

    Prints a table per point (wall time, items/s, pool start-up and shutdown, pickling,
    CPU, peak RSS, the slowest stage) and a recommendation. Exits 0; 1 if a point failed
    or the points' outputs differ; 2 for a bad config or --matrix.
    """
    # imported here, not with the module: `pipeflow run` does not pay for the bench
    from .._bench.bench import parse_matrix, plan_bench, run_bench
    from .._bench.render import (
        PlotUnavailable,
        check_plotting,
        print_bench,
        write_plot,
        write_results,
    )

    configure_logging("console", logging.WARNING)
    if plot is not None:
        try:
            check_plotting()
        except PlotUnavailable as exc:
            _usage_error([str(exc)])
    fixed = _overrides(sets)
    try:
        plan = plan_bench(
            config,
            parse_matrix(matrix) if matrix else None,
            sets=fixed,
            repeat=repeat,
            warmup=warmup,
            app_dir=app_dir,
        )
    except ConfigError as exc:
        _usage_error(exc.problems)
    for path, option in ((output, "--output"), (plot, "--plot")):
        if path is not None:
            _prepare_output(path, option)
    console = _stderr()

    def show(point: PointResult, number: int, wall: float | None) -> None:
        kind = "warm-up" if number <= plan.warmup else "run"
        outcome = "failed" if wall is None else f"{wall:.3f}s"
        console.print(f"{point.label}: {kind} {number}: {outcome}", highlight=False)

    result = run_bench(plan, on_run=show)
    print_bench(Console(highlight=False, width=_width(sys.stdout, 160)), result)
    if output is not None:
        write_results(result, output)
    if plot is not None:
        write_plot(result, plot)
    if result.failed or result.differing:
        raise typer.Exit(EXIT_FAILED)


@app.command("schema")
def schema_command() -> None:
    """Print the config's JSON Schema, for editors that complete and check YAML."""
    print(json.dumps(schema(), indent=2))


_signalled: list[int] = []
# threads each run of this process gave up on after a timeout
_abandoned_threads: list[int] = []


def _exit_on_signal(signum: int, frame: Any) -> None:
    _signalled.append(signum)
    raise SystemExit(_SIGNAL_EXIT.get(signal.Signals(signum), 128 + signum))


def _exit_on_signals() -> None:
    # Outside a run (loading, rendering) a signal ends the command with its exit code at
    # once; during a run, `_run`'s receiver replaces these handlers with a graceful stop.
    for signum in _SIGNAL_EXIT:
        signal.signal(signum, _exit_on_signal)


def _stuck_threads(patience: float = STUCK_THREAD_PATIENCE_S) -> bool:
    """Whether a thread the interpreter would wait for at exit is still running after
    `patience` seconds: a pool's threads that are just ending are not stuck, and taking
    them for stuck would skip the process's own clean-up at exit."""
    main_thread = threading.main_thread()
    deadline = time.monotonic() + patience
    for thread in threading.enumerate():
        if thread is not main_thread and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    return any(
        t.is_alive() and not t.daemon and t is not main_thread for t in threading.enumerate()
    )


def main() -> None:
    """The `pipeflow` console script."""
    _exit_on_signals()
    # spawn and forkserver workers re-run the parent's main module before their first
    # item; here that is this command (typer, rich, pydantic: ~0.3 s a worker), which no
    # worker needs, since the stage callables come from the config's modules
    main_module = sys.modules["__main__"]
    main_module.__spec__ = None
    vars(main_module).pop("__file__", None)
    try:
        app()
    except SystemExit as done:
        if any(_abandoned_threads) or _stuck_threads():
            # a thread stuck past its timeout, or in a run cancelled by a second signal,
            # may never return, and the interpreter would wait for it at exit: flush what
            # we wrote and end the process now
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(done.code if isinstance(done.code, int) else 1)
        raise
    except BaseException:
        if _signalled:
            # the signal's SystemExit was raised inside the event loop, and wrapped
            raise SystemExit(_SIGNAL_EXIT.get(signal.Signals(_signalled[0]), 130)) from None
        raise
