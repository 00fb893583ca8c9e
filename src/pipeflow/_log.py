"""pipeflow's structlog logger, and how the command line renders it.

The library logs through the standard `logging` module under the name `pipeflow`, so an
embedding app decides where (and whether) events go. The command line calls
`configure_logging` to render them to stderr, as console lines or JSON.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "logger"]

logger: Any = structlog.wrap_logger(
    logging.getLogger("pipeflow"),
    wrapper_class=structlog.stdlib.BoundLogger,
    processors=[
        structlog.stdlib.filter_by_level,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ],
)


def configure_logging(fmt: str = "console", level: int | str = logging.INFO) -> None:
    """Send pipeflow's events to stderr, as `console` lines or `json`, from `level` up."""
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    log = logging.getLogger("pipeflow")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
