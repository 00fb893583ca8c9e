"""The public surface: what `import pipeflow` offers is pinned, so a change to it is deliberate."""

from __future__ import annotations

import pipeflow
import pipeflow._errors

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
    defined = [
        value
        for value in vars(pipeflow._errors).values()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == pipeflow._errors.__name__
    ]
    assert len(defined) >= 10  # the module holds the whole tree, not a stray class
    for error in defined:
        if error is pipeflow.RemoteTraceback:
            continue  # carries a worker's traceback text as a `__cause__`; not raised to users
        assert issubclass(error, pipeflow.PipeflowError), error
        assert getattr(pipeflow, error.__name__, None) is error, f"{error.__name__} is not exported"
        assert error.__name__ in pipeflow.__all__
    assert issubclass(pipeflow.ConfigError, ValueError)
    assert issubclass(pipeflow.ItemTimeout, TimeoutError)
