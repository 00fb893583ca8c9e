"""pipeflow against what users would pick instead: the same workloads, in the same run.

Run from the repository root:

    python benchmarks/run.py                     # every workload, about 2-3 minutes
    python benchmarks/run.py --quick             # a short smoke version of each
    python benchmarks/run.py --only trivial,cpu  # some workloads
    python benchmarks/run.py --json out.json     # also write every figure as JSON

Walls are steady-state: process and thread pools are created and warmed before the clock
starts, for peers and pipeflow alike (pipeflow's pool start-up, which its report measures,
is subtracted and shown apart as `setup s`). The `cli` workload measures start-up end to
end. A peer that is not installed (mpire, pypeln) shows as n/a and its targets are n/a.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import workloads  # noqa: E402

import pipeflow  # noqa: E402

PROCESS_WORKERS = 2
IO_WORKERS = 64
WORKLOADS = ("trivial", "cpu", "io", "mix", "memory", "cli")

# Items per workload: (full, quick). Slow peers run a prefix of the items (their items/s
# is what is compared), so that the whole suite stays within a few minutes.
SIZES = {
    "trivial": (1_000_000, 100_000),
    "trivial_mpire": (300_000, 100_000),
    "trivial_pypeln": (10_000, 3_000),
    "cpu": (400, 40),
    "io": (2_000, 500),
    "io_serial": (100, 20),
    "mix": (1_000, 200),
    "memory_small": (1_000_000, 100_000),
    "memory_large": (10_000_000, 1_000_000),
}
CLI_REPEATS = (5, 2)


def has(module: str) -> bool:
    """Whether an optional peer library is importable."""
    return importlib.util.find_spec(module) is not None


# --- results ------------------------------------------------------------------------------


@dataclass
class Row:
    """One runner's figures on one workload."""

    workload: str
    runner: str
    items: int | None = None
    wall_s: float | None = None
    setup_s: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def items_per_s(self) -> float | None:
        if self.items is None or not self.wall_s:
            return None
        return self.items / self.wall_s


@dataclass
class Target:
    """A target of issue 7, checked against this run's figures."""

    workload: str
    text: str
    value: float | None
    goal: float
    higher_is_better: bool
    unit: str = "x"
    info: bool = False  # shown for context, not one of the issue's targets

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        if self.info:
            return "info"
        ok = self.value >= self.goal if self.higher_is_better else self.value <= self.goal
        return "met" if ok else "MISSED"

    @property
    def margin(self) -> str:
        if self.value is None:
            return "peer not installed"
        gap = self.value / self.goal - 1
        met = gap >= 0 if self.higher_is_better else gap <= 0
        side = "above" if gap >= 0 else "below"
        return f"{abs(gap) * 100:.0f}% {side} goal, {'met' if met else 'missed'}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def best_of(repeat: int, measure: Callable[[], Row]) -> Row:
    """The run with the shortest wall out of `repeat`."""
    rows = [measure() for _ in range(repeat)]
    return min(rows, key=lambda r: r.wall_s if r.wall_s is not None else math.inf)


def unavailable(workload: str, runner: str, module: str) -> Row:
    return Row(workload, runner, note=f"n/a ({module} not installed)")


# --- runners ------------------------------------------------------------------------------


def run_pipeflow(
    workload: str, runner: str, stages: list[Any], items: Iterable[Any], n: int, note: str = ""
) -> Row:
    """A pipeflow pipeline over `items`, results counted and dropped (no sink)."""
    pipeline = pipeflow.Pipeline(stages)
    started = time.perf_counter()
    report = pipeline.run_sync(items)
    total = time.perf_counter() - started
    assert report.items_written == n, (report.items_written, n)
    setup = sum(s.pool_start_s for s in report.stages)
    calls = sum(s.calls for s in report.stages)
    return Row(
        workload,
        runner,
        n,
        total - setup,
        setup,
        extra={"with_setup_s": total, "executor_calls": calls},
        note=note,
    )


def run_serial(workload: str, fn: Callable[[Any], Any], n: int) -> Row:
    started = time.perf_counter()
    out = list(map(fn, range(n)))
    wall = time.perf_counter() - started
    assert len(out) == n
    return Row(workload, "serial Python", n, wall)


def run_pool_map(workload: str, fn: Callable[[Any], Any], n: int) -> Row:
    started = time.perf_counter()
    with multiprocessing.Pool(PROCESS_WORKERS) as pool:
        pool.map(workloads.square, range(PROCESS_WORKERS * 4))
        setup = time.perf_counter() - started
        started = time.perf_counter()
        out = pool.map(fn, range(n))
        wall = time.perf_counter() - started
    assert len(out) == n
    return Row(workload, "multiprocessing.Pool.map", n, wall, setup, note="automatic chunksize")


def auto_chunksize(n: int) -> int:
    """What Pool.map would choose: about 4 chunks per worker."""
    return max(1, math.ceil(n / (PROCESS_WORKERS * 4)))


def run_ppe_map(workload: str, fn: Callable[[Any], Any], n: int) -> Row:
    chunksize = auto_chunksize(n)
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(PROCESS_WORKERS) as ex:
        list(ex.map(workloads.square, range(PROCESS_WORKERS * 4)))
        setup = time.perf_counter() - started
        started = time.perf_counter()
        out = list(ex.map(fn, range(n), chunksize=chunksize))
        wall = time.perf_counter() - started
    assert len(out) == n
    return Row(workload, "ProcessPoolExecutor.map", n, wall, setup, note=f"chunksize={chunksize}")


def run_mpire(workload: str, fn: Callable[[Any], Any], n: int) -> Row:
    if not has("mpire"):
        return unavailable(workload, "mpire", "mpire")
    from mpire import WorkerPool

    started = time.perf_counter()
    with WorkerPool(n_jobs=PROCESS_WORKERS, keep_alive=True) as pool:
        pool.map(workloads.square, range(PROCESS_WORKERS * 4))
        setup = time.perf_counter() - started
        started = time.perf_counter()
        out = pool.map(fn, range(n))
        wall = time.perf_counter() - started
    assert len(out) == n
    return Row(
        workload, "mpire WorkerPool.map", n, wall, setup, note="default chunk_size, keep_alive"
    )


def run_pypeln_process(workload: str, fn: Callable[[Any], Any], n: int) -> Row:
    if not has("pypeln"):
        return unavailable(workload, "pypeln process.map", "pypeln")
    import pypeln as pl

    started = time.perf_counter()
    out = list(pl.process.map(fn, range(n), workers=PROCESS_WORKERS))
    wall = time.perf_counter() - started
    assert len(out) == n
    return Row(workload, "pypeln process.map", n, wall, note="incl. worker start, unordered")


# --- workloads ----------------------------------------------------------------------------


def bench_trivial(quick: bool) -> tuple[list[Row], list[Target]]:
    pick = 1 if quick else 0
    n = SIZES["trivial"][pick]
    w = "trivial"
    rows = [
        best_of(3, lambda: run_serial(w, workloads.square, n)),
        best_of(3, lambda: run_pool_map(w, workloads.square, n)),
        best_of(3, lambda: run_ppe_map(w, workloads.square, n)),
        run_mpire(w, workloads.square, SIZES["trivial_mpire"][pick]),
        run_pypeln_process(w, workloads.square, SIZES["trivial_pypeln"][pick]),
        best_of(
            3,
            lambda: run_pipeflow(
                w,
                "pipeflow process",
                [pipeflow.Stage(workloads.square, kind="process", workers=PROCESS_WORKERS)],
                range(n),
                n,
                note="batch: auto, ordered",
            ),
        ),
    ]
    for row in rows:
        if row.items is not None and row.items < n:
            row.note += f", first {row.items:,} items only"
    by = {r.runner: r for r in rows}
    pf, pool = by["pipeflow process"], by["multiprocessing.Pool.map"]
    mp = by["mpire WorkerPool.map"]
    for row in rows:
        row.extra["vs_pool_map"] = ratio(row.items_per_s, pool.items_per_s) or 0.0
    pool_total = (pool.wall_s or 0) + (pool.setup_s or 0)
    targets = [
        Target(
            w,
            "pipeflow process >= 0.5x Pool.map items/s",
            ratio(pf.items_per_s, pool.items_per_s),
            0.5,
            True,
        ),
        Target(
            w,
            "pipeflow process >= 10x mpire items/s",
            ratio(pf.items_per_s, mp.items_per_s),
            10.0,
            True,
        ),
        Target(
            w,
            "same, pool start-up included on both sides",
            ratio(pool_total, pf.extra["with_setup_s"]),
            0.5,
            True,
            info=True,
        ),
    ]
    return rows, targets


def bench_cpu(quick: bool) -> tuple[list[Row], list[Target]]:
    n = SIZES["cpu"][1 if quick else 0]
    w = "cpu"
    fn = workloads.cpu_heavy
    repeat = 1 if quick else 2
    rows = [
        best_of(repeat, lambda: run_serial(w, fn, n)),
        best_of(repeat, lambda: run_pool_map(w, fn, n)),
        best_of(repeat, lambda: run_ppe_map(w, fn, n)),
        best_of(repeat, lambda: run_mpire(w, fn, n)),
        run_pypeln_process(w, fn, n),
        best_of(
            repeat,
            lambda: run_pipeflow(
                w,
                "pipeflow process",
                [pipeflow.Stage(fn, kind="process", workers=PROCESS_WORKERS)],
                range(n),
                n,
                note="batch: auto, ordered",
            ),
        ),
    ]
    by = {r.runner: r for r in rows}
    serial, pool, pf = by["serial Python"], by["multiprocessing.Pool.map"], by["pipeflow process"]
    for row in rows:
        row.extra["speedup"] = ratio(serial.wall_s, row.wall_s) or 0.0
        row.extra["vs_pool_map"] = ratio(row.items_per_s, pool.items_per_s) or 0.0
    targets = [
        Target(
            w,
            "pipeflow speedup over serial >= 1.8x (2 workers)",
            ratio(serial.wall_s, pf.wall_s),
            1.8,
            True,
        ),
        Target(
            w,
            "pipeflow >= 0.95x Pool.map items/s",
            ratio(pf.items_per_s, pool.items_per_s),
            0.95,
            True,
        ),
    ]
    return rows, targets


def run_threads(w: str, n: int) -> Row:
    with concurrent.futures.ThreadPoolExecutor(IO_WORKERS) as ex:
        list(ex.map(workloads.io_sleep, range(IO_WORKERS)))  # start every thread
        started = time.perf_counter()
        out = list(ex.map(workloads.io_sleep, range(n)))
        wall = time.perf_counter() - started
    assert len(out) == n
    return Row(w, "ThreadPoolExecutor.map", n, wall, note=f"{IO_WORKERS} threads")


def run_asyncio(w: str, n: int) -> Row:
    async def main() -> list[int]:
        semaphore = asyncio.Semaphore(IO_WORKERS)

        async def one(x: int) -> int:
            async with semaphore:
                return await workloads.io_sleep_async(x)

        return await asyncio.gather(*(one(x) for x in range(n)))

    started = time.perf_counter()
    out = asyncio.run(main())
    wall = time.perf_counter() - started
    assert len(out) == n
    return Row(w, "asyncio + Semaphore", n, wall, note=f"{IO_WORKERS} concurrent, gather")


def run_pypeln_io(w: str, n: int, mode: str) -> Row:
    name = f"pypeln {mode}.map"
    if not has("pypeln"):
        return unavailable(w, name, "pypeln")
    import pypeln as pl

    fn = workloads.io_sleep if mode == "thread" else workloads.io_sleep_async
    started = time.perf_counter()
    out = list(getattr(pl, mode).map(fn, range(n), workers=IO_WORKERS))
    wall = time.perf_counter() - started
    assert len(out) == n
    return Row(w, name, n, wall, note=f"{IO_WORKERS} workers, unordered")


def run_mpire_threads(w: str, n: int) -> Row:
    if not has("mpire"):
        return unavailable(w, "mpire threading", "mpire")
    from mpire import WorkerPool

    with WorkerPool(n_jobs=IO_WORKERS, start_method="threading", keep_alive=True) as pool:
        pool.map(workloads.io_sleep, range(IO_WORKERS))
        started = time.perf_counter()
        out = pool.map(workloads.io_sleep, range(n))
        wall = time.perf_counter() - started
    assert len(out) == n
    return Row(w, "mpire threading", n, wall, note=f"{IO_WORKERS} threads, default chunk_size")


def bench_io(quick: bool) -> tuple[list[Row], list[Target]]:
    pick = 1 if quick else 0
    n = SIZES["io"][pick]
    w = "io"
    ideal = n * workloads.IO_SLEEP_S / IO_WORKERS
    repeat = 1 if quick else 3
    rows = [
        run_serial(w, workloads.io_sleep, SIZES["io_serial"][pick]),
        best_of(repeat, lambda: run_threads(w, n)),
        best_of(repeat, lambda: run_asyncio(w, n)),
        best_of(repeat, lambda: run_mpire_threads(w, n)),
        best_of(repeat, lambda: run_pypeln_io(w, n, "thread")),
        best_of(repeat, lambda: run_pypeln_io(w, n, "task")),
        best_of(
            repeat,
            lambda: run_pipeflow(
                w,
                "pipeflow thread",
                [pipeflow.Stage(workloads.io_sleep, kind="thread", workers=IO_WORKERS)],
                range(n),
                n,
                note=f"{IO_WORKERS} threads",
            ),
        ),
        best_of(
            repeat,
            lambda: run_pipeflow(
                w,
                "pipeflow async",
                [pipeflow.Stage(workloads.io_sleep_async, kind="async", workers=IO_WORKERS)],
                range(n),
                n,
                note=f"{IO_WORKERS} tasks",
            ),
        ),
    ]
    rows[0].note = f"first {rows[0].items} items only"
    ideal_rate = n / ideal
    for row in rows:
        # wall over ideal, normalised by items so the serial prefix compares too
        rate = row.items_per_s
        row.extra["vs_ideal"] = ideal_rate / rate if rate else 0.0
    by = {r.runner: r for r in rows}
    targets = [
        Target(
            w,
            f"pipeflow thread wall <= 1.15x ideal ({ideal:.3f} s)",
            ratio(by["pipeflow thread"].wall_s, ideal),
            1.15,
            False,
        ),
        Target(
            w,
            f"pipeflow async wall <= 1.15x ideal ({ideal:.3f} s)",
            ratio(by["pipeflow async"].wall_s, ideal),
            1.15,
            False,
        ),
    ]
    return rows, targets


def run_chained(w: str, n: int) -> Row:
    """What a user would write by hand: thread map -> Pool.imap -> thread map, streaming."""
    with (
        concurrent.futures.ThreadPoolExecutor(IO_WORKERS) as fetch,
        multiprocessing.Pool(PROCESS_WORKERS) as pool,
        concurrent.futures.ThreadPoolExecutor(IO_WORKERS) as store,
    ):
        list(fetch.map(workloads.io_sleep, range(IO_WORKERS)))
        list(store.map(workloads.io_sleep, range(IO_WORKERS)))
        pool.map(workloads.square, range(PROCESS_WORKERS * 4))
        started = time.perf_counter()
        fetched = fetch.map(workloads.io_sleep, range(n))
        computed = pool.imap(workloads.cpu_mix, fetched)
        out = list(store.map(workloads.io_sleep, computed))
        wall = time.perf_counter() - started
    assert len(out) == n
    return Row(w, "threads -> Pool.imap -> threads", n, wall, note="chained by hand, streaming")


def run_pypeln_mix(w: str, n: int) -> Row:
    if not has("pypeln"):
        return unavailable(w, "pypeln thread|process|thread", "pypeln")
    import pypeln as pl

    started = time.perf_counter()
    stage = pl.thread.map(workloads.io_sleep, range(n), workers=IO_WORKERS)
    stage = pl.process.map(workloads.cpu_mix, stage, workers=PROCESS_WORKERS)
    stage = pl.thread.map(workloads.io_sleep, stage, workers=IO_WORKERS)
    out = list(stage)
    wall = time.perf_counter() - started
    assert len(out) == n
    return Row(w, "pypeln thread|process|thread", n, wall, note="incl. worker start")


def bench_mix(quick: bool) -> tuple[list[Row], list[Target]]:
    n = SIZES["mix"][1 if quick else 0]
    w = "mix"
    serial_cpu = run_serial(w, workloads.cpu_mix, n)
    serial_cpu.runner = "serial Python (CPU stage only)"
    io_ideal = n * workloads.IO_SLEEP_S / IO_WORKERS
    cpu_ideal = serial_cpu.wall_s / PROCESS_WORKERS  # type: ignore[operator]
    ideal = max(io_ideal, cpu_ideal)
    stages = [
        pipeflow.Stage(workloads.io_sleep, name="fetch", kind="thread", workers=IO_WORKERS),
        pipeflow.Stage(workloads.cpu_mix, name="compute", kind="process", workers=PROCESS_WORKERS),
        pipeflow.Stage(workloads.io_sleep, name="store", kind="thread", workers=IO_WORKERS),
    ]
    # the mix varies by up to 1.7x from run to run on 2 cores (GIL contention between
    # 128 I/O threads, the event loop and 2 busy workers): best of 2
    repeat = 1 if quick else 2
    rows = [
        serial_cpu,
        best_of(repeat, lambda: run_chained(w, n)),
        run_pypeln_mix(w, n),
        best_of(
            repeat,
            lambda: run_pipeflow(
                w,
                "pipeflow thread|process|thread",
                stages,
                range(n),
                n,
                note="batch: auto, ordered",
            ),
        ),
    ]
    for row in rows:
        row.extra["vs_ideal"] = ratio(row.wall_s, ideal) or 0.0
    rows[0].extra["vs_ideal"] = 0.0
    rows[0].note = f"ideal {ideal:.3f} s = max(I/O {io_ideal:.3f}, CPU {cpu_ideal:.3f})"
    targets = [
        Target(
            w,
            f"pipeflow wall <= 1.2x ideal ({ideal:.3f} s, CPU-bound stage)",
            ratio(rows[-1].wall_s, ideal),
            1.2,
            False,
        ),
    ]
    return rows, targets


def memory_child(runner: str, n: int) -> None:
    """In a fresh interpreter: stream `n` items, then print this process's peak RSS."""
    started = time.perf_counter()
    if runner == "pipeflow":
        pipeline = pipeflow.Pipeline(
            [pipeflow.Stage(workloads.square, kind="process", workers=PROCESS_WORKERS)]
        )
        report = pipeline.run_sync(range(n))
        assert report.items_written == n
    else:
        count = 0
        with multiprocessing.Pool(PROCESS_WORKERS) as pool:
            for _ in pool.imap(workloads.square, range(n), chunksize=10_000):
                count += 1
        assert count == n
    wall = time.perf_counter() - started
    print(json.dumps({"peak_rss_mb": peak_rss_kb() / 1024, "wall_s": wall}))


def peak_rss_kb() -> int:
    """This process's peak RSS in KiB.

    VmHWM first: on Linux, ru_maxrss survives exec, so a child started by a large
    harness would report the harness's size at fork time rather than its own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_memory(runner: str, n: int) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory-child", runner, str(n)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_DIR,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return data["peak_rss_mb"], data["wall_s"]


def bench_memory(quick: bool) -> tuple[list[Row], list[Target]]:
    pick = 1 if quick else 0
    small, large = SIZES["memory_small"][pick], SIZES["memory_large"][pick]
    w = "memory"
    rows = []
    growth: dict[str, float] = {}
    for runner, label, note in (
        ("pipeflow", "pipeflow process", "batch: auto"),
        ("pool-imap", "multiprocessing.Pool.imap", "chunksize=10000"),
    ):
        rss = {}
        for n in (small, large):
            peak, wall = measure_memory(runner, n)
            rss[n] = peak
            rows.append(Row(w, label, n, wall, extra={"peak_rss_mb": peak}, note=note))
        growth[runner] = rss[large] / rss[small]
        rows[-1].extra["rss_vs_small"] = growth[runner]
    targets = [
        Target(
            w,
            f"pipeflow peak RSS at {large:,} <= 1.2x that at {small:,}",
            growth["pipeflow"],
            1.2,
            False,
        ),
    ]
    return rows, targets


PIPELINE_10 = (
    "import sys; sys.path.insert(0, 'benchmarks'); import pipeflow, workloads; "
    "pipeflow.Pipeline([pipeflow.Stage(workloads.square, kind='process', workers=2)])"
    ".run_sync(range(10))"
)


def time_command(argv: list[str], repeats: int) -> tuple[float, list[float]]:
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(
            argv, check=True, cwd=REPO_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        walls.append(time.perf_counter() - started)
    return statistics.median(walls), walls


def bench_cli(quick: bool) -> tuple[list[Row], list[Target]]:
    repeats = CLI_REPEATS[1 if quick else 0]
    w = "cli"
    commands: list[tuple[str, list[str] | None, str]] = [
        ('python -c "pass"', [sys.executable, "-c", "pass"], "interpreter start-up"),
        ('python -c "import pipeflow"', [sys.executable, "-c", "import pipeflow"], ""),
        (
            "python -c <10-item process pipeline>",
            [sys.executable, "-c", PIPELINE_10],
            "Pipeline([Stage(square, kind='process', workers=2)]).run_sync(range(10))",
        ),
    ]
    script = Path(sys.executable).parent / "pipeflow"
    config = REPO_DIR / "configs" / "squares.yaml"
    if config.exists() and script.exists() and has("pipeflow._cli"):
        commands.append(
            (
                "pipeflow run configs/squares.yaml",
                [str(script), "run", "configs/squares.yaml"],
                "stdout sink",
            )
        )
    else:
        commands.append(
            (
                "pipeflow run configs/squares.yaml",
                None,
                "n/a (no configs/squares.yaml or no CLI yet)",
            )
        )
    rows = []
    for label, argv, note in commands:
        if argv is None:
            rows.append(Row(w, label, note=note))
            continue
        median, walls = time_command(argv, repeats)
        rows.append(
            Row(
                w,
                label,
                10,
                median,
                extra={"min_s": min(walls)},
                note=f"median of {repeats}; {note}".rstrip("; "),
            )
        )
    base = rows[0].wall_s
    for row in rows:
        row.extra["above_python_s"] = (row.wall_s - base) if row.wall_s and base else 0.0
    above = rows[2].extra["above_python_s"]
    targets = [
        Target(
            w,
            "10-item process pipeline, s above `python -c pass` < 1.0 s",
            above,
            1.0,
            False,
            unit="s",
        )
    ]
    if rows[3].wall_s is not None:
        targets.append(
            Target(
                w,
                "pipeflow run configs/squares.yaml, s above python < 1.0 s",
                rows[3].extra["above_python_s"],
                1.0,
                False,
                unit="s",
            )
        )
    return rows, targets


BENCHES: dict[str, Callable[[bool], tuple[list[Row], list[Target]]]] = {
    "trivial": bench_trivial,
    "cpu": bench_cpu,
    "io": bench_io,
    "mix": bench_mix,
    "memory": bench_memory,
    "cli": bench_cli,
}
TITLES = {
    "trivial": "trivial map: square over {n} ints, process pools of 2 (ratio: items/s vs Pool.map)",
    "cpu": "CPU-heavy: {n} items of ~3 ms pure Python, 2 processes (ratio: speedup over serial)",
    "io": "I/O-bound: {n} items of 5 ms sleep, 64 threads/tasks (ratio: wall vs ideal)",
    "mix": "3-stage mix: {n} items, 5 ms I/O -> ~1.5 ms CPU -> 5 ms I/O (ratio: wall vs ideal)",
    "memory": "memory: parent peak RSS streaming squares, fresh interpreter per run",
    "cli": "command line: a 10-item pipeline with a process stage, end to end",
}
RATIO_KEY = {
    "trivial": "vs_pool_map",
    "cpu": "speedup",
    "io": "vs_ideal",
    "mix": "vs_ideal",
    "memory": "rss_vs_small",
    "cli": "above_python_s",
}


# --- output -------------------------------------------------------------------------------


def print_table(name: str, rows: list[Row], quick: bool) -> None:
    n = SIZES.get(name, (0, 0))[1 if quick else 0]
    print(f"\n== {TITLES[name].format(n=f'{n:,}')} ==")
    key = RATIO_KEY[name]
    if name == "memory":
        print(
            f"{'runner':34} {'items':>11} {'wall s':>8} {'peak RSS MB':>12} {'vs small':>9}  note"
        )
        for r in rows:
            print(
                f"{r.runner:34} {r.items or 0:>11,} {fmt(r.wall_s, '.3f'):>8} "
                f"{fmt(r.extra.get('peak_rss_mb'), '.1f'):>12} "
                f"{fmt(r.extra.get(key), '.2f') if key in r.extra else '':>9}  {r.note}"
            )
        return
    label = {
        "vs_pool_map": "vs Pool",
        "speedup": "speedup",
        "vs_ideal": "vs ideal",
        "above_python_s": "+python s",
    }[key]
    print(
        f"{'runner':34} {'items':>9} {'wall s':>8} {'setup s':>8} {'items/s':>12} {label:>9}  note"
    )
    for r in rows:
        value = r.extra.get(key)
        shown = fmt(value, ".3f" if key == "above_python_s" else ".3g") if value else "n/a"
        if key == "above_python_s" and r is rows[0] and r.wall_s is not None:
            shown = "0"
        print(
            f"{r.runner:34} {fmt(r.items, ',') if r.items else 'n/a':>9} "
            f"{fmt(r.wall_s, '.3f'):>8} {fmt(r.setup_s, '.3f') if r.setup_s else '':>8} "
            f"{fmt(r.items_per_s, ',.0f') if name != 'cli' else '':>12} {shown:>9}  {r.note}"
        )


def print_targets(targets: list[Target]) -> None:
    print("\n== targets (issue 7) ==")
    for t in targets:
        print(
            f"[{t.status:>6}] {t.workload:8} {t.text:62} "
            f"{fmt(t.value, '.2f')}{t.unit if t.value is not None else ''} "
            f"(goal {'>=' if t.higher_is_better else '<='} {t.goal:g}{t.unit}; {t.margin})"
        )


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pipeflow": pipeflow.__version__,
        "commit": commit or "unknown",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated workloads: {', '.join(WORKLOADS)}")
    parser.add_argument("--quick", action="store_true", help="a short smoke version of each")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    parser.add_argument("--memory-child", nargs=2, metavar=("RUNNER", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return 0
    chosen = WORKLOADS if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = [c for c in chosen if c not in BENCHES]
    if unknown:
        parser.error(
            f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}"
        )
    info = machine()
    print(
        f"pipeflow {info['pipeflow']} ({info['commit']}) | Python {info['python']} | "
        f"{info['cpus']} CPUs "
        f"{info['cpu_model']} | {'quick' if args.quick else 'full'} run"
    )
    if args.quick:
        print("quick run: sizes too small for the targets to mean much (smoke test only)")
    missing = [m for m in ("mpire", "pypeln") if not has(m)]
    if missing:
        print(
            f"peers not installed (shown as n/a): {', '.join(missing)}; pip install -e '.[bench]'"
        )
    all_rows: list[Row] = []
    all_targets: list[Target] = []
    started = time.perf_counter()
    for name in chosen:
        rows, targets = BENCHES[name](args.quick)
        print_table(name, rows, args.quick)
        all_rows += rows
        all_targets += targets
    print_targets(all_targets)
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    if args.json:
        data = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": info,
            "quick": args.quick,
            "rows": [asdict(r) | {"items_per_s": r.items_per_s} for r in all_rows],
            "targets": [asdict(t) | {"status": t.status, "margin": t.margin} for t in all_targets],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
