"""The benchmark harness still runs: a quick pass over a few workloads, two rotated rounds."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PEERS = ("aiostream", "psutil")
WORKLOADS = ("async", "latency", "large")


@pytest.mark.timeout(90)
def test_quick_benchmark_rotates_rounds_and_prints_every_target(tmp_path: Path) -> None:
    missing = [m for m in PEERS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"benchmark peers not installed: {', '.join(missing)} (pip install -e '.[bench]')"
        )
    out_json = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/run.py",
            "--quick",
            "--rounds",
            "2",
            "--only",
            ",".join(WORKLOADS),
            "--size",
            "large=40",
            "--json",
            str(out_json),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("load average at start:") == len(WORKLOADS), out
    assert out.count("load average at end:") == len(WORKLOADS), out
    assert re.search(r"^elapsed \d+\.\d s", out, re.M), out

    data = json.loads(out_json.read_text())
    assert data["rounds"] == 2
    assert list(data["workloads"]) == list(WORKLOADS)
    for name, workload in data["workloads"].items():
        first, second = (list(r) for r in workload["rounds"])
        # every contender ran in both rounds, in an order rotated by one
        assert sorted(first) == sorted(second), name
        assert second == first[1:] + first[:1], (name, first, second)
        for figures in workload["rounds"]:
            assert all(f["wall_s"] > 0 for f in figures.values()), (name, figures)
        for target in workload["targets"]:
            assert len(target["rounds"]) == 2, (name, target)
            assert target["min"] <= target["median"] <= target["max"], (name, target)
            line = next((ln for ln in out.splitlines() if f"{target['text']}: median" in ln), None)
            assert line is not None, f"no line for {target['text']!r} in:\n{out}"
            assert "min-max" in line and "2 rounds" in line and "goal" in line, line
            assert re.search(r"\[\s*(info )?(met|MISSED)\]", line), line

    async_round = data["workloads"]["async"]["rounds"][0]
    assert {"pipeflow async x2, stream()", "asyncio.Queue(100) chain"} <= set(async_round)
    large = data["workloads"]["large"]["rounds"]
    for figures in large:
        for contender in ("pipeflow process, batch auto", "Pool.imap(chunksize=2)"):
            # 1 MiB items, 2 workers, a fresh interpreter: the tree's peak is tens of MB
            assert figures[contender]["peak_rss_mb"] > 20, figures
            assert figures[contender]["mb_per_s"] > 0, figures


@pytest.mark.timeout(120)
def test_the_auto_benchmark_runs_the_grid_and_auto_in_rotated_rounds(tmp_path: Path) -> None:
    out_json = tmp_path / "auto.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/auto.py",
            "--quick",
            "--rounds",
            "2",
            "--only",
            "io",
            "--json",
            str(out_json),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr
    io = json.loads(out_json.read_text())["io"]
    first, second = (list(walls) for walls in io["rounds"])
    assert sorted(first) == sorted(second) and second == first[1:] + first[:1]
    assert {"default", "thread auto", "auto", "thread x1", "thread x64"} <= set(first)
    for walls, cut in zip(io["rounds"], io["cut"], strict=True):
        # auto always runs to the end; a point is cut only for running far longer than one
        # that ran to the end, so the round's best is never cut
        assert "auto" not in cut and "thread auto" not in cut
        best = min(walls, key=walls.__getitem__)
        assert best not in cut
        assert all(walls[label] > walls[best] for label in cut)
    assert len(io["chosen"]) == 4  # auto and thread auto, in each round
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("io: best grid point"))
    assert "auto / best" in line and "auto / default" in line, line
