"""pipeflow: data pipelines that mix coroutines, threads and processes.

A pipeline pulls items from a source, pushes them through stages joined by bounded
queues, and writes results to a sink. Each stage runs on the event loop (`async`), in a
thread pool (`thread`), in a process pool (`process`), or in any executor you pass.
"""

import importlib
import re
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public surface, listed once. At run time the names are imported on first use, so
# that a process worker, which imports `pipeflow._worker` and with it this package, does
# not pay for the whole library (pydantic, structlog, anyio) before its first item:
# `__all__` and the map of lazy names are both read from this block.
if TYPE_CHECKING:
    from ._config import load as load
    from ._config import schema as schema
    from ._control import RunControl as RunControl
    from ._errors import ConfigError as ConfigError
    from ._errors import CrashLoop as CrashLoop
    from ._errors import ErrorBudgetExceeded as ErrorBudgetExceeded
    from ._errors import ItemError as ItemError
    from ._errors import ItemTimeout as ItemTimeout
    from ._errors import PipeflowError as PipeflowError
    from ._errors import PipelineError as PipelineError
    from ._errors import PoolStartError as PoolStartError
    from ._errors import RemoteTraceback as RemoteTraceback
    from ._errors import SourceFormatError as SourceFormatError
    from ._errors import WorkerCrashed as WorkerCrashed
    from ._group import Group as Group
    from ._identity import WorkerInfo as WorkerInfo
    from ._log import configure_logging as configure_logging
    from ._pipeline import Pipeline as Pipeline
    from ._rate import Rate as Rate
    from ._report import RunReport as RunReport
    from ._report import StageReport as StageReport
    from ._sinks import CallableSink as CallableSink
    from ._sinks import CsvSink as CsvSink
    from ._sinks import JsonlSink as JsonlSink
    from ._sinks import ListSink as ListSink
    from ._sinks import NullSink as NullSink
    from ._sinks import Sink as Sink
    from ._sinks import StdoutSink as StdoutSink
    from ._sources import csv_rows as csv_rows
    from ._sources import jsonl_records as jsonl_records
    from ._sources import text_lines as text_lines
    from ._stage import Pool as Pool
    from ._stage import Retry as Retry
    from ._stage import Stage as Stage


def _read_exports() -> dict[str, str]:
    """Each public name and the module it comes from, read from the block above.

    Read with a pattern, not `ast`: an import may happen in any thread, and CPython 3.11's
    parser is not safe to run in two threads at once.
    """
    with open(__file__, encoding="utf-8") as file:
        source = file.read()
    block = source.split("if TYPE_CHECKING:\n", 1)[1].split("\n\n", 1)[0]
    exports: dict[str, str] = {}
    for line in block.splitlines():
        match = re.fullmatch(r"    from (\.\w+) import (\w+) as \2", line)
        assert match is not None, f"not an export: {line!r}"
        exports[match[2]] = match[1]
    return exports


_EXPORTS = _read_exports()
__all__ = ["__version__", *sorted(_EXPORTS)]


def _publish() -> None:
    """Name `pipeflow` as the module of each public name already imported, as the user
    reaches it (`pipeflow.PipelineError` in reprs and tracebacks)."""
    for name, relative in _EXPORTS.items():
        module = sys.modules.get(__name__ + relative)
        if module is not None:
            value = getattr(module, name)
            if getattr(value, "__module__", None) != __name__:
                value.__module__ = __name__


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    _publish()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


# the errors are light, and an error raised before its class was looked up through this
# package must still name `pipeflow`
importlib.import_module("._errors", __name__)
_publish()
