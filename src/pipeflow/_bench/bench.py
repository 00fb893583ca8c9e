"""`pipeflow bench`: run a pipeline once per point of a matrix of overrides, and measure.

    plan (matrix x --set, validated up front) -> per point: warm-up runs, timed runs
    -> per run: wall time, pool start-up and shutdown, stage times, pickling, RSS
    -> `BenchResult` (rendered by `_bench_render`, explained by `_bench_advice`)

Every run loads the config anew (fresh pools) and writes to a hashing sink instead of the
configured one, so that points can be compared on their output without writing it N times.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import pickle
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import cloudpickle

from .._config.config import load
from .._config.spec import BenchSpec
from .._config.yaml import read_yaml
from .._control import RunControl
from .._errors import ConfigError, PipelineError
from .._pipeline import Pipeline
from .._report import RunReport, StageReport
from .._sinks import Sink, to_json_line
from .._stage import Stage
from .figures import (
    BenchPlan,
    BenchResult,
    PointResult,
    RunFigures,
    StageFigures,
    short_names,
)

__all__ = [
    "BenchPlan",
    "BenchResult",
    "PointResult",
    "RunFigures",
    "StageFigures",
    "parse_matrix",
    "plan_bench",
    "run_bench",
]

# Items of each process stage whose pickling is timed (from its first executor calls).
SAMPLE_ITEMS = 512
# Each pickling measurement repeats until it has lasted this long, for a stable figure.
PICKLE_TIMING_S = 0.005


# --- the plan -----------------------------------------------------------------------------


def parse_matrix(specs: Sequence[str]) -> dict[str, list[str]]:
    """`["stages.square.workers=1,2,4"]` as `{"stages.square.workers": ["1", "2", "4"]}`.

    Raises:
        ConfigError: A spec is not `PATH=V1,V2,...`, has an empty value, or repeats a path.
    """
    matrix: dict[str, list[str]] = {}
    for spec in specs:
        path, equals, values = spec.partition("=")
        path = path.strip()
        items = [value.strip() for value in values.split(",")]
        if not equals or not path or " " in path or not all(items):
            raise ConfigError(
                f"--matrix {spec}: write --matrix PATH=V1,V2,..., "
                "e.g. --matrix stages.square.workers=1,2,4"
            )
        if path in matrix:
            raise ConfigError(f"--matrix {spec}: {path} is already varied by another --matrix")
        matrix[path] = items
    return matrix


def plan_bench(
    config: str,
    matrix: Mapping[str, Sequence[Any]] | None = None,
    *,
    sets: Mapping[str, Any] | None = None,
    repeat: int | None = None,
    warmup: int | None = None,
    app_dir: Path | None = None,
) -> BenchPlan:
    """Check a bench before running it: the config, and every point's overrides.

    Args:
        config: The config file.
        matrix: Paths and the values to try; when None or empty, the config's `bench:`
            section gives it.
        sets: Overrides applied to every point.
        repeat: Timed runs per point (default: the config's `bench.repeat`, else 3).
        warmup: Untimed runs per point (default: the config's `bench.warmup`, else 1).
        app_dir: As `load()`'s `app_dir`.

    Returns:
        The plan, every point of which loads.

    Raises:
        ConfigError: The config or a point is bad, or there is nothing to vary; one line
            per problem, and lines about a matrix value name `--matrix`.
    """
    fixed = dict(sets or {})
    load(config, fixed, app_dir=app_dir)
    declared = _declared_bench(config)
    from_command_line = bool(matrix)
    chosen = {path: list(values) for path, values in (matrix or declared.matrix).items()}
    if not chosen:
        raise ConfigError(
            f"{config}: nothing to vary: give --matrix PATH=V1,V2,... or a bench: matrix "
            "in the config"
        )
    for path, values in chosen.items():
        if not values:
            raise ConfigError(f"{config}: bench.matrix.{path}: give at least one value")
    points = [
        dict(zip(chosen, combo, strict=True)) for combo in itertools.product(*chosen.values())
    ]
    for point in points:
        try:
            load(config, {**fixed, **point}, app_dir=app_dir)
        except ConfigError as exc:
            flag = "--matrix" if from_command_line else "bench.matrix"
            raise ConfigError(
                [_as_matrix_problem(problem, chosen, flag) for problem in exc.problems]
            ) from None
    repeat = repeat if repeat is not None else declared.repeat
    warmup = warmup if warmup is not None else declared.warmup
    if repeat < 1 or warmup < 0:
        raise ConfigError("--repeat must be at least 1 and --warmup at least 0")
    return BenchPlan(config, chosen, points, fixed, repeat, warmup, app_dir)


def _declared_bench(config: str) -> BenchSpec:
    data = read_yaml(config).data
    raw = data.get("bench") if isinstance(data, dict) else None
    # load() has validated the section already
    return BenchSpec.model_validate(raw or {})


def _as_matrix_problem(problem: str, matrix: Mapping[str, Any], flag: str) -> str:
    # load() names an override's origin `--set PATH=VALUE`; a matrix value came from elsewhere
    for path in matrix:
        prefix = f"--set {path}="
        if problem.startswith(prefix):
            return f"{flag} {path}=" + problem.removeprefix(prefix)
    return problem


# --- running ------------------------------------------------------------------------------


def run_bench(
    plan: BenchPlan, on_run: Callable[[PointResult, int, float | None], Any] | None = None
) -> BenchResult:
    """Run every point of `plan`: its warm-up runs, then its timed runs.

    Args:
        plan: From `plan_bench`.
        on_run: Called after each run with the point, the run's number (warm-ups first,
            from 1) and its wall time (None if it failed).

    Returns:
        The measurements; `recommendation` is filled by `_bench_advice.recommend`.
    """
    from .advice import recommend

    names = short_names(list(plan.matrix))
    points: list[PointResult] = []
    pipeline_name = ""
    for params in plan.points:
        label = " ".join(f"{names[path]}={value}" for path, value in params.items())
        point = PointResult(params, label)
        points.append(point)
        for number in range(1, plan.warmup + plan.repeat + 1):
            pipeline = load(plan.config, {**plan.sets, **params}, app_dir=plan.app_dir)
            pipeline_name = pipeline.name
            try:
                figures = _timed_run(pipeline)
            except PipelineError as exc:
                point.error = str(exc)
                if on_run is not None:
                    on_run(point, number, None)
                break
            if number > plan.warmup:
                point.runs.append(figures)
            if on_run is not None:
                on_run(point, number, figures.wall_s)
    result = BenchResult(plan, pipeline_name, points)
    result.recommendation = recommend(result)
    return result


class _HashingSink(Sink):
    """Hashes the results as JSON lines: in order, or as a sorted multiset if order is free."""

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.digest = hashlib.sha256()
        self.lines: list[bytes] = []

    async def write(self, values: list[Any]) -> None:
        """Fold the batch into the hash."""
        for value in values:
            line = to_json_line(value).encode()
            if self.ordered:
                self.digest.update(line)
            else:
                self.lines.append(hashlib.sha256(line).digest())

    def hexdigest(self) -> str:
        """The hash of everything written."""
        if not self.ordered:
            for line in sorted(self.lines):
                self.digest.update(line)
            self.lines.clear()
        return self.digest.hexdigest()


class _Sampler:
    """Peak RSS of the parent and of the pools' workers, read on each progress update."""

    def __init__(self, control: RunControl) -> None:
        self.control = control
        try:
            import psutil
        except ImportError:  # RSS figures are left out; the rest of the bench works
            self.psutil: Any = None
        else:
            self.psutil = psutil
        self.parent_peak = 0
        self.worker_peaks: dict[int, int] = {}
        self._processes: dict[int, Any] = {}

    def sample(self, report: RunReport | None = None) -> None:
        if self.psutil is None:
            return
        self.parent_peak = max(self.parent_peak, self.psutil.Process().memory_info().rss)
        for pid in self.control.worker_pids():
            try:
                process = self._processes.get(pid) or self.psutil.Process(pid)
                self._processes[pid] = process
                rss = process.memory_info().rss
            except self.psutil.Error:  # the worker ended between pids() and now
                continue
            self.worker_peaks[pid] = max(self.worker_peaks.get(pid, 0), rss)


def _timed_run(pipeline: Pipeline) -> RunFigures:
    sink = _HashingSink(ordered=all(stage.ordered for stage in pipeline.stages))
    pipeline.sink = sink
    control = RunControl(keep_samples=True)
    sampler = _Sampler(control)
    sampler.sample()
    cpu_before = _cpu_s()
    started = time.perf_counter()
    report = anyio.run(lambda: pipeline.run(progress=sampler.sample, control=control))
    wall = time.perf_counter() - started
    cpu = _cpu_s() - cpu_before
    sampler.sample()
    pool_start = control.pool_start_s
    working_s = report.wall_s - pool_start
    stages = [
        _stage_figures(stage, figures, control.samples(figures.name), working_s)
        for stage, figures in zip(pipeline.stages, report.stages, strict=True)
    ]
    mb = 1024 * 1024
    workers = list(sampler.worker_peaks.values())
    has_psutil = sampler.psutil is not None
    return RunFigures(
        wall_s=wall,
        status=report.status,
        items=report.items_read,
        output_hash=sink.hexdigest(),
        pool_start_s=pool_start,
        pool_stop_s=max(0.0, wall - report.wall_s),
        serialise_s=sum(stage.serialise_s or 0.0 for stage in stages),
        parent_cpu_s=cpu,
        parent_rss_mb=sampler.parent_peak / mb if has_psutil else _max_rss_mb(),
        workers_rss_mb=max(workers) / mb if workers else None,
        workers_rss_total_mb=sum(workers) / mb if workers else None,
        stages=stages,
    )


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _max_rss_mb() -> float:
    # the process's peak since it started, not this run's: the best figure without psutil
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _stage_figures(
    stage: Stage,
    report: StageReport,
    samples: list[tuple[list[Any], list[Any]]] | None,
    working_s: float,
) -> StageFigures:
    available = max(working_s, 1e-9) * report.workers
    figures = StageFigures(
        name=report.name,
        kind=report.kind,
        workers=report.workers,
        items_in=report.items_in,
        items_out=report.items_out,
        calls=report.calls,
        busy_s=report.busy_s,
        utilisation=min(1.0, report.busy_s / available),
        idle_s=report.idle_s,
        blocked_s=report.blocked_s,
        queue_high_water=report.queue_high_water,
        pool_start_s=report.pool_start_s,
    )
    if samples is not None:
        _estimate_serialisation(stage, samples, figures)
    return figures


def _estimate_serialisation(
    stage: Stage, samples: list[tuple[list[Any], list[Any]]], figures: StageFigures
) -> None:
    """Pickling cost of a process stage, from the items of its first calls.

    Each item crosses the boundary twice: the parent pickles it and the worker unpickles
    it, then the worker pickles the result and the parent unpickles it. Timing one
    dumps + loads of a sample here, per item, and scaling it by the items and results
    the stage moved, covers both ends; each call adds the pickled stage call.
    """
    inputs = [value for values, _ in samples for value in values][:SAMPLE_ITEMS]
    outputs = [value for _, values in samples for value in values][:SAMPLE_ITEMS]
    try:
        in_s, in_bytes = _pickle_cost(inputs)
        out_s, out_bytes = _pickle_cost(outputs)
        # a call carries the stage's callables pickled once, by cloudpickle, as bytes
        call = [cloudpickle.dumps(part) for part in (stage.fn, stage.setup, stage.teardown)]
        call_s, _ = _pickle_cost([call])
    except Exception:  # a value only cloudpickle handles (a dask stage): no estimate
        return
    figures.serialise_s = (
        in_s * figures.items_in + out_s * figures.items_out + call_s * figures.calls
    )
    figures.bytes_in = in_bytes
    figures.bytes_out = out_bytes


def _pickle_cost(values: list[Any]) -> tuple[float, float]:
    """Seconds to pickle and unpickle one of `values`, and its pickled bytes, on average."""
    if not values:
        return 0.0, 0.0
    # the fastest of several rounds, as timeit advises: slower ones measure other load
    fastest = math.inf
    rounds = 0
    deadline = time.perf_counter() + PICKLE_TIMING_S
    while rounds < 3 or time.perf_counter() < deadline:
        started = time.perf_counter()
        blob = pickle.dumps(values, pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)
        fastest = min(fastest, time.perf_counter() - started)
        rounds += 1
    return fastest / len(values), len(blob) / len(values)
