"""From a validated config spec to the library's objects: `Stage`, `Pool`, sources, sinks.

By now every reference has been imported (`resolved` maps `module:attr` to its object) and
checked; what the library's own constructors still refuse is reported like any problem.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._errors import ConfigError
from ._imports import import_exception
from ._pipeline import Pipeline
from ._sinks import CallableSink, CsvSink, JsonlSink, NullSink, Sink, StdoutSink
from ._sources import csv_rows, jsonl_records, text_lines
from ._spec import ConfigSpec, ExecutorSpec, SecuritySpec, SinkSpec, SourceSpec, StageSpec
from ._stage import Kind, Pool, Retry, Stage
from ._yaml import DataPath

__all__ = ["build_pipeline"]

AddProblem = Callable[[DataPath, str], None]


def build_pipeline(
    spec: ConfigSpec, resolved: dict[str, Any], base: Path, file_name: str, add: AddProblem
) -> Pipeline | None:
    """The pipeline `spec` describes, or None after reporting what the library refused.

    Args:
        spec: The validated config.
        resolved: The imported callables, by `module:attr`.
        base: Where relative file paths start.
        file_name: The config file, whose stem names an unnamed pipeline.
        add: Reports a problem at a data path.
    """
    executors: dict[str, Pool | concurrent.futures.Executor] = {}
    for name, executor_spec in spec.executors.items():
        try:
            executors[name] = _executor(executor_spec)
        except ConfigError as exc:
            for problem in exc.problems:
                add(("executors", name), problem)
    stages: list[Stage] = []
    for index, stage_spec in enumerate(spec.stages):
        stage = _stage(stage_spec, resolved, spec.executors, ("stages", index), add)
        if stage is not None:
            stages.append(stage)
    if len(stages) < len(spec.stages) or len(executors) < len(spec.executors):
        return None
    try:
        return Pipeline(
            stages,
            source=_source(spec.source, resolved, base),
            sink=_sink(spec.sink, resolved, base),
            dead_letter=_sink(spec.dead_letter, resolved, base) if spec.dead_letter else None,
            executors=executors,
            name=spec.name or Path(file_name).stem,
            max_errors=spec.max_errors,
            max_error_rate=spec.max_error_rate,
        )
    except ConfigError as exc:
        for problem in exc.problems:
            if problem.startswith("dead_letter: "):
                add(("dead_letter",), problem.removeprefix("dead_letter: "))
            else:
                add((), problem)
        return None


def _executor(spec: ExecutorSpec) -> Pool | concurrent.futures.Executor:
    return Pool(
        kind=spec.kind,
        workers=spec.workers,
        start_method=spec.start_method,
        max_tasks_per_child=spec.max_tasks_per_child,
        threads_per_worker=spec.threads_per_worker,
        address=spec.address,
        dashboard=spec.dashboard,
        security=(
            spec.security.model_dump(exclude_none=True)
            if isinstance(spec.security, SecuritySpec)
            else spec.security
        ),
    )


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


def _stage(
    spec: StageSpec,
    resolved: dict[str, Any],
    executors: dict[str, ExecutorSpec],
    path: DataPath,
    add: AddProblem,
) -> Stage | None:
    fn = resolved[spec.fn]
    name = spec.name or spec.fn.rpartition(":")[2].rpartition(".")[2]
    kind: Kind
    if spec.executor is not None:
        kind = executors[spec.executor].kind
    else:
        kind = spec.kind or ("async" if _is_async(fn) else "thread")
    retries = None
    if spec.retries is not None:
        retries = Retry(
            attempts=spec.retries.attempts,
            backoff=spec.retries.backoff,
            max_backoff=spec.retries.max_backoff,
            jitter=spec.retries.jitter,
            retry_on=tuple(import_exception(name) for name in spec.retries.retry_on),
        )
    try:
        return Stage(
            fn,
            name=name,
            kind=kind,
            workers=spec.workers,
            op=spec.op,
            ordered=spec.ordered,
            batch=spec.batch,
            queue_size=spec.queue_size,
            timeout=spec.timeout,
            retries=retries,
            on_error=spec.on_error,
            executor=spec.executor,
            setup=resolved[spec.setup] if spec.setup else None,
            teardown=resolved[spec.teardown] if spec.teardown else None,
            start_method=spec.start_method,
        )
    except ConfigError as exc:
        prefix = f"stage {name!r}: "
        for problem in exc.problems:
            add(path, problem.removeprefix(prefix))
        return None


def _source(spec: SourceSpec, resolved: dict[str, Any], base: Path) -> Any:
    # File and fn sources are factories, so every run of the pipeline reads afresh.
    if spec.range is not None:
        return range(spec.range.start, spec.range.stop, spec.range.step)
    if spec.items is not None:
        return list(spec.items)
    if spec.lines is not None:
        return functools.partial(text_lines, base / spec.lines.path)
    if spec.jsonl is not None:
        return functools.partial(jsonl_records, base / spec.jsonl.path)
    if spec.csv is not None:
        csv = spec.csv
        return functools.partial(
            csv_rows, base / csv.path, header=csv.header, delimiter=csv.delimiter
        )
    assert spec.fn is not None
    return functools.partial(resolved[spec.fn.fn], *spec.fn.args, **spec.fn.kwargs)


def _sink(spec: SinkSpec, resolved: dict[str, Any], base: Path) -> Sink:
    if spec.stdout is not None:
        return StdoutSink(spec.stdout.format)
    if spec.jsonl is not None:
        return JsonlSink(base / spec.jsonl.path, append=spec.jsonl.append)
    if spec.csv is not None:
        return CsvSink(base / spec.csv.path, fields=spec.csv.fields)
    if spec.null is not None:
        return NullSink()
    assert spec.fn is not None
    return CallableSink(resolved[spec.fn.fn])
