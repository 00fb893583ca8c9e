"""pipeflow's exceptions, one rooted tree.

PipeflowError
├── ConfigError (also ValueError)  a config or a Stage/Pipeline argument is wrong
├── PipelineError                  a run failed: names the stage and the item
│     └── raised `from` the original exception, whose own `__cause__` is a
│         RemoteTraceback carrying the worker's traceback text
├── ItemError                      what went wrong with one item (kept per item)
│     ├── WorkerCrashed            a process worker died while it held the item
│     └── ItemTimeout (also TimeoutError)  the item ran past its stage's `timeout`
└── ErrorBudgetExceeded            too many items were skipped or dead-lettered
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = [
    "ConfigError",
    "CrashLoop",
    "ErrorBudgetExceeded",
    "ItemError",
    "ItemTimeout",
    "PipeflowError",
    "PipelineError",
    "PoolStartError",
    "RemoteTraceback",
    "WorkerCrashed",
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


class PipeflowError(Exception):
    """The root of every error pipeflow raises."""


class ConfigError(PipeflowError, ValueError):
    """A pipeline is declared wrongly: bad config, bad argument, unimportable callable.

    Args:
        problems: One line per problem, `FILE:LINE:COL: where: what` when a file is known.
    """

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
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


class PoolStartError(PipeflowError):
    """A pool's worker processes died before they could take any work."""


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
