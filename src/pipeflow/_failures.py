"""The run's errors: the `PipelineError` built for an item, a sink, or a stage's setup or
teardown that failed, and the error a failed task group stands for.
"""

from __future__ import annotations

import traceback
from typing import Any

import anyio

from ._errors import PipeflowError, PipelineError, RemoteTraceback, short_repr
from ._sinks import Sink
from ._worker import Failure


def _leaf(exc: BaseException) -> BaseException:
    """The exception inside (nested) exception groups, or `exc` itself."""
    return unwrap_group(exc) if isinstance(exc, BaseExceptionGroup) else exc


def unwrap_group(group: BaseExceptionGroup[Any]) -> BaseException:
    """What a failed task group means for the user: its PipelineError if it has one,
    else its first exception that is not a cancellation."""
    chosen: BaseExceptionGroup[Any] | None
    chosen, _ = group.split(PipelineError)
    if chosen is None:  # an error budget exceeded, say: a closed queue is its echo
        chosen, _ = group.split(PipeflowError)
    if chosen is None:
        cancelled = anyio.get_cancelled_exc_class()
        chosen, _ = group.split(lambda e: not isinstance(e, cancelled))
    exc: BaseException = chosen if chosen is not None else group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _error_of(stage: str, index: int | None, value: Any, exc: BaseException) -> PipelineError:
    error = PipelineError(
        stage=stage,
        index=index,
        item_repr=short_repr(value) if index is not None else None,
        error_type=type(exc).__qualname__,
        error_message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )
    error.__cause__ = exc
    return error


def _sink_error(stage: str, sink: Sink, exc: BaseException) -> PipelineError:
    """A sink (`sink` or `dead_letter`) failed. A system error (a full disk) is told in
    one line, with the file it was writing: pipeflow's own frames would only hide it."""
    if not isinstance(exc, OSError):
        return _error_of(stage, None, None, exc)
    path = getattr(sink, "path", None)
    message = str(exc) if path is None or exc.filename else f"{exc}: {str(path)!r}"
    error = PipelineError(
        stage=stage,
        index=None,
        item_repr=None,
        error_type=type(exc).__qualname__,
        error_message=message,
        traceback="",
    )
    error.__cause__ = exc
    return error


def _stage_error(stage: str, failure: Failure, where: str) -> PipelineError:
    """The error that fails a run when a stage's setup or teardown raised."""
    error = PipelineError(
        stage=stage,
        index=None,
        item_repr=None,
        error_type=failure.error_type,
        error_message=f"{failure.message} ({where})",
        traceback=failure.traceback,
    )
    cause = failure.error
    if cause.__traceback__ is None and cause.__cause__ is None:
        cause.__cause__ = RemoteTraceback(failure.traceback)
    error.__cause__ = cause
    return error
