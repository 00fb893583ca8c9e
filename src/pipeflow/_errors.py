"""pipeflow's exceptions, one rooted tree.

PipeflowError                      every error a run raises carries its `report`
├── ConfigError (also ValueError)  a config or a Stage/Pipeline argument is wrong
├── SourceFormatError (also ValueError)  a line of a source file cannot be read
├── PipelineError                  a run failed: names the stage and the item
│     └── raised `from` the original exception, whose own `__cause__` is a
│         RemoteTraceback carrying the worker's traceback text
├── ItemError                      what went wrong with one item (kept per item)
│     ├── WorkerCrashed            a process worker died while it held the item
│     └── ItemTimeout (also TimeoutError)  the item ran past its stage's `timeout`
├── ErrorBudgetExceeded            too many items were skipped or dead-lettered
├── PoolStartError                 a pool's workers died, or its cluster could not be
│                                  reached, before it took any work
└── CrashLoop                      a pool's workers kept dying during the run

RemoteTraceback is no PipeflowError: it only carries a worker's traceback text, as the
`__cause__` of the exception raised there.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._report import RunReport

__all__ = [
    "ConfigError",
    "CrashLoop",
    "ErrorBudgetExceeded",
    "ItemError",
    "ItemTimeout",
    "PipeflowError",
    "PipelineError",
    "PoolStartError",
    "Problem",
    "RemoteTraceback",
    "SourceFormatError",
    "WorkerCrashed",
    "did_you_mean",
    "short_repr",
]

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlist = 6
_repr.maxdict = 4
_repr.maxtuple = 6


def short_repr(value: Any) -> str:
    """A repr of `value` short enough for one line of an error message."""
    try:
        return _repr.repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        return f"<{type(value).__name__} object>"


def did_you_mean(word: str, choices: Any) -> str:
    """`, did you mean 'x'?` for the closest of `choices`, or an empty string."""
    import difflib  # only a wrong name needs it; a process worker imports this module

    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f", did you mean {close[0]!r}?" if close else ""


class PipeflowError(Exception):
    """The root of every error pipeflow raises.

    Attributes:
        report: The report of the run the error ended (what it did up to the error), or
            None for an error raised outside a run.
    """

    report: RunReport | None = None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a `Stage`, `Pool` or `Pipeline`, and what it is about.

    The config layer reads `stage` and `key` to show the problem at the position of that
    key in the YAML file.

    Attributes:
        what: What is wrong, e.g. `workers must be a positive int, got 0`.
        stage: The name of the stage it is about, if any.
        index: The position of that stage in the pipeline, when known.
        key: The argument (config key) it is about, e.g. `kind`, or None for the whole.
    """

    what: str
    stage: str | None = None
    index: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        return self.what if self.stage is None else f"stage {self.stage!r}: {self.what}"


class ConfigError(PipeflowError, ValueError):
    """A pipeline is declared wrongly: bad config, bad argument, unimportable callable.

    Args:
        problems: One line per problem, `FILE:LINE:COL: where: what` when a file is known,
            or `Problem`s that say which stage and key each one is about.

    Attributes:
        problems: One line per problem.
        details: The same problems as `Problem`s (a plain line is a `Problem` without a
            stage or key).
    """

    def __init__(self, problems: str | Problem | list[str] | list[Problem]) -> None:
        given = problems if isinstance(problems, list) else [problems]
        self.details = [p if isinstance(p, Problem) else Problem(p) for p in given]
        self.problems = [str(p) for p in self.details]
        super().__init__("\n".join(self.problems))


class RemoteTraceback(Exception):
    """Carries the traceback text of a worker, as the `__cause__` of the original error."""

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class ItemError(PipeflowError):
    """Something went wrong with one item that is not an exception of the stage callable."""


class WorkerCrashed(ItemError):
    """A process worker died (exit, signal, segfault) while it was running the item.

    Args:
        message: What happened, including the exit code or the signal when known.
    """


class ItemTimeout(ItemError, TimeoutError):
    """The item ran longer than its stage's `timeout`."""


class ErrorBudgetExceeded(PipeflowError):
    """More items were skipped or dead-lettered than `max_errors`/`max_error_rate` allow."""


class SourceFormatError(PipeflowError, ValueError):
    """A line of a source file cannot be read (bad JSON, for instance)."""


class PoolStartError(PipeflowError):
    """A pool could not start: its workers died before any work, or its cluster is unreachable."""


class CrashLoop(PipeflowError):
    """A pool's workers kept dying: the run stops instead of replacing the pool forever."""


class PipelineError(PipeflowError):
    """A run failed: the error names the stage, the item and the original exception.

    The original exception is this error's `__cause__`; when it was raised in a
    worker its own `__cause__` is a `RemoteTraceback` with the worker's traceback.

    Attributes:
        stage: The name of the stage that failed (`source` or `sink` for those).
        index: The position of the item in the source, or None.
        item_repr: A short repr of the item, or None.
        error_type: The type name of the original exception.
        error_message: The message of the original exception.
        traceback: The traceback text from where the exception was raised.
        attempts: How many times the item was tried.
    """

    def __init__(
        self,
        *,
        stage: str,
        index: int | None,
        item_repr: str | None,
        error_type: str,
        error_message: str,
        traceback: str,
        attempts: int = 1,
    ) -> None:
        self.stage = stage
        self.index = index
        self.item_repr = item_repr
        self.error_type = error_type
        self.error_message = error_message
        self.traceback = traceback
        self.attempts = attempts
        where = f"stage {stage!r}"
        if index is not None:
            where += f", item {index} ({item_repr})"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{where} failed{tries}: {error_type}: {error_message}")
