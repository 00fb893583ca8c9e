"""`pipeflow bench`, run for real in a subprocess on the example configs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from test_cli import child_env

ROOT = Path(__file__).parent.parent
QUICK = ("--repeat", "1", "--warmup", "0")


def bench(*args: str | Path, timeout: float = 80, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeflow", "bench", *map(str, args)],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def results(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def best_point(data: dict[str, Any]) -> dict[str, Any]:
    return next(point for point in data["points"] if point["label"] == data["best"])


@pytest.mark.timeout(60)
def test_q8_pool_sizes_table_json_png_and_start_up_named(tmp_path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    out, png = tmp_path / "q8.json", tmp_path / "q8.png"
    done = bench("configs/pool_sizes.yaml", *QUICK, "--output", out, "--plot", png)
    assert done.returncode == 0, done.stderr
    for label in ("workers=2", "workers=4", "workers=8"):
        assert label in done.stdout
    assert "pool start" in done.stdout and "items/s" in done.stdout
    data = results(out)
    assert [point["params"] for point in data["points"]] == [
        {"stages.square.workers": 2},
        {"stages.square.workers": 4},
        {"stages.square.workers": 8},
    ]
    assert data["results_identical"] is True
    for point in data["points"]:
        assert point["items"] == 10
        assert point["pool_start_s"] > 0
        assert point["stages"][0]["serialise_s"] is not None
        assert point["workers_rss_total_mb"] > 0
        assert point["slowest_stage"] == "square"
    recommendation = data["recommendation"]
    # ten squares cannot pay for a pool: said as start-up dominating the wall time, or,
    # where start-up is quick (a warm forkserver) and the load picks a bigger pool by a
    # hair, as work too small to pay for more workers
    assert "too small to pay for" in recommendation
    assert "too small to pay for" in done.stdout
    pixels = image.imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600
    assert pixels.std() > 0.05  # drawn on, not a blank canvas


@pytest.mark.timeout(180)  # a grid of whole runs
def test_cpu_heavy_recommends_processes(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    # threads against processes at 2 workers, median of 3: the machine may be shared
    done = bench(
        "configs/cpu_heavy.yaml",
        *("--matrix", "stages.collatz.kind=thread,process", "--repeat", "3", "--warmup", "0"),
        *("--output", out),
    )
    assert done.returncode == 0, done.stderr
    data = results(out)
    thread, process = data["points"]
    moving = process["wall_s"]["median"] - process["pool_start_s"] - process["pool_stop_s"]
    cores = thread["parent_cpu_s"] / moving  # the CPU work, over the time processes took
    if best_point(data)["kind"] != "process" and cores < 1.4:
        pytest.skip(f"other load left the 2 processes {cores:.1f} cores: no speed-up to see")
    assert best_point(data)["kind"] == "process", data["recommendation"]
    assert "Use processes:" in data["recommendation"], data["recommendation"]
    # the reason "CPU-bound" comes from the thread point's parent burning half a core or
    # more: other load on the machine can leave it less than that
    thread_cores = thread["parent_cpu_s"] / thread["wall_s"]["median"]
    if thread_cores < 0.5:
        pytest.skip(f"other load left the thread point {thread_cores:.2f} cores")
    assert "Use processes: the stage is CPU-bound" in data["recommendation"]


@pytest.mark.timeout(60)
def test_io_heavy_recommends_threads_and_writes_csv(tmp_path: Path) -> None:
    out = tmp_path / "io.csv"
    done = bench("configs/io_heavy.yaml", *QUICK, "--output", out)
    assert done.returncode == 0, done.stderr
    assert "Use threads: the work mostly waits (I/O)" in done.stdout
    with out.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["point"] for row in rows] == [
        "kind=thread workers=4",
        "kind=thread workers=16",
        "kind=process workers=4",
        "kind=process workers=16",
    ]
    assert {row["stage_name"] for row in rows} == {"fetch"}
    fastest = max(rows, key=lambda row: float(row["items_per_s"]))
    assert fastest["stage_kind"] == "thread"


@pytest.mark.parametrize(
    ("matrix", "expected"),
    [
        ("stages.square.workers", "--matrix stages.square.workers: write --matrix PATH=V1,V2"),
        ("stages.square.workers=2,", "--matrix stages.square.workers=2,: write --matrix"),
        ("stages.sqare.workers=1,2", "no stage named 'sqare'"),
        ("stages.square.workers=0,2", "--matrix stages.square.workers=0"),
    ],
)
def test_bad_matrix_is_one_line_and_exit_2(matrix: str, expected: str) -> None:
    done = bench("configs/pool_sizes.yaml", "--matrix", matrix, timeout=30)
    assert done.returncode == 2
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_points_with_different_outputs_are_named_and_exit_1(tmp_path: Path) -> None:
    out = tmp_path / "differ.json"
    done = bench(
        "configs/squares.yaml",
        *QUICK,
        "--set",
        "stages.square.kind=thread",
        "--matrix",
        "source.range.stop=4,5",
        "--output",
        out,
        timeout=30,
    )
    assert done.returncode == 1, done.stderr
    assert "Results differ between points (output hash): stop=5" in done.stdout
    assert results(out)["differing_points"] == ["stop=5"]


def test_plot_without_matplotlib_is_one_line_and_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "matplotlib"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    done = bench("configs/pool_sizes.yaml", "--plot", tmp_path / "x.png", PYTHONPATH=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == "--plot needs matplotlib: pip install 'pipeflow[plot]'"
    assert not (tmp_path / "x.png").exists()


def test_run_ignores_the_bench_section_and_the_schema_checks_it(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "pipeflow", "run", "configs/pool_sizes.yaml", "-q"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == [str(n * n) for n in range(1, 11)]
    config = tmp_path / "typo.yaml"
    text = (ROOT / "configs/pool_sizes.yaml").read_text().replace("repeat: 3", "repeats: 3")
    config.write_text(text)
    done = bench(config, timeout=30)
    assert done.returncode == 2
    assert "bench.repeats: unknown key 'repeats', did you mean 'repeat'?" in done.stderr


def test_output_in_a_folder_that_does_not_exist_creates_it(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir" / "bench.json"
    done = bench(
        "configs/squares.yaml",
        *QUICK,
        "--matrix",
        "stages.square.kind=thread",
        "--output",
        out,
    )
    assert done.returncode == 0, done.stderr
    assert [point["label"] for point in results(out)["points"]] == ["kind=thread"]


def test_output_that_is_a_folder_is_refused_before_any_run(tmp_path: Path) -> None:
    done = bench(
        "configs/squares.yaml",
        *QUICK,
        "--matrix",
        "stages.square.kind=thread",
        "--output",
        tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"--output {tmp_path}: is a directory; give a file path"
    assert done.stdout == ""  # no point was run
