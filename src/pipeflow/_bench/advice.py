"""The bench's closing recommendation: the best point, and why each other point loses.

Each point's wall time is split into pool start-up, pool shutdown, pickling (estimated)
and the rest, the work itself. A losing point is explained by the part that grew most
against the best point; when that is the work, by what its slowest stage shows: a thread
stage holding one core of CPU is bound by the GIL, a saturated stage lacks workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .figures import BenchResult, PointResult, RunFigures

__all__ = ["recommend"]

# Pool start-up above this share of the wall time is the dominant cost.
DOMINANT_SHARE = 0.5
# A thread stage whose parent process burns this share of one core is CPU-bound.
CPU_BOUND_CORES = 0.5
# Below this share of a core, the work mostly waits (I/O).
WAITING_CORES = 0.3
# A stage this busy has no spare worker.
SATURATED = 0.8

_KIND_WORD = {
    "process": "process",
    "thread": "thread",
    "async": "async task",
    "dask": "dask worker",
    "executor": "executor worker",
}
_KIND_WORDS = {
    "process": "processes",
    "thread": "threads",
    "async": "async tasks",
    "dask": "dask workers",
    "executor": "executor workers",
}


def _workers(point: PointResult) -> str:
    if point.workers == 1:
        return f"1 {_KIND_WORD.get(point.kind, point.kind)}"
    return f"{point.workers} {_KIND_WORDS.get(point.kind, point.kind)}"


def _working_s(run: RunFigures) -> float:
    """Wall time less pool start-up and shutdown: the time the items were moving."""
    return max(1e-9, run.wall_s - run.pool_start_s - run.pool_stop_s)


def _cores(run: RunFigures) -> float:
    """CPU of the parent process while items moved, in cores (1.0 = one core busy)."""
    return run.parent_cpu_s / _working_s(run)


def _busy_per_item(point: PointResult) -> float:
    stage = point.median_run.slowest_stage
    return stage.busy_s / max(stage.items_in, 1)


def _pct(share: float) -> str:
    return f"{share:.0%}".replace("%", " %")


def recommend(result: BenchResult) -> str:
    """The closing recommendation, a few sentences computed from the measurements.

    Args:
        result: A finished bench.

    Returns:
        The text; its first sentence names the best point.
    """
    best = result.best
    lines: list[str] = []
    if best is None:
        return "No point completed: nothing to recommend (see the errors above)."
    for point in result.failed:
        lines.append(f"{point.label} failed: {point.error}.")
    if result.differing:
        names = ", ".join(point.label for point in result.differing)
        lines.append(f"Results differ between points (output hash): {names}.")
    run = best.median_run
    lines.append(
        f"Best: {best.label} ({_workers(best)}), {best.items_per_s:,.0f} items/s, "
        f"{best.wall_median:.3f} s median wall time."
    )
    lines.append(_verdict(result, best))
    others = sorted(
        (point for point in result.points if point.ok and point is not best),
        key=lambda point: point.wall_median,
    )
    for point in others:
        ratio = point.wall_median / best.wall_median if best.wall_median > 0 else 1.0
        lines.append(f"{point.label}: {ratio:.1f}x the best wall time: {_why(point, best)}.")
    slowest = run.slowest_stage
    lines.append(
        f"At the best point the slowest stage is {slowest.name!r} "
        f"({_pct(slowest.utilisation)} busy over {slowest.workers} workers)."
    )
    return "\n".join(lines)


def _verdict(result: BenchResult, best: PointResult) -> str:
    """What the measurements say about the work, as advice."""
    done = [point for point in result.points if point.ok]
    if best.median_run.pool_start_s / best.wall_median >= DOMINANT_SHARE:
        busy = sum(stage.busy_s for stage in best.median_run.stages)
        largest = max(done, key=lambda point: (point.workers, point.median_run.pool_start_s))
        shares = [f"{_pct(best.median_run.pool_start_s / best.wall_median)} at {_workers(best)}"]
        if largest is not best:
            share = largest.median_run.pool_start_s / largest.wall_median
            shares.append(f"{_pct(share)} at {_workers(largest)}")
        return (
            f"Pool start-up is the dominant cost: {' and '.join(shares)} of the wall time, "
            f"while the work itself is {busy * 1000:.1f} ms of busy time in all: the work is "
            "too small to pay for the pool, so the smallest pool wins and more workers only "
            "add start-up."
        )
    kinds = {point.kind for point in done}
    threads = [point for point in done if point.kind in ("thread", "async")]
    if best.kind == "process" and threads:
        top = max(threads, key=lambda point: point.items_per_s)
        cores = _cores(top.median_run)
        if cores >= CPU_BOUND_CORES:
            return (
                f"Use processes: the stage is CPU-bound. With {_workers(top)} the parent "
                f"burns {cores:.2f} cores (the GIL lets one thread run Python at a time), "
                f"so threads cannot scale it; processes run it on several cores, "
                f"{best.items_per_s / max(top.items_per_s, 1e-9):.1f}x faster."
            )
        return (
            f"Use processes: they are {best.items_per_s / max(top.items_per_s, 1e-9):.1f}x "
            f"faster than the best thread or async point ({top.label})."
        )
    if best.kind in ("thread", "async") and "process" in kinds:
        cores = _cores(best.median_run)
        processes = [point for point in done if point.kind == "process"]
        top = max(processes, key=lambda point: point.items_per_s)
        paid = top.median_run.pool_start_s + top.median_run.serialise_s
        if cores >= CPU_BOUND_CORES:
            per_item = {p.label: _busy_per_item(p) for p in processes}
            slowdown = per_item[top.label] / max(min(per_item.values()), 1e-12)
            why = (
                f"each of its {_workers(top)} ran items {slowdown:.1f}x slower than one "
                "process alone: other work holds the cores"
                if slowdown >= 1.4
                else f"their start-up and pickling ({paid:.2f} s at {top.label}) outweigh "
                "the cores they add; more work per run would favour processes"
            )
            return (
                f"Use {_KIND_WORDS[best.kind]} here, but the stage is CPU-bound (the parent "
                f"burns {cores:.2f} cores) and processes did not scale it: {why}."
            )
        waits = "mostly waits (I/O)" if cores < WAITING_CORES else "does not need more cores"
        return (
            f"Use {_KIND_WORDS[best.kind]}: the work {waits}; the parent uses "
            f"{cores:.2f} cores at the best point. Processes add nothing but cost: the "
            f"best of them ({top.label}) pays {paid:.2f} s of pool start-up and pickling."
        )
    return f"Use {best.label}: it has the highest throughput of the points measured."


def _why(point: PointResult, best: PointResult) -> str:
    """Why `point` is slower than `best`: the part of its wall time that grew most."""
    run, top = point.median_run, best.median_run
    grown = {
        "start-up": run.pool_start_s - top.pool_start_s,
        "shutdown": run.pool_stop_s - top.pool_stop_s,
        "pickling": run.serialise_s - top.serialise_s,
        "work": _working_s(run) - run.serialise_s - (_working_s(top) - top.serialise_s),
    }
    part = max(grown, key=lambda key: grown[key])
    share_start = run.pool_start_s / run.wall_s if run.wall_s > 0 else 0.0
    if part == "start-up":
        small = ": the work is too small to pay for it" if share_start >= DOMINANT_SHARE else ""
        return (
            f"pool start-up is {_pct(share_start)} of its wall time, "
            f"{run.pool_start_s:.2f} s for {_workers(point)}{small}"
        )
    if part == "shutdown":
        return f"shutting its pool down takes {run.pool_stop_s:.2f} s"
    if part == "pickling":
        return f"pickling items and results costs an estimated {run.serialise_s:.3f} s"
    slowest = run.slowest_stage
    cores = _cores(run)
    if point.kind in ("thread", "async") and cores >= CPU_BOUND_CORES:
        sharing = (
            "one thread runs it"
            if point.workers == 1
            else f"its {_workers(point)} share one core through the GIL"
        )
        scale = "; processes scale it" if best.kind == "process" else ""
        return f"the stage is CPU-bound: {sharing} (the parent burns {cores:.2f} cores){scale}"
    if point.kind == "process" and best.kind in ("thread", "async") and _cores(top) < WAITING_CORES:
        return (
            f"its processes pay start-up ({run.pool_start_s:.2f} s) and pickling "
            f"({run.serialise_s:.3f} s) for work that waits"
        )
    if slowest.utilisation >= SATURATED and point.workers < best.workers:
        return (
            f"stage {slowest.name!r} is saturated ({_pct(slowest.utilisation)} busy) with "
            f"{_workers(point)}: it needs more workers"
        )
    return (
        f"the work itself takes {_working_s(run):.2f} s against {_working_s(top):.2f} s; "
        f"slowest stage {slowest.name!r} at {_pct(slowest.utilisation)} busy, "
        f"{slowest.blocked_s:.2f} s blocked on a full queue"
    )
