"""The example pipelines of `configs/`, each run through the real `pipeflow` command.

Every config gets an end-to-end run whose output is checked against the notebook's values
(squares, factorials) or a reference computed here without pipeflow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT))  # the example stage functions, as the command imports them

from pipelines import producer_consumer, stdlib_stats  # noqa: E402
from pipelines.slow_server import SlowServer  # noqa: E402

SQUARES = [n * n for n in range(1, 11)]
# Q7's output in the notebook, verbatim.
NOTEBOOK_FACTORIALS = """\
Factorial of 1 is 1
Factorial of 2 is 2
Factorial of 3 is 6
Factorial of 4 is 24
Factorial of 5 is 120
Factorial of 6 is 720
Factorial of 7 is 5040
Factorial of 8 is 40320
Factorial of 9 is 362880
Factorial of 10 is 3628800
"""


def pipeflow(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the command from the project's root, as the README does."""
    child_env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    return subprocess.run(
        [sys.executable, "-m", "pipeflow", *map(str, args)],
        cwd=ROOT,
        env={**child_env, **env},
        capture_output=True,
        text=True,
        timeout=50,
    )


def run_ok(config: str, *args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    done = pipeflow("run", CONFIGS / config, *args, **env)
    assert done.returncode == 0, done.stderr
    return done


def run_with_report(
    config: str, tmp_path: Path, *args: str | Path, **env: str
) -> tuple[str, dict[str, Any]]:
    report = tmp_path / f"{config}.report.json"
    done = run_ok(config, "--report", report, "--quiet", *args, **env)
    return done.stdout, json.loads(report.read_text())


def json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines()]


def load_config(config: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CONFIGS / config).read_text())
    return loaded


def stage(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in report["stages"] if s["name"] == name)


# --- every config ---

CHECKED = {
    "squares.yaml",
    "squares_dask.yaml",
    "squares_dask_tls.yaml",
    "pids.yaml",
    "producer_consumer.yaml",
    "shared_counter.yaml",
    "partial_sums.yaml",
    "errors_fail.yaml",
    "errors_skip.yaml",
    "errors_retry.yaml",
    "errors_dead_letter.yaml",
    "worker_crash.yaml",
    "factorial.yaml",
    "cpu_bound.yaml",
    "io_bound.yaml",
    "stdlib_stats.yaml",
}
OTHERS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name not in CHECKED)


@pytest.mark.timeout(240)  # a fresh interpreter per config
def test_every_config_validates() -> None:
    configs = sorted(CONFIGS.glob("*.yaml"))
    assert len(configs) >= len(CHECKED) - 2  # the dask ones aside, all of them are here
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda config: pipeflow("validate", config), configs))
    failed = {c.name: r.stderr for c, r in zip(configs, results, strict=True) if r.returncode}
    if importlib.util.find_spec("distributed") is None:
        # without the dask extra, a dask config is refused (exit 2) with the install hint
        for name in [n for n in failed if "dask" in n]:
            assert "pip install 'pipeflow[dask]'" in failed.pop(name), name
            results = [r for c, r in zip(configs, results, strict=True) if c.name != name]
            configs = [c for c in configs if c.name != name]
    assert not failed
    for config, result in zip(configs, results, strict=True):
        assert result.stdout.startswith(f"{config}: ok"), result.stdout


def test_the_checked_configs_exist() -> None:
    missing = sorted(name for name in CHECKED if not (CONFIGS / name).is_file())
    assert missing == [] or missing == ["squares_dask.yaml", "squares_dask_tls.yaml"]


@pytest.mark.parametrize(
    "config", OTHERS or [pytest.param(None, marks=pytest.mark.skip(reason="no other configs yet"))]
)
def test_configs_added_by_others_run(config: str, tmp_path: Path) -> None:
    """Configs without a dedicated check below run to the end and write what they read."""
    out, report = run_with_report(config, tmp_path)
    assert report["status"] == "ok"
    assert report["items_read"] > 0 and report["items_written"] > 0
    for each in report["stages"]:
        assert each["errors"] == each["skipped"] == each["dead_lettered"] == 0, each
    if "stdout" in load_config(config)["sink"]:
        assert len(out.splitlines()) == report["items_written"]


# --- Q2, Q8: squares on a process pool, at several pool sizes ---


def test_squares_match_the_notebook() -> None:
    done = run_ok("squares.yaml")
    assert done.stdout.split() == [str(n) for n in SQUARES]


@pytest.mark.parametrize("workers", [2, 4, 8])
def test_squares_at_each_pool_size_of_q8(workers: int, tmp_path: Path) -> None:
    out, report = run_with_report(
        "squares.yaml", tmp_path, "--set", f"stages.square.workers={workers}"
    )
    assert json_lines(out) == SQUARES
    assert stage(report, "square")["workers"] == workers
    assert report["wall_s"] > 0


def test_squares_on_dask_match_the_notebook() -> None:
    pytest.importorskip("distributed", reason="the dask extra is not installed")
    assert json_lines(run_ok("squares_dask.yaml", "--quiet").stdout) == SQUARES


def test_squares_on_a_tls_dask_cluster_match_the_notebook() -> None:
    pytest.importorskip("distributed", reason="the dask extra is not installed")
    pytest.importorskip("cryptography", reason="the dask extra is not installed")
    assert json_lines(run_ok("squares_dask_tls.yaml", "--quiet").stdout) == SQUARES


# --- Q3: which process handled which item ---


def test_each_job_reports_the_pid_that_ran_it(tmp_path: Path) -> None:
    out, report = run_with_report("pids.yaml", tmp_path)
    lines = out.splitlines()
    assert len(lines) == 15
    parsed = [re.fullmatch(r"Process (\d+) - Number: (\d)", line) for line in lines]
    assert all(parsed), lines
    jobs = [parsed[i : i + 5] for i in range(0, 15, 5)]
    for job in jobs:  # one job's five lines come from one process, in order
        assert [int(m.group(2)) for m in job] == [0, 1, 2, 3, 4]  # type: ignore[union-attr]
        assert len({m.group(1) for m in job}) == 1  # type: ignore[union-attr]
    pids = {m.group(1) for m in parsed}  # type: ignore[union-attr]
    by_worker = stage(report, "print_numbers")["by_worker"]
    assert {f"pid {pid}" for pid in pids} == set(by_worker)
    assert sum(by_worker.values()) == 3
    assert str(os.getpid()) not in pids  # workers, not the command's own process


# --- Q4: producer and consumer joined by a bounded queue ---


def test_every_number_added_is_removed_in_order_and_the_adder_waits(tmp_path: Path) -> None:
    out, report = run_with_report("producer_consumer.yaml", tmp_path)
    added = list(producer_consumer.numbers(count=10, seed=4))
    assert out.splitlines() == [f"Removed: {n}" for n in added]
    add = stage(report, "add")
    assert add["blocked_s"] > 0  # the remover's queue of one was full
    assert add["queue_high_water"] == add["queue_size"] == 1
    assert stage(report, "remove")["items_out"] == 10


# --- Q5: sharing data ---


def test_the_lock_makes_every_update_of_the_shared_tally_count() -> None:
    records = json_lines(run_ok("shared_counter.yaml", "--quiet").stdout)
    assert sorted(r["item"] for r in records) == list(range(1, 101))
    assert sorted(r["count"] for r in records) == list(range(1, 101))
    last = max(records, key=lambda r: r["count"])
    assert last["total"] == sum(range(1, 101)) == 5050


def test_partial_sums_from_processes_add_up_in_the_sink() -> None:
    lines = run_ok("partial_sums.yaml", "--quiet").stdout.splitlines()
    counts = [int(re.match(r"after (\d+) items", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert counts == sorted(counts) and counts[-1] == 1000
    assert len(lines) >= 10  # at most 100 numbers per partial result
    assert lines[-1] == f"after 1000 items: sum of squares {sum(n * n for n in range(1, 1001))}"


# --- Q6: exceptions and crashes ---


def test_fail_exits_1_with_the_item_and_the_worker_traceback() -> None:
    done = pipeflow("run", CONFIGS / "errors_fail.yaml")
    assert done.returncode == 1
    assert "stage 'divide', item 2 (0) failed: ZeroDivisionError: division by zero" in done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert 'pipelines/faults.py", line' in done.stderr and "return 10 / n" in done.stderr
    assert json_lines(done.stdout) == [10.0, 5.0][: len(done.stdout.split())]


def test_skip_drops_the_failing_item_and_counts_it(tmp_path: Path) -> None:
    out, report = run_with_report("errors_skip.yaml", tmp_path)
    assert json_lines(out) == [10.0, 5.0, 2.5, 2.0]
    divide = stage(report, "divide")
    assert (divide["items_in"], divide["items_out"], divide["skipped"]) == (5, 4, 1)


def test_retries_recover_from_a_failed_first_try(tmp_path: Path) -> None:
    out, report = run_with_report("errors_retry.yaml", tmp_path)
    assert json_lines(out) == [10 / n for n in (1, 2, 4, 5, 10)]
    divide = stage(report, "divide")
    assert (divide["retries"], divide["errors"]) == (5, 0)


def test_dead_letter_writes_the_failing_item_as_a_record(tmp_path: Path) -> None:
    dead = tmp_path / "dead.jsonl"
    out, report = run_with_report(
        "errors_dead_letter.yaml", tmp_path, "--set", f"dead_letter.jsonl={dead}"
    )
    assert json_lines(out) == [10.0, 5.0, 2.5, 2.0]
    [record] = json_lines(dead.read_text())
    assert record["stage"] == "divide" and record["index"] == 2 and record["item"] == 0
    assert record["error"] == "ZeroDivisionError" and record["attempts"] == 1
    assert "return 10 / n" in record["traceback"]
    assert stage(report, "divide")["dead_lettered"] == 1


def test_a_worker_process_that_dies_costs_only_its_own_item(tmp_path: Path) -> None:
    out, report = run_with_report("worker_crash.yaml", tmp_path)
    assert json_lines(out) == [n * n for n in range(1, 11) if n != 7]
    square = stage(report, "square")
    assert (square["crashed"], square["skipped"], square["items_out"]) == (1, 1, 9)


# --- Q7: factorials on a thread pool ---


def test_factorials_match_the_notebook() -> None:
    assert run_ok("factorial.yaml", "--quiet").stdout == NOTEBOOK_FACTORIALS


# --- Q1: CPU-bound and I/O-bound, on threads and on processes ---


def primes_below(limit: int) -> int:
    sieve = bytearray([1]) * limit
    sieve[:2] = b"\x00\x00"
    for n in range(2, int(limit**0.5) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytearray(len(range(n * n, limit, n)))
    return sum(sieve)


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_cpu_bound_counts_match_a_sieve(kind: str, tmp_path: Path) -> None:
    out, report = run_with_report(
        "cpu_bound.yaml", tmp_path, "--set", f"stages.count_primes.kind={kind}"
    )
    expected = [{"limit": n, "primes": primes_below(n)} for n in range(50000, 70000, 1000)]
    assert json_lines(out) == expected
    assert stage(report, "count_primes")["kind"] == kind


@pytest.fixture
def slow_server() -> Iterator[str]:
    server = SlowServer(port=0, delay=0.01)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_io_bound_fetches_every_item_from_a_real_server(
    kind: str, slow_server: str, tmp_path: Path
) -> None:
    out, report = run_with_report(
        "io_bound.yaml",
        tmp_path,
        "--set",
        f"stages.fetch.kind={kind}",
        SLOW_SERVER_URL=slow_server,
    )
    assert json_lines(out) == [{"n": n, "square": n * n} for n in range(40)]
    fetch = stage(report, "fetch")
    assert fetch["kind"] == kind and fetch["workers"] == 8


def test_io_bound_without_a_server_fails_naming_the_url(tmp_path: Path) -> None:
    with SlowServer(port=0) as server:  # a port that was free and is closed again
        url = f"http://127.0.0.1:{server.server_port}"
    done = pipeflow(
        "run",
        CONFIGS / "io_bound.yaml",
        "--quiet",
        "--set",
        "source.fn.kwargs.count=1",
        SLOW_SERVER_URL=url,
    )
    assert done.returncode == 1
    assert "URLError" in done.stderr and "Connection refused" in done.stderr


# --- a real-world pipeline on the standard library ---


def test_stdlib_stats_match_a_serial_script(tmp_path: Path) -> None:
    root = stdlib_stats.stdlib_root()
    subdir = "lib2to3" if (root / "lib2to3").is_dir() else "email"
    stats, errors = tmp_path / "stats.jsonl", tmp_path / "errors.jsonl"
    _, report = run_with_report(
        "stdlib_stats.yaml",
        tmp_path,
        "--set",
        f"source.fn.kwargs.subdir={subdir}",
        "--set",
        f"sink.jsonl={stats}",
        "--set",
        f"dead_letter.jsonl={errors}",
    )
    serial = list(stdlib_stats.serial_stats(subdir))
    assert len(serial) > 20
    assert json_lines(stats.read_text()) == serial
    every = list(stdlib_stats.python_files(subdir))
    rejected = sorted(set(every) - {record["path"] for record in serial})
    dead = json_lines(errors.read_text())
    assert sorted(record["item"]["path"] for record in dead) == rejected
    assert all(record["error"] == "SyntaxError" for record in dead)
    assert [s["kind"] for s in report["stages"]] == ["thread", "process"]
    assert report["items_read"] == len(every)
