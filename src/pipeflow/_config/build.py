"""From a validated config spec to the library's objects: `Stage`, `Pool`, sources, sinks.

The library's constructors check how a pipeline's parts fit together (kind and executor,
an async fn in a pool, unknown executor names, duplicate stage names, a dead-letter policy
without a dead-letter sink); their `Problem`s are reported here at the position of the key
they are about. A reference that did not import was reported already: a stand-in takes its
place, so that the library still checks everything else and every problem shows at once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .._errors import ConfigError, Problem
from .._group import Group
from .._pipeline import Pipeline
from .._rate import Rate
from .._sinks import CallableSink, CsvSink, JsonlSink, NullSink, Sink, StdoutSink
from .._sources import FileSource, csv_rows, jsonl_records, text_lines
from .._stage import ON_ERROR, Pool, Retry, Stage
from .imports import ImportProblem, import_exception
from .spec import ConfigSpec, ExecutorSpec, SecuritySpec, SinkSpec, SourceSpec, StageSpec
from .yaml import DataPath

__all__ = ["build_pipeline", "stage_name"]

AddProblem = Callable[[DataPath, str], None]
Model = TypeVar("Model", bound=BaseModel)


def _stand_in(*args: Any) -> None:
    """Takes the place of a callable that did not import."""


async def _async_stand_in(*args: Any) -> None:
    """Takes the place of a coroutine function that did not import."""


def build_pipeline(
    spec: ConfigSpec | None,
    data: dict[str, Any],
    resolved: dict[str, Any],
    base: Path,
    file_name: str,
    add: AddProblem,
) -> Pipeline | None:
    """The pipeline `spec` describes, or None after reporting what the library refused.

    Args:
        spec: The validated config, or None if its shape is wrong (those problems were
            reported): then each part of `data` whose shape is right is built.
        data: The config's data.
        resolved: The imported callables, by `module:attr`; those missing were reported.
        base: Where relative file paths start.
        file_name: The config file, whose stem names an unnamed pipeline.
        add: Reports a problem at a data path.
    """
    parts = spec if spec is not None else _valid_parts(data)
    refused = spec is None
    executors: dict[str, Pool | concurrent.futures.Executor] = {}
    for name, executor_spec in parts.executors.items():
        if executor_spec is None:
            executors[name] = Pool("thread", 1)  # the name stays known to the stages
            continue
        try:
            executors[name] = _executor(executor_spec)
        except ConfigError as exc:
            refused = True
            for problem in exc.details:
                at = problem.key if problem.key in executor_spec.model_fields_set else None
                add(("executors", name, at) if at else ("executors", name), problem.what)
            executors[name] = Pool("thread", 1)
    stages: list[Stage] = []
    for index, stage_spec in enumerate(parts.stages):
        if not isinstance(stage_spec, StageSpec):
            stages.append(_placeholder(stage_spec, index))
            continue
        try:
            stages.append(_stage(stage_spec, resolved))
        except ConfigError as exc:
            refused = True
            for problem in exc.details:
                at = problem.key if problem.key in stage_spec.model_fields_set else None
                add(("stages", index, at) if at else ("stages", index), problem.what)
            stages.append(_placeholder(stage_spec.model_dump(), index))
    if not stages:
        return None
    try:
        pipeline = Pipeline(
            stages,
            source=_source(parts.source, resolved, base) if parts.source else [],
            sink=_sink(parts.sink, resolved, base) if parts.sink else NullSink(),
            dead_letter=_sink(parts.dead_letter, resolved, base) if parts.dead_letter else None,
            executors=executors,
            name=parts.name or Path(file_name).stem,
            max_errors=parts.max_errors,
            max_error_rate=parts.max_error_rate,
        )
    except ConfigError as exc:
        for problem in exc.details:
            path: DataPath = () if problem.index is None else ("stages", problem.index)
            given = data["stages"][problem.index] if problem.index is not None else data
            if problem.key is not None and isinstance(given, dict) and problem.key in given:
                path = (*path, problem.key)
            add(path, problem.what)
        return None
    return None if refused else pipeline


@dataclass
class _Parts:
    """The parts of a config whose shape is right; the others are None."""

    executors: dict[str, ExecutorSpec | None]
    stages: list[StageSpec | dict[str, Any]]
    source: SourceSpec | None
    sink: SinkSpec | None
    dead_letter: SinkSpec | None
    name: str | None = None
    max_errors: int | None = None
    max_error_rate: float | None = None


def _valid(model: type[Model], raw: Any) -> Model | None:
    try:
        return model.model_validate(raw)
    except ValidationError:
        return None


def _valid_parts(data: dict[str, Any]) -> _Parts:
    executors = data.get("executors")
    stages = data.get("stages")
    dead_letter = data.get("dead_letter")
    return _Parts(
        executors={
            name: _valid(ExecutorSpec, raw)
            for name, raw in (executors.items() if isinstance(executors, dict) else [])
        },
        stages=[
            _valid(StageSpec, raw) or (raw if isinstance(raw, dict) else {})
            for raw in (stages if isinstance(stages, list) else [])
        ],
        source=_valid(SourceSpec, data.get("source")),
        sink=_valid(SinkSpec, data.get("sink")),
        # a dead_letter: whose shape is wrong still counts as given
        dead_letter=None if dead_letter is None else _valid(SinkSpec, dead_letter) or SinkSpec(),
    )


def _placeholder(raw: dict[str, Any], index: int) -> Stage:
    """A stand-in for a stage that cannot be built, with what the pipeline checks across
    stages: its name, executor and error policy."""
    executor, on_error = raw.get("executor"), raw.get("on_error")
    return Stage(
        _stand_in,
        name=stage_name(raw) or f"stages[{index}]",
        executor=executor if isinstance(executor, str) else None,
        on_error=on_error if on_error in ON_ERROR else "fail",
    )


def stage_name(raw: Any) -> str | None:
    """A stage's name as the config gives it, or as it defaults from its `fn`."""
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("name"), str):
        return str(raw["name"])
    fn = raw.get("fn")
    return fn.rpartition(":")[2].rpartition(".")[2] or None if isinstance(fn, str) else None


def _name(spec: StageSpec) -> str:
    return spec.name or spec.fn.rpartition(":")[2].rpartition(".")[2]


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


def _exceptions(names: list[str]) -> tuple[type[BaseException], ...]:
    found = []
    for name in names:
        with contextlib.suppress(ImportProblem):  # reported with the references
            found.append(import_exception(name))
    return tuple(found)


def _stage(spec: StageSpec, resolved: dict[str, Any]) -> Stage:
    stand_in = _async_stand_in if spec.kind == "async" else _stand_in
    retries = None
    if spec.retries is not None:
        retries = Retry(
            attempts=spec.retries.attempts,
            backoff=spec.retries.backoff,
            max_backoff=spec.retries.max_backoff,
            jitter=spec.retries.jitter,
            retry_on=_exceptions(spec.retries.retry_on),
        )
    return Stage(
        resolved.get(spec.fn, stand_in),
        name=_name(spec),
        kind=spec.kind,
        workers=spec.workers,
        op=spec.op,
        ordered=spec.ordered,
        batch=spec.batch,
        queue_size=spec.queue_size,
        timeout=spec.timeout,
        retries=retries,
        on_error=spec.on_error,
        executor=spec.executor,
        setup=resolved.get(spec.setup, stand_in) if spec.setup else None,
        teardown=resolved.get(spec.teardown, _stand_in) if spec.teardown else None,
        start_method=spec.start_method,
        rate=Rate.parse(spec.rate.limit, spec.rate.burst) if spec.rate is not None else None,
        group=_group(spec, resolved),
    )


def _group(spec: StageSpec, resolved: dict[str, Any]) -> Group | None:
    given = spec.group
    if given is None:
        return None
    try:
        return Group(
            size=given.size,
            within=given.within,
            by=resolved.get(given.by, _stand_in) if given.by else None,
            max_keys=given.max_keys,
        )
    except ConfigError as exc:
        raise ConfigError([Problem(p, _name(spec), key="group") for p in exc.problems]) from None


def _source(spec: SourceSpec, resolved: dict[str, Any], base: Path) -> Any:
    # File and fn sources are factories, so every run of the pipeline reads afresh.
    if spec.range is not None:
        return range(spec.range.start, spec.range.stop, spec.range.step)
    if spec.items is not None:
        return list(spec.items)
    if spec.lines is not None:
        return FileSource(text_lines, base / spec.lines.path)
    if spec.jsonl is not None:
        return FileSource(jsonl_records, base / spec.jsonl.path)
    if spec.csv is not None:
        csv = spec.csv
        return FileSource(
            csv_rows,
            base / csv.path,
            header_lines=int(csv.header),
            header=csv.header,
            delimiter=csv.delimiter,
        )
    assert spec.fn is not None
    return functools.partial(resolved.get(spec.fn.fn, _stand_in), *spec.fn.args, **spec.fn.kwargs)


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
    return CallableSink(resolved.get(spec.fn.fn, _stand_in))
