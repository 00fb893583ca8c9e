"""pipeflow: data pipelines that mix coroutines, threads and processes.

A pipeline pulls items from a source, pushes them through stages joined by bounded
queues, and writes results to a sink. Each stage runs on the event loop (`async`), in a
thread pool (`thread`), in a process pool (`process`), or in any executor you pass.
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Names are imported on first use, so that a process worker, which imports
# `pipeflow._worker` and with it this package, does not pay for the whole library
# (pydantic, structlog, anyio) before its first item.
_EXPORTS = {
    "load": "._config",
    "schema": "._config",
    "ConfigError": "._errors",
    "CrashLoop": "._errors",
    "ErrorBudgetExceeded": "._errors",
    "ItemError": "._errors",
    "ItemTimeout": "._errors",
    "PipeflowError": "._errors",
    "PipelineError": "._errors",
    "PoolStartError": "._errors",
    "RemoteTraceback": "._errors",
    "WorkerCrashed": "._errors",
    "configure_logging": "._log",
    "Pipeline": "._pipeline",
    "RunReport": "._report",
    "StageReport": "._report",
    "CallableSink": "._sinks",
    "CsvSink": "._sinks",
    "JsonlSink": "._sinks",
    "ListSink": "._sinks",
    "NullSink": "._sinks",
    "Sink": "._sinks",
    "StdoutSink": "._sinks",
    "csv_rows": "._sources",
    "jsonl_records": "._sources",
    "text_lines": "._sources",
    "Pool": "._stage",
    "Retry": "._stage",
    "Stage": "._stage",
}

if TYPE_CHECKING:
    from ._config import load as load
    from ._config import schema as schema
    from ._errors import ConfigError as ConfigError
    from ._errors import CrashLoop as CrashLoop
    from ._errors import ErrorBudgetExceeded as ErrorBudgetExceeded
    from ._errors import ItemError as ItemError
    from ._errors import ItemTimeout as ItemTimeout
    from ._errors import PipeflowError as PipeflowError
    from ._errors import PipelineError as PipelineError
    from ._errors import PoolStartError as PoolStartError
    from ._errors import RemoteTraceback as RemoteTraceback
    from ._errors import WorkerCrashed as WorkerCrashed
    from ._log import configure_logging as configure_logging
    from ._pipeline import Pipeline as Pipeline
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CallableSink",
    "ConfigError",
    "CrashLoop",
    "CsvSink",
    "ErrorBudgetExceeded",
    "ItemError",
    "ItemTimeout",
    "JsonlSink",
    "ListSink",
    "NullSink",
    "PipeflowError",
    "Pipeline",
    "PipelineError",
    "PoolStartError",
    "Pool",
    "RemoteTraceback",
    "Retry",
    "RunReport",
    "Sink",
    "Stage",
    "StageReport",
    "StdoutSink",
    "WorkerCrashed",
    "__version__",
    "configure_logging",
    "csv_rows",
    "jsonl_records",
    "load",
    "schema",
    "text_lines",
]
