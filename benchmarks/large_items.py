"""Large items through a 2-process stage: pipeflow (default batch) against
`multiprocessing.Pool.imap(chunksize=2)`, in MB/s and the parent's peak RSS.

    python benchmarks/large_items.py [--items 2000] [--rounds 3]

Each measurement runs in a fresh interpreter (its peak RSS is its own: VmHWM), and the
two alternate round after round, so that a change in the machine's load hits both.
Pools are started before the clock on both sides (pipeflow's `pool_start_s` is taken
off its wall).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

ONE_MIB = 1 << 20


def items(count: int) -> Iterator[bytes]:
    for n in range(count):
        yield bytes([n % 251]) * ONE_MIB


def same(item: bytes) -> bytes:
    return item


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_pipeflow(count: int) -> dict[str, Any]:
    import pipeflow

    pipeline = pipeflow.Pipeline(
        [pipeflow.Stage(same, kind="process", workers=2)], source=lambda: items(count)
    )
    started = time.perf_counter()
    report = pipeline.run_sync()
    wall = time.perf_counter() - started - report.stages[0].pool_start_s
    assert report.items_written == count
    return {"wall_s": wall, "peak_mib": peak_rss_mib()}


def run_pool(count: int) -> dict[str, Any]:
    with multiprocessing.Pool(2) as pool:
        pool.map(same, [b""] * 4)  # started and warm before the clock
        started = time.perf_counter()
        done = sum(1 for _ in pool.imap(same, items(count), chunksize=2))
        wall = time.perf_counter() - started
    assert done == count
    return {"wall_s": wall, "peak_mib": peak_rss_mib()}


def measure(which: str, count: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--one", which, "--items", str(count)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", choices=["pipeflow", "pool"])
    args = parser.parse_args()
    if args.one is not None:
        run = run_pipeflow if args.one == "pipeflow" else run_pool
        print(json.dumps(run(args.items)))
        return
    results: dict[str, list[dict[str, Any]]] = {"pipeflow": [], "pool": []}
    for round_ in range(args.rounds):
        for which in ("pipeflow", "pool") if round_ % 2 == 0 else ("pool", "pipeflow"):
            result = measure(which, args.items)
            results[which].append(result)
            mb_s = args.items * ONE_MIB / 1e6 / result["wall_s"]
            print(
                f"round {round_ + 1} {which:8}: {mb_s:7.1f} MB/s, peak {result['peak_mib']:.0f} MiB"
            )
    print(f"{'':10}{'median MB/s':>12}{'max peak MiB':>14}")
    for which, runs in results.items():
        mb_s = statistics.median(args.items * ONE_MIB / 1e6 / r["wall_s"] for r in runs)
        print(f"{which:10}{mb_s:12.1f}{max(r['peak_mib'] for r in runs):14.0f}")


if __name__ == "__main__":
    main()
