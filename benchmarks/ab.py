"""The engine at another commit against the working tree: does a change cost plain stages?

Run from the repository root:

    python benchmarks/ab.py --base 2050eb3               # 5 rounds of each workload
    python benchmarks/ab.py --base main --rounds 7 --only process,async

Each contender is a fresh interpreter that imports pipeflow from its own tree (the base
is exported with `git archive`), runs one workload and prints the seconds its run took
(interpreter and pool start-up excluded: the pool is started before the clock). Round r
runs the two trees in an order that alternates with r, the ratio new / base is computed
within each round, and the median and min-max of the ratios over the rounds are printed
with the load average. A ratio under 1 means the working tree is faster.

The workloads are stages without any option beyond `kind` and `workers`: what every
pipeline pays for, whatever features it does not use.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent

# Each workload: a program run in a fresh interpreter; it prints the run's wall seconds.
WORKLOADS = {
    "process": """
import time, pipeflow
from pipeflow import Pipeline, Stage
from operator import neg
pipeline = Pipeline([Stage(neg, kind="process", workers=2)])
report = pipeline.run_sync(range(1_000_000))
print(report.wall_s - sum(s.pool_start_s for s in report.stages))
""",
    "thread": """
import pipeflow
from pipeflow import Pipeline, Stage
from operator import neg
pipeline = Pipeline([Stage(neg, kind="thread", workers=4)])
report = pipeline.run_sync(range(1_000_000))
print(report.wall_s)
""",
    "async": """
import asyncio, time, pipeflow
from pipeflow import Pipeline, Stage
async def neg(n):
    return -n
async def main():
    pipeline = Pipeline(
        [Stage(neg, name="a", kind="async", workers=16), Stage(neg, name="b", kind="async")]
    )
    started = time.perf_counter()
    async with pipeline.stream(range(200_000)) as results:
        async for _ in results:
            pass
    print(time.perf_counter() - started)
asyncio.run(main())
""",
    "generator": """
import pipeflow
from pipeflow import Pipeline, Stage
from operator import neg
def numbers():
    yield from range(500_000)
pipeline = Pipeline([Stage(neg, kind="process", workers=2)])
report = pipeline.run_sync(numbers())
print(report.wall_s - sum(s.pool_start_s for s in report.stages))
""",
}


def export(rev: str, into: Path) -> Path:
    """The tree of `rev`, written under `into`; its `src` holds that commit's pipeflow."""
    archive = into / "base.tar"
    subprocess.run(
        ["git", "-C", str(REPO_DIR), "archive", "--format=tar", "-o", str(archive), rev, "src"],
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(into / "base", filter="data")
    return into / "base" / "src"


def run_once(program: str, src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=env,
        cwd=src.parent,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"a contender failed:\n{done.stderr}")
    return float(done.stdout.split()[-1])


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    args = parser.parse_args()
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": export(args.base, Path(tmp)), "new": REPO_DIR / "src"}
        print(f"base {args.base} against the working tree; {args.rounds} rounds; load {load()}")
        for name in names:
            ratios: list[float] = []
            walls: dict[str, list[float]] = {"base": [], "new": []}
            for round_ in range(args.rounds):
                order = ["base", "new"] if round_ % 2 == 0 else ["new", "base"]
                wall = {tree: run_once(WORKLOADS[name], trees[tree]) for tree in order}
                for tree in order:
                    walls[tree].append(wall[tree])
                ratios.append(wall["new"] / wall["base"])
            print(
                f"{name:10} new/base {statistics.median(ratios):.3f}x "
                f"({min(ratios):.3f}-{max(ratios):.3f}); median wall base "
                f"{statistics.median(walls['base']):.3f} s, new "
                f"{statistics.median(walls['new']):.3f} s; load {load()}"
            )


if __name__ == "__main__":
    main()
