"""The benchmark harness still runs: a quick trivial-map pass prints its table and targets."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PEERS = ("mpire", "pypeln")


@pytest.mark.timeout(60)
def test_quick_trivial_benchmark_prints_table_and_exits_0() -> None:
    missing = [m for m in PEERS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"benchmark peers not installed: {', '.join(missing)} (pip install -e '.[bench]')"
        )
    done = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--only", "trivial"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "items/s" in out
    for runner in (
        "serial Python",
        "multiprocessing.Pool.map",
        "ProcessPoolExecutor.map",
        "mpire WorkerPool.map",
        "pypeln process.map",
        "pipeflow process",
    ):
        line = next((ln for ln in out.splitlines() if ln.startswith(runner)), None)
        assert line is not None, f"no {runner!r} row in:\n{out}"
        assert "n/a" not in line.split("  note")[0], line
    assert "pipeflow process >= 0.5x Pool.map items/s" in out
