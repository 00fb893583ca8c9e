"""A pipeline: a source, stages and a sink, run to the end or streamed into an async app."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import ConfigError
from ._pools import PoolHandle
from ._report import RunReport
from ._runner import Runner, unwrap_group
from ._sinks import ListSink, NullSink, Sink
from ._stage import Pool, Stage, check_unique_names

__all__ = ["Pipeline"]


class Pipeline:
    """Stages joined by bounded queues, between a source and a sink.

    Args:
        stages: The stages, in order.
        source: Any iterable or async iterable; `run(source)` and `stream(source)` may
            pass another. Iterables that may block (generators, files) are pulled in a
            worker thread, so the event loop never waits on them.
        sink: Where results go (a `Sink`); by default they are counted and dropped.
        dead_letter: The `Sink` that receives the records of `on_error: dead_letter`.
        executors: Named pools that stages share through `Stage(executor="name")`: a
            `Pool` the pipeline creates, or any `concurrent.futures.Executor` it only uses.
        name: Shown in logs and reports.
        max_errors: Abort the run when more items than this are skipped or dead-lettered.
        max_error_rate: Abort the run when that share of the items read is exceeded.
        sink_queue_size: The bound, in batches, of the queue in front of the sink.

    Raises:
        ConfigError: Duplicate stage names, an unknown executor name, a dead_letter
            policy without a dead-letter sink, and the like.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        source: Iterable[Any] | Any = None,
        sink: Sink | None = None,
        dead_letter: Sink | None = None,
        executors: Mapping[str, Pool | concurrent.futures.Executor] | None = None,
        name: str = "pipeline",
        max_errors: int | None = None,
        max_error_rate: float | None = None,
        sink_queue_size: int = 8,
    ) -> None:
        self.stages = list(stages)
        self.source = source
        self.sink = sink
        self.dead_letter = dead_letter
        self.executors = dict(executors or {})
        self.name = name
        self.max_errors = max_errors
        self.max_error_rate = max_error_rate
        self.sink_queue_size = sink_queue_size
        self._check()

    def _check(self) -> None:
        if not self.stages:
            raise ConfigError("a pipeline needs at least one stage")
        check_unique_names(self.stages)
        problems = []
        for stage in self.stages:
            if isinstance(stage.executor, str) and stage.executor not in self.executors:
                known = ", ".join(sorted(self.executors)) or "none declared"
                problems.append(
                    f"stage {stage.name!r}: unknown executor {stage.executor!r} ({known})"
                )
            if stage.on_error == "dead_letter" and self.dead_letter is None:
                problems.append(
                    f"stage {stage.name!r}: on_error is dead_letter but the pipeline has "
                    "no dead_letter sink"
                )
        shared = _same_file(self.sink, self.dead_letter)
        if shared is not None:
            problems.append(
                f"dead_letter: writes to the sink's own file {shared}, which would mix "
                "results and dead-letter records in one file; give it a file of its own"
            )
        if problems:
            raise ConfigError(problems)

    def pool_for(self, stage: Stage, pools: dict[str, PoolHandle]) -> PoolHandle | None:
        """The pool `stage` runs in for one run, made once per name in `pools`."""
        executor = stage.executor
        if isinstance(executor, str):
            key = f"executor:{executor}"
            if key not in pools:
                declared = self.executors[executor]
                if isinstance(declared, Pool):
                    pools[key] = PoolHandle(executor, spec=declared)
                else:
                    pools[key] = PoolHandle(executor, executor=declared)
            return pools[key]
        if executor is not None:
            key = f"lent:{id(executor)}"
            pools.setdefault(key, PoolHandle(stage.name or "stage", executor=executor))
            return pools[key]
        if stage.kind == "async":
            return None
        key = f"stage:{stage.name}"
        spec = Pool(stage.kind, stage.workers, start_method=stage.start_method)
        pools[key] = PoolHandle(stage.name or "stage", spec=spec)
        return pools[key]

    def _source(self, source: Any) -> Any:
        chosen = self.source if source is None else source
        if chosen is None:
            raise ConfigError("no source: pass one to Pipeline(source=...) or to run()/stream()")
        if (
            callable(chosen)
            and not hasattr(chosen, "__iter__")
            and not hasattr(chosen, "__aiter__")
        ):
            chosen = chosen()
        return chosen

    async def run(
        self,
        source: Any = None,
        *,
        progress: Callable[[RunReport], Any] | None = None,
        runner_ready: Callable[[Runner], Any] | None = None,
    ) -> RunReport:
        """Run the pipeline to the end of its source and return what it did.

        Args:
            source: Overrides the pipeline's source for this run.
            progress: Called on the event loop with the live report about 5 times a second.
            runner_ready: Called with the run's `Runner` before it starts (to request a
                graceful stop from a signal handler, for instance).

        Returns:
            The run's report.

        Raises:
            PipelineError: An item failed a stage whose `on_error` is `fail`, or the source
                or the sink raised. The report is attached as its `report` attribute.
        """
        runner = Runner(self, self._source(source), self.sink or NullSink(), progress)
        if runner_ready is not None:
            runner_ready(runner)
        try:
            return await runner.run()
        except Exception as exc:
            exc.report = runner.report  # type: ignore[attr-defined]
            raise

    def run_sync(self, source: Any = None, **kwargs: Any) -> RunReport:
        """Run the pipeline from synchronous code (starts and closes an event loop).

        Raises:
            RuntimeError: Called from inside a running event loop; use `await run()`.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("run_sync() called inside an event loop: use `await pipeline.run()`")
        return anyio.run(lambda: self.run(source, **kwargs))

    async def collect(self, source: Any = None) -> list[Any]:
        """Run the pipeline and return its results as a list (for small runs and tests)."""
        sink = ListSink()
        runner = Runner(self, self._source(source), sink)
        await runner.run()
        return sink.items

    @asynccontextmanager
    async def stream(self, source: Any = None) -> AsyncIterator[AsyncIterator[Any]]:
        """Run the pipeline in the background and iterate over its results.

        Leaving the block early (a `break`, an exception) cancels the run and shuts its
        pools down before the block is left.

        Raises:
            PipelineError: As `run()`.
        """
        send, recv = anyio.create_memory_object_stream[list[Any]](2)
        runner = Runner(self, self._source(source), _ChannelSink(send))
        results = _Results(recv)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner.run)
                try:
                    yield results
                finally:
                    if not results.exhausted:
                        tg.cancel_scope.cancel()
                    recv.close()
        except BaseExceptionGroup as group:
            error = unwrap_group(group)
            raise error from error.__cause__

    def describe(self) -> list[dict[str, Any]]:
        """Each stage's name, kind, workers, op and queue bound, as a graph would show them."""
        pools: dict[str, PoolHandle] = {}
        rows = []
        for stage in self.stages:
            pool = self.pool_for(stage, pools)
            rows.append(
                {
                    "name": stage.name,
                    "kind": pool.kind if pool else "async",
                    "workers": pool.workers if pool else stage.workers,
                    "executor": pool.name if pool and isinstance(stage.executor, str) else None,
                    "op": stage.op,
                    "ordered": stage.ordered,
                    "queue_size": stage.queue_size,
                    "on_error": stage.on_error,
                }
            )
        return rows


def _same_file(sink: Sink | None, dead_letter: Sink | None) -> str | None:
    """The file both sinks write to, if they write to the same one."""
    paths = [getattr(s, "path", None) for s in (sink, dead_letter)]
    if not all(isinstance(p, os.PathLike | str) for p in paths):
        return None
    first, second = (Path(p).resolve() for p in paths)  # type: ignore[arg-type]
    if first == second or (first.exists() and second.exists() and first.samefile(second)):
        return str(paths[0])
    return None


class _ChannelSink(Sink):
    """The sink of `stream()`: batches go to the consumer through a small bounded queue."""

    def __init__(self, send: MemoryObjectSendStream[list[Any]]) -> None:
        self.send = send

    async def write(self, values: list[Any]) -> None:
        await self.send.send(values)

    async def close(self) -> None:
        await self.send.aclose()


class _Results:
    """The async iterator `stream()` yields: one result at a time, from whole batches."""

    def __init__(self, recv: MemoryObjectReceiveStream[list[Any]]) -> None:
        self.recv = recv
        self.buffer: list[Any] = []
        self.position = 0
        self.exhausted = False

    def __aiter__(self) -> _Results:
        return self

    async def __anext__(self) -> Any:
        if self.position >= len(self.buffer):
            try:
                self.buffer = await self.recv.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                self.exhausted = True
                raise StopAsyncIteration from None
            self.position = 0
        value = self.buffer[self.position]
        self.position += 1
        return value
