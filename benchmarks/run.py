"""pipeflow against what users would write instead: same workloads, interleaved rounds, ratios.

Run from the repository root:

    python benchmarks/run.py                       # every workload, 3 rounds
    python benchmarks/run.py --quick               # small sizes, a smoke test of the harness
    python benchmarks/run.py --only async,large    # some workloads
    python benchmarks/run.py --rounds 5 --json out.json

Method: each workload runs its contenders in rounds; round r runs them in an order rotated
by r, so that no contender always runs first or last. Every ratio is computed between two
contenders of the same round, and reported as the median and min-max over the rounds. The
load average is printed at the start and end of each workload: on a shared machine, absolute
figures move with the load and only the within-round ratios are worth comparing.

Walls are steady-state unless the workload says otherwise: a peer's pool is created and
warmed before its clock starts, and pipeflow's pool start-up (`pool_start_s` in its report)
is subtracted; `stream()` gives no report, so a stream contender has the last pool start-up
measured for that kind subtracted. The `startup` workload measures start-up end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime
import functools
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import workloads as wl  # noqa: E402

import pipeflow  # noqa: E402

PROCESS_WORKERS = 2
IO_WORKERS = 64
ASYNC_LIMIT = 16
THREADS = 4
FORKSERVER = multiprocessing.get_context("forkserver")

Figures = dict[str, float]
# (full, quick) sizes
SIZES: dict[str, tuple[int, int]] = {
    "async": (10_000, 1_000),
    "chain": (10_000, 1_000),
    "chain_alone": (100_000, 10_000),
    "large": (2_000, 100),
    "sha": (4_000, 400),
    "slow": (1_000, 200),
    "trivial": (1_000_000, 100_000),
    "dask": (100_000, 10_000),
    "io": (2_000, 500),
    "gil": (200, 20),
    "cpu": (400, 40),
    "memory_small": (1_000_000, 100_000),
    "memory_large": (10_000_000, 1_000_000),
    "bound": (200, 20),
}
LARGE_ITEM = wl.MIB
SHA_ITEM = 64 * wl.KIB
GIL_ITEM = 256 * wl.KIB
SLOW_INTERVAL_S = 0.001
SHA_CHUNKSIZES = (1, 8, 32, 128)
TRIVIAL_CHUNKSIZES = (1_000, 10_000)

QUICK = False
# pool start-up last measured per kind, for contenders without a report (stream())
LAST_POOL_START: dict[str, float] = {}


def size(name: str) -> int:
    return SIZES[name][1 if QUICK else 0]


def has(module: str) -> bool:
    """Whether an optional peer library is importable."""
    return importlib.util.find_spec(module) is not None


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- pipeflow contenders ------------------------------------------------------------------


def pf_run(
    stages: list[pipeflow.Stage], source: Any, n: int, sink: Any = None, note_kind: str = ""
) -> Figures:
    """`Pipeline.run_sync(source)`; wall without pool start-up, which is reported apart."""
    pipeline = pipeflow.Pipeline(stages, sink=sink)
    started = time.perf_counter()
    report = pipeline.run_sync(source)
    total = time.perf_counter() - started
    assert report.items_written == n, (report.items_written, n)
    setup = sum(s.pool_start_s for s in report.stages)
    for s in report.stages:
        if s.pool_start_s:
            LAST_POOL_START[s.kind] = s.pool_start_s
    return {
        "wall_s": total - setup,
        "setup_s": setup,
        "calls": float(sum(s.calls for s in report.stages)),
    }


def pf_stream(stages: list[pipeflow.Stage], source: Any, n: int, kinds: tuple[str, ...]) -> Figures:
    """`async with pipeline.stream(source)`, every result consumed by an `async for`."""
    pipeline = pipeflow.Pipeline(stages)

    async def consume() -> int:
        count = 0
        async with pipeline.stream(source) as results:
            async for _ in results:
                count += 1
        return count

    started = time.perf_counter()
    count = asyncio.run(consume())
    total = time.perf_counter() - started
    assert count == n, (count, n)
    setup = sum(LAST_POOL_START.get(k, 0.0) for k in kinds)
    return {"wall_s": total - setup, "setup_s": setup}


def jsonl_sink() -> tuple[Any, Path]:
    path = Path(tempfile.mkstemp(prefix="pipeflow-bench-", suffix=".jsonl")[1])
    return pipeflow.JsonlSink(path), path


def pf_jsonl(stages: list[pipeflow.Stage], source: Any, n: int) -> Figures:
    """`run_sync` into a real file sink (a jsonl file)."""
    sink, path = jsonl_sink()
    try:
        figures = pf_run(stages, source, n, sink=sink)
        with path.open("rb") as f:
            lines = sum(1 for _ in f)
        assert lines == n, (lines, n)
    finally:
        path.unlink(missing_ok=True)
    return figures


def process_stage(fn: Callable[..., Any], name: str = "p") -> pipeflow.Stage:
    return pipeflow.Stage(fn, name=name, kind="process", workers=PROCESS_WORKERS)


def thread_stage(fn: Callable[..., Any], workers: int = THREADS, name: str = "t") -> pipeflow.Stage:
    return pipeflow.Stage(fn, name=name, kind="thread", workers=workers)


def async_stage(
    fn: Callable[..., Any], workers: int = ASYNC_LIMIT, name: str = "a"
) -> pipeflow.Stage:
    return pipeflow.Stage(fn, name=name, kind="async", workers=workers)


# --- peer contenders ----------------------------------------------------------------------


def warm_pool(workers: int = PROCESS_WORKERS) -> Any:
    pool = FORKSERVER.Pool(workers)
    pool.map(wl.square, range(workers * 4))
    return pool


def pool_map(fn: Callable[..., Any], n: int) -> Figures:
    """`Pool.map(fn, range(n))`, automatic chunksize, as its docs advise for a known list."""
    with warm_pool() as pool:
        started = time.perf_counter()
        out = pool.map(fn, range(n))
        wall = time.perf_counter() - started
    assert len(out) == n
    return {"wall_s": wall}


def pool_imap(
    fn: Callable[..., Any], source: Any, n: int, chunksize: int, out: Any = None
) -> Figures:
    """`Pool.imap(fn, source, chunksize)`: the streaming form, results written as they come."""
    with warm_pool() as pool:
        started = time.perf_counter()
        count = 0
        for value in pool.imap(fn, source, chunksize=chunksize):
            if out is not None:
                out.write(json.dumps(value) + "\n")
            count += 1
        wall = time.perf_counter() - started
    assert count == n
    return {"wall_s": wall}


def pool_imap_jsonl(fn: Callable[..., Any], source: Any, n: int, chunksize: int) -> Figures:
    fd, name = tempfile.mkstemp(prefix="pipeflow-bench-", suffix=".jsonl")
    os.close(fd)
    try:
        with open(name, "w") as f:
            return pool_imap(fn, source, n, chunksize, out=f)
    finally:
        os.unlink(name)


def thread_pool_map(fn: Callable[..., Any], source: Any, n: int, workers: int) -> Figures:
    """`ThreadPoolExecutor.map`, threads started before the clock."""
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        list(ex.map(wl.identity, range(workers * 2)))
        started = time.perf_counter()
        out = list(ex.map(fn, source))
        wall = time.perf_counter() - started
    assert len(out) == n
    return {"wall_s": wall}


def queue_chain(fn: Callable[..., Any], n: int, stages: int, tasks: int = 1) -> Figures:
    """Hand-written asyncio: `tasks` tasks per stage joined by `asyncio.Queue(100)`."""
    done = object()

    async def main() -> int:
        queues = [asyncio.Queue[Any](100) for _ in range(stages + 1)]

        async def feed() -> None:
            for x in wl.ints(n):
                await queues[0].put(x)
            for _ in range(tasks):
                await queues[0].put(done)

        async def work(inq: asyncio.Queue[Any], outq: asyncio.Queue[Any]) -> None:
            while True:
                x = await inq.get()
                if x is done:
                    await outq.put(done)
                    return
                await outq.put(await fn(x))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(feed())
            for s in range(stages):
                for _ in range(tasks):
                    tg.create_task(work(queues[s], queues[s + 1]))
            count, ends = 0, 0
            while ends < tasks:
                x = await queues[-1].get()
                if x is done:
                    ends += 1
                else:
                    count += 1
        return count

    started = time.perf_counter()
    count = asyncio.run(main())
    wall = time.perf_counter() - started
    assert count == n
    return {"wall_s": wall}


def aiostream_chain(fn: Callable[..., Any], n: int, stages: int) -> Figures:
    """aiostream: `stream.iterate(source) | pipe.map(fn, task_limit=16)` per stage."""
    from aiostream import pipe, stream

    async def main() -> int:
        xs: Any = stream.iterate(wl.ints(n))
        for _ in range(stages):
            xs = xs | pipe.map(fn, task_limit=ASYNC_LIMIT)
        count = 0
        async with xs.stream() as items:
            async for _ in items:
                count += 1
        return count

    started = time.perf_counter()
    count = asyncio.run(main())
    wall = time.perf_counter() - started
    assert count == n
    return {"wall_s": wall}


def asyncio_gather(fn: Callable[..., Any], n: int, limit: int) -> Figures:
    """asyncio + `Semaphore(limit)` + gather, as the asyncio docs' examples do."""

    async def main() -> list[Any]:
        semaphore = asyncio.Semaphore(limit)

        async def one(x: int) -> Any:
            async with semaphore:
                return await fn(x)

        return await asyncio.gather(*(one(x) for x in range(n)))

    started = time.perf_counter()
    out = asyncio.run(main())
    wall = time.perf_counter() - started
    assert len(out) == n
    return {"wall_s": wall}


# --- child processes: peak RSS of a contender's whole process tree ------------------------


def child_figures(kind: str, contender: str, n: int) -> Figures:
    """Run inside a fresh interpreter by `--child`; the parent samples its process tree."""
    if kind == "large":
        if contender == "pipeflow":
            return pf_jsonl([process_stage(wl.nbytes)], wl.blobs(n, LARGE_ITEM), n)
        return pool_imap_jsonl(wl.nbytes, wl.blobs(n, LARGE_ITEM), n, chunksize=2)
    if kind == "memory":
        return pf_run([process_stage(wl.square)], wl.ints(n), n)
    raise ValueError(f"unknown child workload {kind}")


def tree_rss(proc: Any) -> int:
    """RSS of a process and all its descendants (forkserver workers are grandchildren)."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def in_child(kind: str, contender: str, n: int) -> Figures:
    """A contender in a fresh interpreter, its tree's peak RSS sampled every 10 ms."""
    import psutil

    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", kind, contender, str(n)],
        cwd=REPO_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc = psutil.Process(child.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, tree_rss(proc))
            except psutil.NoSuchProcess:
                return
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = child.communicate()
    stop.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"child {kind}/{contender} failed:\n{err}")
    figures: Figures = json.loads(out.strip().splitlines()[-1])
    figures["peak_rss_mb"] = peak / wl.MIB
    return figures


# --- workloads ----------------------------------------------------------------------------


@dataclass
class Target:
    """A goal checked on each round's figures; its median over the rounds decides."""

    text: str
    value: Callable[[dict[str, Figures]], float | None]
    goal: float
    higher_is_better: bool
    unit: str = "x"
    info: bool = False  # context, not one of the targets


@dataclass
class Workload:
    """Contenders run in rotated rounds, the figures they show, the targets they check."""

    name: str
    title: str
    contenders: list[tuple[str, Callable[[], Figures]]]
    targets: list[Target]
    show: list[tuple[str, str, str]]  # (figure key, column label, format)
    notes: list[str] = field(default_factory=list)
    warm: Callable[[], None] | None = None


def per_item(figures: Figures, n: int, stages: int = 1) -> Figures:
    figures["us_per_item"] = figures["wall_s"] / n / stages * 1e6
    return figures


def mb_per_s(figures: Figures, total_bytes: int) -> Figures:
    figures["mb_per_s"] = total_bytes / wl.MIB / figures["wall_s"]
    return figures


def r(a: str, b: str, key: str = "wall_s") -> Callable[[dict[str, Figures]], float | None]:
    """figures[a][key] / figures[b][key] within one round (None if either is missing)."""

    def value(fig: dict[str, Figures]) -> float | None:
        if a not in fig or b not in fig or not fig[b].get(key):
            return None
        return fig[a][key] / fig[b][key]

    return value


def best_of(names: list[str], key: str, higher: bool) -> Callable[[dict[str, Figures]], float]:
    """The best figure among some contenders of the same round (a tuned peer's best setting)."""

    def value(fig: dict[str, Figures]) -> float:
        values = [fig[n][key] for n in names if n in fig]
        return max(values) if higher else min(values)

    return value


def warm_process() -> None:
    """Start a forkserver and measure a process pool's start-up once before the rounds."""
    pf_run([process_stage(wl.square)], range(100), 100)


def w_async() -> Workload:
    n, stages = size("async"), 2
    inc = wl.inc_async
    pf = [async_stage(inc, name="a1"), async_stage(inc, name="a2")]
    contenders = [
        ("pipeflow async x2, stream()", lambda: per_item(pf_stream(pf, wl.ints(n), n, ()), n, 2)),
        ("pipeflow async x2, run_sync", lambda: per_item(pf_run(pf, wl.ints(n), n), n, 2)),
        ("asyncio.Queue(100) chain", lambda: per_item(queue_chain(inc, n, stages), n, 2)),
    ]
    if has("aiostream"):
        contenders.append(
            ("aiostream pipe.map x2", lambda: per_item(aiostream_chain(inc, n, stages), n, 2))
        )
    stream = "pipeflow async x2, stream()"
    return Workload(
        "async",
        f"async stage, trivial coroutine: {n:,} items from a generator through 2 stages "
        f"({ASYNC_LIMIT} concurrent)",
        contenders,
        [
            Target(
                "pipeflow stream(): us per item per stage",
                lambda f: f[stream]["us_per_item"],
                3,
                False,
                " us",
            ),
            Target(
                "pipeflow stream() vs asyncio.Queue chain (wall)",
                r(stream, "asyncio.Queue(100) chain"),
                3,
                False,
            ),
            Target(
                "pipeflow stream() vs aiostream (wall)",
                r(stream, "aiostream pipe.map x2"),
                1,
                False,
                info=True,
            ),
        ],
        [("wall_s", "wall s", ".3f"), ("us_per_item", "us/item/stage", ".2f")],
        ["asyncio.Queue chain: one task per stage (order kept), Queue(100) between stages"],
    )


def w_chain() -> Workload:
    n, m = size("chain"), size("chain_alone")
    full = [
        async_stage(wl.inc_async, name="a"),
        process_stage(wl.square, name="p"),
        thread_stage(wl.identity, name="t"),
    ]
    alone = full[1:]
    return Workload(
        "chain",
        f"async({ASYNC_LIMIT}) -> process x{PROCESS_WORKERS} -> thread x{THREADS}: {n:,} small "
        f"items from a generator; process -> thread alone: {m:,} items",
        [
            ("pipeflow async->process->thread", lambda: per_item(pf_run(full, wl.ints(n), n), n)),
            ("pipeflow process->thread", lambda: per_item(pf_run(alone, wl.ints(m), m), m)),
        ],
        [
            Target(
                "async->process->thread vs process->thread alone (us per item)",
                r("pipeflow async->process->thread", "pipeflow process->thread", "us_per_item"),
                2,
                False,
            )
        ],
        [("wall_s", "wall s", ".3f"), ("us_per_item", "us/item", ".2f"), ("calls", "calls", ".0f")],
        [
            "the issue's table used 1,000,000 items; fewer here keep the run bounded; the "
            "reference runs more items so that its wall is not mostly start and ramp-up"
        ],
        warm=warm_process,
    )


def w_large() -> Workload:
    n = size("large")
    total = n * LARGE_ITEM

    def one(contender: str) -> Figures:
        return mb_per_s(in_child("large", contender, n), total)

    pf, imap = "pipeflow process, batch auto", "Pool.imap(chunksize=2)"
    return Workload(
        "large",
        f"large items: {n:,} x 1 MiB through {PROCESS_WORKERS} processes, results to a jsonl file, "
        "each run in a fresh interpreter",
        [(pf, lambda: one("pipeflow")), (imap, lambda: one("pool"))],
        [
            Target("MB/s vs Pool.imap(chunksize=2)", r(pf, imap, "mb_per_s"), 0.9, True),
            Target(
                "peak RSS (parent + children) vs Pool.imap", r(pf, imap, "peak_rss_mb"), 2, False
            ),
        ],
        [
            ("wall_s", "wall s", ".3f"),
            ("mb_per_s", "MB/s", ".0f"),
            ("peak_rss_mb", "peak RSS MB", ".0f"),
        ],
        [
            "peak RSS: sum over the child's process tree (forkserver and workers included), "
            "sampled every 10 ms with psutil"
        ],
    )


def w_sha() -> Workload:
    n = size("sha")
    total = n * SHA_ITEM
    pf = "pipeflow process, batch auto"
    contenders: list[tuple[str, Callable[[], Figures]]] = [
        (
            pf,
            lambda: mb_per_s(
                pf_jsonl([process_stage(wl.sha256_hex)], wl.blobs(n, SHA_ITEM), n), total
            ),
        ),
    ]
    imaps = []
    for c in SHA_CHUNKSIZES:
        name = f"Pool.imap(chunksize={c})"
        imaps.append(name)
        contenders.append(
            (
                name,
                lambda c=c: mb_per_s(
                    pool_imap_jsonl(wl.sha256_hex, wl.blobs(n, SHA_ITEM), n, c), total
                ),
            )
        )
    best = best_of(imaps, "mb_per_s", True)
    return Workload(
        "sha",
        f"64 KiB items: sha256 of {n:,} x 64 KiB on {PROCESS_WORKERS} processes, "
        "digests to a jsonl file",
        contenders,
        [
            Target(
                "MB/s vs Pool.imap with its best chunksize in the round",
                lambda f: f[pf]["mb_per_s"] / best(f),
                0.9,
                True,
            )
        ],
        [("wall_s", "wall s", ".3f"), ("mb_per_s", "MB/s", ".0f"), ("calls", "calls", ".0f")],
        warm=warm_process,
    )


def latency_pipeflow(n: int) -> Figures:
    emitted: list[float] = []
    received: list[float] = []
    pipeline = pipeflow.Pipeline([thread_stage(wl.identity)])

    async def consume() -> None:
        async with pipeline.stream(wl.paced(n, SLOW_INTERVAL_S, emitted)) as results:
            async for _ in results:
                received.append(time.perf_counter())

    started = time.perf_counter()
    asyncio.run(consume())
    return latency_figures(started, emitted, received, n)


def latency_executor(n: int) -> Figures:
    """A `run_in_executor` loop: each item handed to a thread pool as it arrives."""
    emitted: list[float] = []
    received: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(THREADS) as ex:
            for x in wl.paced(n, SLOW_INTERVAL_S, emitted):
                await loop.run_in_executor(ex, wl.identity, x)
                received.append(time.perf_counter())

    started = time.perf_counter()
    asyncio.run(main())
    return latency_figures(started, emitted, received, n)


def latency_figures(started: float, emitted: list[float], received: list[float], n: int) -> Figures:
    assert len(received) == n == len(emitted)
    lat = sorted((b - a) * 1e3 for a, b in zip(emitted, received, strict=True))
    return {
        "wall_s": received[-1] - started,
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "first_ms": (received[0] - started) * 1e3,
    }


def w_latency() -> Workload:
    n, m = size("slow"), size("trivial")
    pf, loop = "pipeflow thread, stream()", "run_in_executor loop"
    pfmap, pmap = "pipeflow process map, run_sync(range)", "Pool.map"
    return Workload(
        "latency",
        f"latency: a source yielding 1 item/ms ({n:,} items) through an identity thread stage; "
        f"and in the same rounds the trivial process map over {m:,} ints",
        [
            (pf, lambda: latency_pipeflow(n)),
            (loop, lambda: latency_executor(n)),
            (pfmap, lambda: pf_run([process_stage(wl.square)], range(m), m)),
            (pmap, lambda: pool_map(wl.square, m)),
        ],
        [
            Target("p50 latency vs run_in_executor loop", r(pf, loop, "p50_ms"), 2, False),
            Target(
                "p99 latency vs run_in_executor loop", r(pf, loop, "p99_ms"), 2, False, info=True
            ),
            Target(
                "time to first result vs run_in_executor loop",
                r(pf, loop, "first_ms"),
                2,
                False,
                info=True,
            ),
            Target(
                "trivial process map items/s vs Pool.map (same rounds)", r(pmap, pfmap), 0.95, True
            ),
        ],
        [
            ("wall_s", "wall s", ".3f"),
            ("p50_ms", "p50 ms", ".2f"),
            ("p99_ms", "p99 ms", ".2f"),
            ("first_ms", "first ms", ".2f"),
        ],
        warm=warm_process,
    )


def w_trivial() -> Workload:
    n = size("trivial")
    p = [process_stage(wl.square)]
    contenders: list[tuple[str, Callable[[], Figures]]] = [
        ("pipeflow run_sync(range)", lambda: per_item(pf_run(p, range(n), n), n)),
        ("pipeflow run_sync(generator)", lambda: per_item(pf_run(p, wl.ints(n), n), n)),
        (
            "pipeflow stream(generator)",
            lambda: per_item(pf_stream(p, wl.ints(n), n, ("process",)), n),
        ),
        ("pipeflow generator -> jsonl file", lambda: per_item(pf_jsonl(p, wl.ints(n), n), n)),
        ("Pool.map(range)", lambda: per_item(pool_map(wl.square, n), n)),
    ]
    imaps = []
    for c in TRIVIAL_CHUNKSIZES:
        name = f"Pool.imap(generator, chunksize={c}) -> jsonl"
        imaps.append(name)
        contenders.append(
            (name, lambda c=c: per_item(pool_imap_jsonl(wl.square, wl.ints(n), n, c), n))
        )
    best = best_of(imaps, "wall_s", False)
    pm = "Pool.map(range)"
    return Workload(
        "trivial",
        f"trivial process map: square over {n:,} ints, {PROCESS_WORKERS} processes, on the paths "
        "users take",
        contenders,
        [
            Target(
                "run_sync(range) items/s vs Pool.map", r(pm, "pipeflow run_sync(range)"), 0.95, True
            ),
            Target(
                "run_sync(generator) items/s vs Pool.map",
                r(pm, "pipeflow run_sync(generator)"),
                0.95,
                True,
                info=True,
            ),
            Target(
                "stream(generator) items/s vs Pool.map",
                r(pm, "pipeflow stream(generator)"),
                0.95,
                True,
                info=True,
            ),
            Target(
                "generator -> jsonl items/s vs best Pool.imap -> jsonl",
                lambda f: best(f) / f["pipeflow generator -> jsonl file"]["wall_s"],
                0.95,
                True,
                info=True,
            ),
            Target(
                "generator vs range, pipeflow (wall)",
                r("pipeflow run_sync(generator)", "pipeflow run_sync(range)"),
                1.2,
                False,
                info=True,
            ),
        ],
        [("wall_s", "wall s", ".3f"), ("us_per_item", "us/item", ".3f"), ("calls", "calls", ".0f")],
        warm=warm_process,
    )


POOL_ONE_LINER = (
    "import multiprocessing as mp\n"
    "from pipelines.squares import square\n"
    "with mp.get_context('forkserver').Pool(2) as pool: print(pool.map(square, range(1, 11)))\n"
)
API_ONE_LINER = (
    "import pipeflow\n"
    "from pipelines.squares import square\n"
    "pipeflow.Pipeline([pipeflow.Stage(square, kind='process', workers=2)],"
    " sink=pipeflow.StdoutSink()).run_sync(range(1, 11))\n"
)


def timed_command(argv: list[str]) -> Figures:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO_DIR, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0 or "100" not in done.stdout:
        raise RuntimeError(f"{argv} failed ({done.returncode}):\n{done.stderr}")
    return {"wall_s": wall}


def compile_sources() -> None:
    """Write the bytecode of pipeflow and the example functions, as installing a wheel
    does: with PYTHONDONTWRITEBYTECODE set (or a read-only checkout) an editable install
    would compile every module of pipeflow again in each fresh interpreter, which no
    installed copy does, while the peers' modules (the standard library) come compiled."""
    import compileall

    for folder in (REPO_DIR / "src" / "pipeflow", REPO_DIR / "pipelines"):
        compileall.compile_dir(folder, quiet=1)


def w_startup() -> Workload:
    config = BENCH_DIR / "squares2.yaml"
    script = Path(sys.executable).parent / "pipeflow"
    cli, api, pool = "pipeflow run (2 processes)", "Python API one-liner", "forkserver Pool(2).map"
    return Workload(
        "startup",
        "start-up: 10 squares on 2 processes, end to end in a fresh interpreter",
        [
            (cli, lambda: timed_command([str(script), "run", str(config)])),
            (api, lambda: timed_command([sys.executable, "-c", API_ONE_LINER])),
            (pool, lambda: timed_command([sys.executable, "-c", POOL_ONE_LINER])),
            ("python -c 'print(100)'", lambda: timed_command([sys.executable, "-c", "print(100)"])),
        ],
        [
            Target("pipeflow run vs forkserver Pool(2).map one-liner", r(cli, pool), 2, False),
            Target("Python API vs forkserver Pool(2).map one-liner", r(api, pool), 1.5, False),
        ],
        [("wall_s", "wall s", ".3f")],
        ["pipeflow's modules are compiled to bytecode first, as an installed wheel's are"],
        warm=compile_sources,
    )


def w_dask() -> Workload:
    n = size("dask")
    if not has("distributed"):
        return Workload(
            "dask", "kind: dask", [], [], [], ["skipped: dask[distributed] not installed"]
        )
    dask, proc = "pipeflow kind: dask", "pipeflow kind: process"
    return Workload(
        "dask",
        f"dask: square over {n:,} ints on a 2-worker LocalCluster vs a 2-process stage",
        [
            (
                dask,
                lambda: pf_run(
                    [pipeflow.Stage(wl.square, kind="dask", workers=PROCESS_WORKERS)], wl.ints(n), n
                ),
            ),
            (proc, lambda: pf_run([process_stage(wl.square)], wl.ints(n), n)),
        ],
        [Target("kind: dask vs kind: process (wall)", r(dask, proc), 2, False)],
        [
            ("wall_s", "wall s", ".3f"),
            ("setup_s", "pool start s", ".2f"),
            ("calls", "calls", ".0f"),
        ],
        ["walls without pool start-up (the cluster start is shown apart)"],
        warm=warm_process,
    )


def w_io() -> Workload:
    n = size("io")
    ideal = n * wl.IO_SLEEP_S / IO_WORKERS

    def vs_ideal(figures: Figures) -> Figures:
        figures["vs_ideal"] = figures["wall_s"] / ideal
        return figures

    contenders: list[tuple[str, Callable[[], Figures]]] = [
        (
            "pipeflow thread x64",
            lambda: vs_ideal(pf_run([thread_stage(wl.io_sleep, IO_WORKERS)], wl.ints(n), n)),
        ),
        (
            "pipeflow async x64",
            lambda: vs_ideal(pf_run([async_stage(wl.io_sleep_async, IO_WORKERS)], wl.ints(n), n)),
        ),
        (
            "ThreadPoolExecutor(64).map",
            lambda: vs_ideal(thread_pool_map(wl.io_sleep, wl.ints(n), n, IO_WORKERS)),
        ),
        (
            "asyncio Semaphore(64) + gather",
            lambda: vs_ideal(asyncio_gather(wl.io_sleep_async, n, IO_WORKERS)),
        ),
    ]
    if has("pypeln"):
        import pypeln as pl

        def pypeln_io(mode: str) -> Figures:
            fn = wl.io_sleep if mode == "thread" else wl.io_sleep_async
            started = time.perf_counter()
            out = list(getattr(pl, mode).map(fn, wl.ints(n), workers=IO_WORKERS))
            figures = {"wall_s": time.perf_counter() - started}
            assert len(out) == n
            return vs_ideal(figures)

        contenders += [
            ("pypeln thread.map(64)", lambda: pypeln_io("thread")),
            ("pypeln task.map(64)", lambda: pypeln_io("task")),
        ]
    return Workload(
        "io",
        f"I/O: {n:,} items of 5 ms sleep, {IO_WORKERS} threads or tasks; ideal {ideal:.3f} s",
        contenders,
        [
            Target(
                "thread stage wall vs ideal",
                lambda f: f["pipeflow thread x64"]["vs_ideal"],
                1.1,
                False,
            ),
            Target(
                "async stage wall vs ideal",
                lambda f: f["pipeflow async x64"]["vs_ideal"],
                1.1,
                False,
            ),
            Target(
                "ThreadPoolExecutor.map wall vs ideal",
                lambda f: f["ThreadPoolExecutor(64).map"]["vs_ideal"],
                1.1,
                False,
                info=True,
            ),
            Target(
                "thread stage vs ThreadPoolExecutor.map (wall)",
                r("pipeflow thread x64", "ThreadPoolExecutor(64).map"),
                1.1,
                False,
                info=True,
            ),
            Target(
                "async stage vs asyncio Semaphore + gather (wall)",
                r("pipeflow async x64", "asyncio Semaphore(64) + gather"),
                1.1,
                False,
                info=True,
            ),
        ],
        [("wall_s", "wall s", ".3f"), ("vs_ideal", "vs ideal", ".2f")],
    )


def w_gil() -> Workload:
    n = size("gil")
    fn = wl.digest_and_compress
    pf, tpe = f"pipeflow thread x{THREADS}", f"ThreadPoolExecutor({THREADS}).map"

    def serial() -> Figures:
        started = time.perf_counter()
        out = list(map(fn, wl.blobs(n, GIL_ITEM)))
        assert len(out) == n
        return {"wall_s": time.perf_counter() - started}

    return Workload(
        "gil",
        f"GIL-releasing work on threads: sha256 + zlib of {n:,} x 256 KiB",
        [
            (pf, lambda: pf_run([thread_stage(fn)], wl.blobs(n, GIL_ITEM), n)),
            (tpe, lambda: thread_pool_map(fn, wl.blobs(n, GIL_ITEM), n, THREADS)),
            ("serial", serial),
        ],
        [
            Target("thread stage items/s vs ThreadPoolExecutor.map", r(tpe, pf), 0.9, True),
            Target("thread stage speedup over serial", r("serial", pf), 1.5, True, info=True),
        ],
        [("wall_s", "wall s", ".3f")],
        ["goal 0.9x is this benchmark's, the issue names the workload without a figure"],
    )


def w_cpu() -> Workload:
    n = size("cpu")
    fn = wl.cpu_heavy
    contenders: list[tuple[str, Callable[[], Figures]]] = [
        ("pipeflow process x2", lambda: pf_run([process_stage(fn)], wl.ints(n), n)),
        ("Pool.map", lambda: pool_map(fn, n)),
    ]
    if has("mpire"):

        def mpire_map() -> Figures:
            from mpire import WorkerPool

            with WorkerPool(
                n_jobs=PROCESS_WORKERS, start_method="forkserver", keep_alive=True
            ) as pool:
                pool.map(wl.square, range(8))
                started = time.perf_counter()
                out = pool.map(fn, range(n))
                wall = time.perf_counter() - started
            assert len(out) == n
            return {"wall_s": wall}

        contenders.append(("mpire WorkerPool.map", mpire_map))
    return Workload(
        "cpu",
        f"CPU-heavy: {n:,} items of ~3 ms pure Python, {PROCESS_WORKERS} processes",
        contenders,
        [Target("pipeflow items/s vs Pool.map", r("Pool.map", "pipeflow process x2"), 0.95, True)],
        [("wall_s", "wall s", ".3f"), ("calls", "calls", ".0f")],
        warm=warm_process,
    )


def w_memory() -> Workload:
    small, large = size("memory_small"), size("memory_large")
    a, b = f"pipeflow {small:,} items", f"pipeflow {large:,} items"
    return Workload(
        "memory",
        f"memory: square over a generator of {small:,} vs {large:,} ints on {PROCESS_WORKERS} "
        "processes, no sink, peak RSS of the whole process tree",
        [
            (a, lambda: in_child("memory", "pipeflow", small)),
            (b, lambda: in_child("memory", "pipeflow", large)),
        ],
        [Target(f"peak RSS at {large:,} vs at {small:,}", r(b, a, "peak_rss_mb"), 1.2, False)],
        [("wall_s", "wall s", ".3f"), ("peak_rss_mb", "peak RSS MB", ".0f")],
    )


def pf_end_to_end(stages: list[pipeflow.Stage], n: int) -> Figures:
    """`run_sync(range(n))`, timed whole: pool start-up and data loading included."""
    started = time.perf_counter()
    report = pipeflow.Pipeline(stages).run_sync(range(n))
    wall = time.perf_counter() - started
    assert report.items_written == n, (report.items_written, n)
    return {"wall_s": wall, "calls": float(sum(s.calls for s in report.stages))}


def pool_imap_initializer(n: int) -> Figures:
    """`Pool(initializer=...)` that loads the table in each worker, then `imap`, timed
    whole like the pipeflow contenders."""
    started = time.perf_counter()
    with FORKSERVER.Pool(PROCESS_WORKERS, initializer=wl.init_table) as pool:
        count = sum(1 for _ in pool.imap(wl.look_up_initialized, range(n), chunksize=1))
    wall = time.perf_counter() - started
    assert count == n
    return {"wall_s": wall, "calls": float(n)}


def w_bound() -> Workload:
    n = size("bound")
    table = wl.bound_table()
    bound = functools.partial(wl.look_up, table)

    def stage(fn: Callable[..., Any], **kwargs: Any) -> pipeflow.Stage:
        return pipeflow.Stage(fn, kind="process", workers=PROCESS_WORKERS, batch=1, **kwargs)

    partial_name = "pipeflow partial(look_up, 20 MB table)"
    setup_name = "pipeflow setup loads the table"
    pool_name = "Pool(initializer loads the table).imap(chunksize=1)"
    contenders: list[tuple[str, Callable[[], Figures]]] = [
        (partial_name, lambda: pf_end_to_end([stage(bound)], n)),
        (
            setup_name,
            lambda: pf_end_to_end([stage(wl.look_up_in_state, setup=wl.bound_table)], n),
        ),
        (pool_name, lambda: pool_imap_initializer(n)),
    ]
    return Workload(
        "bound",
        f"a process stage's callable bound to a 20 MB table (functools.partial), {n} items "
        f"in {n} calls, {PROCESS_WORKERS} processes, timed whole (pool start and loading "
        "included)",
        contenders,
        [
            Target("partial vs setup (wall)", r(partial_name, setup_name), 2.0, False),
            Target(
                "partial vs Pool.imap with an initializer (wall)",
                r(partial_name, pool_name),
                2.0,
                False,
                info=True,
            ),
        ],
        [("wall_s", "wall s", ".3f"), ("calls", "calls", ".0f")],
        warm=warm_process,
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "async": w_async,
    "chain": w_chain,
    "large": w_large,
    "sha": w_sha,
    "latency": w_latency,
    "trivial": w_trivial,
    "startup": w_startup,
    "dask": w_dask,
    "io": w_io,
    "gil": w_gil,
    "cpu": w_cpu,
    "memory": w_memory,
    "bound": w_bound,
}


# --- rounds and output --------------------------------------------------------------------


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def spread(values: list[float], spec: str) -> str:
    if not values:
        return "n/a"
    return (
        f"{format(median(values), spec)} ({format(min(values), spec)}-{format(max(values), spec)})"
    )


def evaluate(target: Target, rounds: list[dict[str, Figures]]) -> dict[str, Any]:
    values = []
    for fig in rounds:
        try:
            v = target.value(fig)
        except KeyError:
            v = None
        if v is not None:
            values.append(v)
    result: dict[str, Any] = {
        "text": target.text,
        "goal": target.goal,
        "higher_is_better": target.higher_is_better,
        "unit": target.unit,
        "info": target.info,
        "rounds": values,
    }
    if not values:
        result.update(median=None, min=None, max=None, status="n/a", margin="")
        return result
    m = median(values)
    met = m >= target.goal if target.higher_is_better else m <= target.goal
    off = target.goal / m if target.higher_is_better else m / target.goal
    result.update(
        median=m,
        min=min(values),
        max=max(values),
        status=("info " if target.info else "") + ("met" if met else "MISSED"),
        margin="" if met else f"{off:.2f}x off the goal",
    )
    return result


def target_line(workload: str, t: dict[str, Any]) -> str:
    unit = t["unit"]
    goal = f"{'>=' if t['higher_is_better'] else '<='} {t['goal']:g}{unit}"
    if t["median"] is None:
        measured = "n/a"
    else:
        measured = (
            f"median {t['median']:.3g}{unit} (min-max {t['min']:.3g}-{t['max']:.3g}, "
            f"{len(t['rounds'])} rounds)"
        )
    line = f"[{t['status']:>11}] {workload:8} {t['text']}: {measured}; goal {goal} {t['margin']}"
    return line.rstrip()


def run_workload(w: Workload, rounds: int) -> dict[str, Any]:
    print(f"\n== {w.name}: {w.title} ==")
    for note in w.notes:
        print(f"   note: {note}")
    start_load = load()
    print(f"   load average at start: {start_load}")
    started = time.perf_counter()
    if w.warm is not None and w.contenders:
        w.warm()
    per_round: list[dict[str, Figures]] = []
    for k in range(rounds):
        order = (
            w.contenders[k % len(w.contenders) :] + w.contenders[: k % len(w.contenders)]
            if w.contenders
            else []
        )
        figures: dict[str, Figures] = {}
        for name, run in order:
            figures[name] = run()
        per_round.append(figures)
        print(f"   round {k + 1}: order {', '.join(n for n, _ in order)}", flush=True)
    if w.contenders:
        header = f"   {'contender':46}" + "".join(f" {label:>28}" for _, label, _ in w.show)
        print(header)
        for name, _ in w.contenders:
            cells = []
            for key, _, spec in w.show:
                values = [fig[name][key] for fig in per_round if key in fig[name]]
                cells.append(f" {spread(values, spec):>28}")
            print(f"   {name:46}" + "".join(cells))
    end_load = load()
    elapsed = time.perf_counter() - started
    print(f"   load average at end: {end_load}; {elapsed:.1f} s")
    targets = [evaluate(t, per_round) for t in w.targets]
    for t in targets:
        print("   " + target_line(w.name, t))
    return {
        "title": w.title,
        "notes": w.notes,
        "load_start": start_load,
        "load_end": end_load,
        "elapsed_s": elapsed,
        "rounds": per_round,
        "targets": targets,
    }


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pipeflow": pipeflow.__version__,
        "commit": commit or "unknown",
    }


def main(argv: list[str] | None = None) -> int:
    global QUICK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated workloads: {', '.join(WORKLOADS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    parser.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="NAME=N",
        help=f"override an item count ({', '.join(SIZES)}); repeatable",
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("WORKLOAD", "CONTENDER", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        figures = child_figures(args.child[0], args.child[1], int(args.child[2]))
        print(json.dumps(figures))
        return 0
    QUICK = args.quick
    chosen = list(WORKLOADS) if not args.only else [s.strip() for s in args.only.split(",")]
    unknown = [c for c in chosen if c not in WORKLOADS]
    if unknown:
        parser.error(
            f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}"
        )
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    for item in args.size:
        name, _, count = item.partition("=")
        if name not in SIZES or not count.isdigit() or int(count) < 1:
            parser.error(f"--size {item}: expected NAME=N with NAME one of {', '.join(SIZES)}")
        SIZES[name] = (int(count), int(count))
    info = machine()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    print(
        f"pipeflow {info['pipeflow']} ({info['commit']}) | Python {info['python']} | "
        f"{info['cpus']} CPUs {info['cpu_model']} | {date} | "
        f"{'quick' if args.quick else 'full'} run, {args.rounds} rounds"
    )
    print(
        f"command: python benchmarks/run.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    print("ratios are within a round; median (min-max) over the rounds")
    if args.quick:
        print("quick run: sizes too small for the targets to mean much (smoke test only)")
    missing = [m for m in ("aiostream", "mpire", "pypeln", "psutil") if not has(m)]
    if missing:
        print(
            f"not installed (their rows are left out): {', '.join(missing)}; "
            "pip install -e '.[bench]'"
        )
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name in chosen:
        results[name] = run_workload(WORKLOADS[name](), args.rounds)
    elapsed = time.perf_counter() - started
    print("\n== targets ==")
    for name, result in results.items():
        for t in result["targets"]:
            print(target_line(name, t))
    print(f"\nelapsed {elapsed:.1f} s; load average now {load()}")
    if args.json:
        data = {
            "date": date,
            "machine": info,
            "quick": args.quick,
            "rounds": args.rounds,
            "elapsed_s": elapsed,
            "workloads": results,
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
