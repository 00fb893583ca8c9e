"""The public surface: what `import pipeflow` offers is pinned, so a change to it is deliberate."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

import pipeflow
from pipeflow import _errors

PUBLIC = {
    "CallableSink",
    "ConfigError",
    "CrashLoop",
    "CsvSink",
    "ErrorBudgetExceeded",
    "Group",
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
    "Rate",
    "Retry",
    "RunControl",
    "RunReport",
    "Sink",
    "SourceFormatError",
    "Stage",
    "StageReport",
    "StdoutSink",
    "WorkerCrashed",
    "WorkerInfo",
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


def _error_classes() -> list[type[BaseException]]:
    return [
        value
        for value in vars(_errors).values()
        if inspect.isclass(value) and issubclass(value, BaseException)
    ]


def test_errors_form_one_rooted_tree_drawn_in_its_docstring() -> None:
    # every exception class of the errors module: exported, drawn, and rooted (but the
    # traceback carrier, which is no error of pipeflow's and is said so in the drawing)
    doc = _errors.__doc__ or ""
    assert len(_error_classes()) >= 10  # the module holds the whole tree, not a stray class
    for error in _error_classes():
        name = error.__name__
        assert name in pipeflow.__all__, f"{name} is not exported"
        assert getattr(pipeflow, name) is error
        assert name in doc, f"{name} is not drawn in the tree"
        if error is not pipeflow.RemoteTraceback:
            assert issubclass(error, pipeflow.PipeflowError), name
    assert issubclass(pipeflow.ConfigError, ValueError)
    assert issubclass(pipeflow.SourceFormatError, ValueError)
    assert issubclass(pipeflow.ItemTimeout, TimeoutError)
    for error in (pipeflow.PoolStartError, pipeflow.CrashLoop, pipeflow.SourceFormatError):
        assert error in _error_classes()


def test_the_report_of_an_error_is_declared() -> None:
    assert "report" in inspect.get_annotations(pipeflow.PipeflowError)
    assert pipeflow.PipelineError.report is None  # until a run attaches its own


@pytest.mark.parametrize("name", sorted(set(pipeflow.__all__) - {"__version__"}))
def test_public_names_report_the_package_as_their_module(name: str) -> None:
    assert getattr(pipeflow, name).__module__ == "pipeflow"


def test_an_error_raised_before_its_name_is_looked_up_names_the_package() -> None:
    # a fresh interpreter: nothing reached `pipeflow.X` before the error is made
    code = (
        "import pipeflow, pickle, traceback\n"
        "from pipeflow._errors import ConfigError\n"
        "error = ConfigError('bad')\n"
        "line = traceback.format_exception_only(error)[-1].strip()\n"
        "from pipeflow._report import RunReport\n"
        "print(line, repr(error), pickle.loads(pickle.dumps(error)).problems)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=50
    ).stdout
    assert out.strip() == "pipeflow.ConfigError: bad ConfigError('bad') ['bad']"


def test_the_export_list_is_read_from_the_one_import_block() -> None:
    with open(pipeflow.__file__, encoding="utf-8") as file:
        source = file.read()
    for name in set(pipeflow.__all__) - {"__version__"}:
        assert source.count(f" as {name}\n") == 1, name
        assert source.count(f'"{name}"') == 0, f"{name} is listed a second time"
    assert json.dumps(sorted(pipeflow.__all__)) == json.dumps(sorted(PUBLIC))
