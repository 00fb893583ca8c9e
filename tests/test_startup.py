"""Start-up: a run imports what running needs, and its process workers import what a call
needs, so that a short run is not mostly imports (issue 11's start-up target).

Each case runs in a fresh interpreter, since this test process has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# what a run through the Python API, with no logging set up, has no use for
NOT_FOR_THE_API = (
    "pipeflow._cli",
    "pipeflow._bench",
    "pipeflow._config",
    "pydantic",
    "typer",
    "rich",
    "structlog",
    "yaml",
    "distributed",
)
# what a process worker has no use for: the engine's parent side and its dependencies
NOT_FOR_A_WORKER = ("pipeflow._pools", "pipeflow._runner", "anyio", "structlog", "rich")

API_RUN = """
import json, sys
import pipeflow
from tests import fns
pipeline = pipeflow.Pipeline([pipeflow.Stage(fns.loaded_modules, kind="process", workers=2)])
report = pipeline.run_sync(range(2))
print(json.dumps({"parent": sorted(sys.modules), "items": report.items_written}))
"""


def fresh(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_run_through_the_python_api_imports_no_command_line_config_or_logging() -> None:
    out = json.loads(fresh(API_RUN))
    assert out["items"] == 2
    loaded = [m for m in out["parent"] if m.startswith(NOT_FOR_THE_API)]
    assert loaded == []


def test_process_workers_import_no_engine_module_before_their_first_item() -> None:
    # the stage returns its worker's modules as the worker first sees an item
    code = (
        "import json, pipeflow\n"
        "from tests import fns\n"
        "sink = pipeflow.ListSink()\n"
        "stage = pipeflow.Stage(fns.loaded_modules, kind='process', workers=2, batch=1)\n"
        "pipeflow.Pipeline([stage], sink=sink).run_sync(range(4))\n"
        "print(json.dumps(sink.items))\n"
    )
    seen = json.loads(fresh(code))
    assert len(seen) == 4
    for modules in seen:
        assert "pipeflow._worker" in modules
        assert [m for m in modules if m.startswith(NOT_FOR_A_WORKER)] == []


def test_the_command_line_loads_the_bench_only_for_pipeflow_bench() -> None:
    code = "import sys, pipeflow._cli.commands\nprint('pipeflow._bench' in sys.modules)\n"
    assert fresh(code).strip() == "False"


def test_loading_a_config_through_the_python_api_imports_no_command_line_or_bench() -> None:
    code = (
        "import json, sys, pipeflow\n"
        "pipeline = pipeflow.load('configs/squares.yaml')\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    loaded = json.loads(fresh(code))
    assert "pydantic" in loaded
    unwanted = ("pipeflow._cli", "pipeflow._bench", "typer", "rich", "structlog", "distributed")
    assert [m for m in loaded if m.startswith(unwanted)] == []


# the command as its console script runs it, reporting the modules it loaded on stderr
COMMAND = """
import json, sys
sys.argv = ["pipeflow", *{args!r}]
from pipeflow.__main__ import main
try:
    main()
finally:
    print("MODULES " + json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def command_modules(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", COMMAND.format(args=list(args))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(n * n) for n in range(1, 11)]
    line = next(line for line in done.stderr.splitlines() if line.startswith("MODULES "))
    modules: list[str] = json.loads(line.removeprefix("MODULES "))
    return modules


def test_pipeflow_run_imports_no_bench_dask_or_graph() -> None:
    loaded = command_modules("run", "benchmarks/squares2.yaml")
    unwanted = ("pipeflow._bench", "pipeflow._cli.graph", "distributed", "dask", "matplotlib")
    assert [m for m in loaded if m.startswith(unwanted)] == []


def test_a_quiet_run_that_logs_nothing_does_not_import_structlog() -> None:
    loaded = command_modules("run", "benchmarks/squares2.yaml", "--quiet")
    assert [m for m in loaded if m.startswith("structlog")] == []
