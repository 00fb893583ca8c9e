"""pipeflow's structlog logger, and how the command line renders it.

As a library, pipeflow logs through the standard `logging` module under the name
`pipeflow`, which has a `NullHandler` and nothing else: an app that configures no logging
sees nothing (not even Python's last-resort handler for warnings), and an app that does
configure it gets one readable line per event, `item_error stage=guard index=7 ...`, with
its own format. `configure_logging` renders the same events as pipeflow's console lines or
as JSON objects, which is what the `pipeflow` command does.
"""

from __future__ import annotations

import datetime
import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

__all__ = ["LogFormat", "configure_logging", "logger"]

LogFormat = Literal["console", "json"]

# Where each record keeps its full event (level and UTC timestamp included), for
# `configure_logging`'s formatter; other formatters read the readable message.
_EVENT = "pipeflow_event"

logging.getLogger("pipeflow").addHandler(logging.NullHandler())


def _readable(event: Mapping[str, Any]) -> str:
    """`item_error stage=guard index=7 message='bad value'`: the event, then its fields."""
    fields = []
    for key, value in event.items():
        if key == "event":
            continue
        text = str(value)
        shown = text if text and not any(c in text for c in " '\"=\n") else repr(value)
        fields.append(f"{key}={shown}")
    return " ".join([str(event.get("event", "")), *fields])


def _to_record(
    logger: logging.Logger, method: str, event: MutableMapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The last processor: a readable message, with the whole event kept on the record."""
    message = _readable(event).replace("%", "%%")
    full = {
        **event,
        "level": "warning" if method == "warn" else method,
        "timestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    return (message,), {"extra": {_EVENT: full}}


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _Logger:
    """pipeflow's structlog logger, made on the first event that is shown.

    Importing structlog imports rich's traceback renderer too (~0.1-0.4 s): a run whose
    events nobody shows (an app with no logging set up sees warnings and worse only)
    never pays for it.
    """

    def __init__(self) -> None:
        self._stdlib = logging.getLogger("pipeflow")
        self._bound: Any = None

    def _structlog(self) -> Any:
        if self._bound is None:
            import structlog

            self._bound = structlog.wrap_logger(
                self._stdlib,
                wrapper_class=structlog.stdlib.BoundLogger,
                processors=[structlog.stdlib.filter_by_level, _to_record],
            )
        return self._bound

    def __getattr__(self, name: str) -> Any:
        level = _LEVELS.get(name)
        if level is not None and not self._stdlib.isEnabledFor(level):
            return _drop
        return getattr(self._structlog(), name)


def _drop(*args: Any, **kwargs: Any) -> None:
    """An event below the level shown."""


logger: Any = _Logger()


class _EventFormatter(logging.Formatter):
    """Renders a record's pipeflow event with a structlog renderer, made for the first
    record shown: importing structlog imports rich's traceback renderer too (~30 ms on top
    of rich), which a run that shows no event (`pipeflow run --quiet`) never needs."""

    def __init__(self, fmt: LogFormat, *, colors: bool) -> None:
        super().__init__()
        self.fmt = fmt
        self.colors = colors
        self._renderer: Any = None

    def renderer(self) -> Any:
        """The structlog renderer (called under the handler's lock)."""
        if self._renderer is None:
            import structlog

            if self.fmt == "json":
                self._renderer = structlog.processors.JSONRenderer(default=repr)
            else:
                self._renderer = structlog.dev.ConsoleRenderer(colors=self.colors)
        return self._renderer

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, _EVENT, None)
        if event is None:
            event = {"event": record.getMessage(), "level": record.levelname.lower()}
        return str(self.renderer()(None, record.levelname.lower(), dict(event)))


def configure_logging(fmt: LogFormat = "console", level: int | str = logging.INFO) -> None:
    """Show pipeflow's events on stderr, as the `pipeflow` command does.

    Replaces the handlers of the `pipeflow` logger with one that writes to `sys.stderr`,
    and stops its records from reaching the root logger. An app that has its own logging
    set up needs none of this: pipeflow's records reach its handlers as readable lines.

    Args:
        fmt: `console` for coloured (on a terminal) `key=value` lines, `json` for one JSON
            object per line.
        level: The lowest level shown: `logging.INFO` shows each run's start and end,
            `logging.WARNING` only skipped items, retries given up and the like.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EventFormatter(fmt, colors=sys.stderr.isatty()))
    log = logging.getLogger("pipeflow")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
