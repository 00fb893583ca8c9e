"""What `pipeflow bench` measures: figures per stage, per run, per point, for a whole bench."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BenchPlan:
    """What a bench runs: the config, its fixed overrides, the points, the repetitions.

    Attributes:
        config: The config file.
        matrix: Each varied path with the values it takes, in order.
        points: The cartesian product of the matrix: one `{path: value}` per point.
        sets: `--set` overrides applied to every point (a matrix path wins over them).
        repeat: Timed runs per point.
        warmup: Untimed runs per point, before the timed ones.
        app_dir: As `load()`'s `app_dir`.
    """

    config: str
    matrix: dict[str, list[Any]]
    points: list[dict[str, Any]]
    sets: dict[str, Any]
    repeat: int
    warmup: int
    app_dir: Path | None = None


@dataclass
class StageFigures:
    """One stage in one run.

    Attributes:
        name: The stage's name.
        kind: `async`, `thread`, `process`, `dask` or `executor`.
        workers: Pool size, or concurrent tasks for async.
        items_in: Items the stage received.
        items_out: Results it emitted.
        calls: Executor calls (chunks).
        busy_s: Seconds in the stage's callable, summed over workers.
        utilisation: busy_s over (the run's wall time less pool start-up) x workers.
        idle_s: Seconds waiting on an empty input queue.
        blocked_s: Seconds blocked on a full output queue (backpressure).
        queue_high_water: The most batches its input queue held.
        pool_start_s: Seconds creating the stage's pool.
        serialise_s: Estimated seconds pickling and unpickling the items and results
            that crossed a process boundary, both ends; None for in-process stages.
        bytes_in: Pickled bytes per input item (process stages).
        bytes_out: Pickled bytes per result (process stages).
    """

    name: str
    kind: str
    workers: int
    items_in: int
    items_out: int
    calls: int
    busy_s: float
    utilisation: float
    idle_s: float
    blocked_s: float
    queue_high_water: int
    pool_start_s: float
    serialise_s: float | None = None
    bytes_in: float | None = None
    bytes_out: float | None = None


@dataclass
class RunFigures:
    """One timed run of one point.

    Attributes:
        wall_s: Seconds from `run()` to its return, pool start-up and shutdown included.
        status: The run's status (`ok` or `failed`).
        items: Items read from the source.
        output_hash: SHA-256 of the results as JSON lines (sorted when a stage is
            unordered, since its output order is free).
        pool_start_s: Seconds creating pools and spawning their workers.
        pool_stop_s: Seconds shutting pools down after the last result.
        serialise_s: Estimated pickling seconds, all process stages together.
        parent_cpu_s: CPU seconds of the parent process (all its threads) during the run.
        parent_rss_mb: Peak RSS of the parent process during the run.
        workers_rss_mb: Peak RSS of the largest worker process.
        workers_rss_total_mb: Sum of the worker processes' peak RSS.
        stages: Per stage figures, in order.
    """

    wall_s: float
    status: str
    items: int
    output_hash: str
    pool_start_s: float
    pool_stop_s: float
    serialise_s: float
    parent_cpu_s: float
    parent_rss_mb: float | None
    workers_rss_mb: float | None
    workers_rss_total_mb: float | None
    stages: list[StageFigures]

    @property
    def slowest_stage(self) -> StageFigures:
        """The stage with the highest utilisation: the one the others wait for."""
        return max(self.stages, key=lambda stage: stage.utilisation)


@dataclass
class PointResult:
    """One point of the matrix and its timed runs.

    Attributes:
        params: The point's overrides, `{path: value}`.
        label: The point as a short text, `kind=process workers=4`.
        runs: The timed runs (warm-up runs are not kept).
        error: Why the point failed, if it did.
    """

    params: dict[str, Any]
    label: str
    runs: list[RunFigures] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether every run of the point completed."""
        return self.error is None and bool(self.runs)

    @property
    def walls(self) -> list[float]:
        """The wall times of the timed runs."""
        return [run.wall_s for run in self.runs]

    @property
    def median_run(self) -> RunFigures:
        """The run of median wall time, whose figures stand for the point."""
        ordered = sorted(self.runs, key=lambda run: run.wall_s)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def wall_median(self) -> float:
        """The median wall time."""
        return statistics.median(self.walls)

    @property
    def items_per_s(self) -> float:
        """Items read from the source per second of median wall time."""
        wall = self.wall_median
        return self.median_run.items / wall if wall > 0 else 0.0

    @property
    def kind(self) -> str:
        """The kind of the point's slowest stage."""
        return self.median_run.slowest_stage.kind

    @property
    def workers(self) -> int:
        """The workers of the point's slowest stage."""
        return self.median_run.slowest_stage.workers


@dataclass
class BenchResult:
    """A whole bench: the plan, each point's runs, and what they mean.

    Attributes:
        plan: What was run.
        pipeline: The pipeline's name.
        points: One result per point, in matrix order.
        recommendation: The best point and why the others lose, in words.
    """

    plan: BenchPlan
    pipeline: str
    points: list[PointResult]
    recommendation: str = ""

    @property
    def best(self) -> PointResult | None:
        """The point of highest throughput among those that completed."""
        done = [point for point in self.points if point.ok]
        return max(done, key=lambda point: point.items_per_s) if done else None

    @property
    def differing(self) -> list[PointResult]:
        """Points whose output differs from the first completed point's (or between runs)."""
        hashes = [{run.output_hash for run in point.runs} for point in self.points if point.ok]
        if not hashes:
            return []
        reference = next(iter(hashes[0]))
        return [
            point
            for point in self.points
            if point.ok and {run.output_hash for run in point.runs} != {reference}
        ]

    @property
    def failed(self) -> list[PointResult]:
        """Points where a run failed."""
        return [point for point in self.points if not point.ok]


def short_names(paths: Sequence[str]) -> dict[str, str]:
    """A short name per path for labels: its last key (`workers`), or more if ambiguous."""
    names: dict[str, str] = {}
    for path in paths:
        parts = path.split(".")
        depth = 1
        while depth < len(parts) and any(
            other != path and other.split(".")[-depth:] == parts[-depth:] for other in paths
        ):
            depth += 1
        names[path] = ".".join(parts[-depth:])
    return names
