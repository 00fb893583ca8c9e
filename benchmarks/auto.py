"""`kind: auto` and `workers: auto` against the grid of kinds x workers, in the same rounds.

Run from the repository root:

    python benchmarks/auto.py                     # every workload, 2 rounds
    python benchmarks/auto.py --quick             # small sizes: a smoke test of the harness
    python benchmarks/auto.py --only io,cpu --rounds 3 --json auto.json
    python benchmarks/auto.py --size io=4000,cpu=400   # other item counts

The default sizes give the best grid point of each workload 1-2 s on 2 cores: auto's
exploration is a fixed cost of a few windows, which a run of a fraction of a second
cannot hide (`--size` shows it).

Each workload runs every point of its grid (kind thread and process x workers 1, 2, 4, 8,
16, 32, 64; processes stop at the most a pool may have), the current default (`kind` left
out, `workers: 1`), `workers: auto` on threads and `kind: auto, workers: auto`, all
interleaved: round r runs them in an order rotated by r. Walls are end to end, pool start-up
and auto's exploration included. Reported per round and as the median over rounds: auto's
wall against the best grid point of the same round (the target: within 10 %) and against
the default.

A grid point that has run `CUT_AT` times as long as the quickest run of the workload so far
(a warm-up run of `auto` before the rounds sets the first) cannot be the best point: its
source stops there, and its wall is reported as a lower bound (`>`). The default is such a
point on most workloads; auto against it is then an upper bound (`<`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
os.chdir(BENCH_DIR)  # process workers import these modules by name from here

import workloads as wl  # noqa: E402

import pipeflow  # noqa: E402
from pipeflow._stage import max_processes  # noqa: E402

WORKERS = (1, 2, 4, 8, 16, 32, 64)
KINDS = ("thread", "process")
SHIFT_FAST_S = 0.002
SHIFT_SLOW_S = 0.010
# a grid point stops once it has run this many times the workload's quickest run so far
CUT_AT = 2.0


def shifting_io(x: int, half: int) -> int:
    """I/O whose latency changes mid-run: 2 ms per item for the first half, then 10 ms."""
    time.sleep(SHIFT_FAST_S if x < half else SHIFT_SLOW_S)
    return x


@dataclass(frozen=True)
class Workload:
    """Stages as (function, op) and a source maker; `n` items per run."""

    name: str
    fns: tuple[Callable[..., Any], ...]
    source: Callable[[int], Iterable[Any]]
    n: int
    quick_n: int


def _shifting(n: int) -> Callable[..., Any]:
    import functools

    return functools.partial(shifting_io, half=n // 2)


def workloads() -> list[Workload]:
    return [
        Workload("io", (wl.io_sleep,), range, 20_000, 200),
        Workload("io_shift", (), range, 12_000, 200),
        Workload("hash", (wl.sha256_hex,), lambda n: wl.blobs(n, 64 << 10), 32_000, 400),
        Workload("mix", (wl.io_sleep, wl.cpu_heavy, wl.io_sleep), range, 800, 60),
        Workload("cpu", (wl.cpu_heavy,), range, 1200, 60),
    ]


Point = tuple[str, Any, Any]  # label, kind, workers


def points() -> list[Point]:
    grid: list[Point] = []
    for kind in KINDS:
        for workers in WORKERS:
            if kind == "process" and workers > max_processes():
                continue
            grid.append((f"{kind} x{workers}", kind, workers))
    grid.append(("default", None, 1))
    grid.append(("thread auto", "thread", "auto"))
    grid.append(("auto", "auto", "auto"))
    return grid


def until(deadline: float, items: Iterable[Any]) -> Iterator[Any]:
    """`items` until the clock passes `deadline`."""
    for item in items:
        if time.perf_counter() > deadline:
            return
        yield item


def run_point(
    workload: Workload, n: int, kind: Any, workers: Any, limit_s: float = math.inf
) -> tuple[float, Any, bool]:
    """One run: its wall, its report, and whether it was cut at `limit_s`."""
    fns = workload.fns or (_shifting(n),)
    stages = [
        pipeflow.Stage(fn, name=f"s{i}", kind=kind, workers=workers) for i, fn in enumerate(fns)
    ]
    pipeline = pipeflow.Pipeline(stages, sink=pipeflow.NullSink())
    started = time.perf_counter()
    report = pipeline.run_sync(until(started + limit_s, workload.source(n)))
    wall = time.perf_counter() - started
    cut = report.items_written < n
    assert report.status == "ok" and (cut or report.items_written == n), (
        workload.name,
        kind,
        workers,
        report.status,
        report.items_written,
    )
    return wall, report, cut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--size", default="", help="items per workload: io=4000,cpu=400")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    sizes = {name: int(n) for name, n in (part.split("=") for part in args.size.split(",") if part)}
    results: dict[str, Any] = {}
    for workload in workloads():
        if only and workload.name not in only:
            continue
        n = sizes.get(workload.name, workload.quick_n if args.quick else workload.n)
        grid = points()
        rounds: list[dict[str, float]] = []
        cuts: list[list[str]] = []
        chosen: list[str] = []
        print(f"\n{workload.name}: {n} items, load {os.getloadavg()[0]:.1f}", flush=True)
        quickest, _, _ = run_point(workload, n, "auto", "auto")  # warm-up: the first reference
        print(f"  warm-up         auto: {quickest:7.3f}s", flush=True)
        for r in range(args.rounds):
            order = grid[r % len(grid) :] + grid[: r % len(grid)]
            walls: dict[str, float] = {}
            cut_here: list[str] = []
            for label, kind, workers in order:
                tuned = kind == "auto" or workers == "auto"
                limit = math.inf if tuned else CUT_AT * quickest
                wall, report, cut = run_point(workload, n, kind, workers, limit)
                walls[label] = wall
                if cut:
                    cut_here.append(label)
                else:
                    quickest = min(quickest, wall)
                if kind == "auto" or workers == "auto":
                    chosen.append(
                        f"{label}: "
                        + ", ".join(
                            f"{s.name} {s.kind} x{s.workers}"
                            + (f" ({s.kind_choice['reason']})" if s.kind_choice else "")
                            for s in report.stages
                        )
                    )
                mark = f" > (cut after {report.items_written} items)" if cut else ""
                print(f"  round {r + 1} {label:>12}: {wall:7.3f}s{mark}", flush=True)
            rounds.append(walls)
            cuts.append(cut_here)
        summary = summarize(rounds, cuts)
        results[workload.name] = {
            "n": n,
            "rounds": rounds,
            "cut": cuts,
            "chosen": chosen,
            "load": os.getloadavg()[0],
            **summary,
        }
        bound = "<" if summary["default_cut"] else ""
        print(
            f"{workload.name}: best grid point {summary['best']} ({summary['best_wall']:.3f}s "
            f"median); auto / best {summary['auto_vs_best']:.2f} "
            f"(rounds {', '.join(f'{x:.2f}' for x in summary['auto_vs_best_rounds'])}), "
            f"thread auto / best {summary['thread_auto_vs_best']:.2f}, "
            f"auto / default {bound}{summary['auto_vs_default']:.2f}, "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        for line in chosen:
            print(f"  {line}")
        if args.json:  # after each workload: a long run that is stopped keeps what it did
            args.json.write_text(json.dumps(results, indent=2) + "\n")


def summarize(rounds: list[dict[str, float]], cuts: list[list[str]]) -> dict[str, Any]:
    """Auto against the best grid point of each round, and against the default (a cut
    default's wall is a lower bound, so auto against it an upper bound)."""
    grid_labels = [label for label in rounds[0] if " x" in label]
    auto_vs_best, thread_vs_best, auto_vs_default, bests = [], [], [], []
    for walls, cut in zip(rounds, cuts, strict=True):
        best = min((label for label in grid_labels if label not in cut), key=walls.__getitem__)
        bests.append(best)
        auto_vs_best.append(walls["auto"] / walls[best])
        thread_vs_best.append(walls["thread auto"] / walls[best])
        auto_vs_default.append(walls["auto"] / walls["default"])
    best = statistics.mode(bests)
    return {
        "best": best,
        "best_wall": statistics.median(w[best] for w in rounds),
        "auto_vs_best": statistics.median(auto_vs_best),
        "auto_vs_best_rounds": auto_vs_best,
        "thread_auto_vs_best": statistics.median(thread_vs_best),
        "auto_vs_default": statistics.median(auto_vs_default),
        "default_cut": any("default" in cut for cut in cuts),
    }


if __name__ == "__main__":
    main()
