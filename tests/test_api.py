"""The public surface: what `import pipeflow` offers is pinned, so a change to it is deliberate."""

from __future__ import annotations

import pipeflow

PUBLIC = {
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
}


def test_all_is_pinned() -> None:
    assert set(pipeflow.__all__) == PUBLIC


def test_every_public_name_exists_and_has_a_docstring() -> None:
    for name in pipeflow.__all__:
        value = getattr(pipeflow, name)
        if name != "__version__":
            assert value.__doc__, f"pipeflow.{name} has no docstring"


def test_errors_form_one_rooted_tree() -> None:
    for name in (
        "ConfigError",
        "PipelineError",
        "ItemError",
        "WorkerCrashed",
        "ItemTimeout",
        "ErrorBudgetExceeded",
    ):
        assert issubclass(getattr(pipeflow, name), pipeflow.PipeflowError)
    assert issubclass(pipeflow.ConfigError, ValueError)
    assert issubclass(pipeflow.ItemTimeout, TimeoutError)
