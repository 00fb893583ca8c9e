"""A pipeline: a source, stages and a sink, run to the end or streamed into an async app."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._control import RunControl
from ._errors import ConfigError, PipeflowError, Problem, did_you_mean
from ._failures import unwrap_group
from ._group import Group
from ._plan import ErrorBudget, PlannedStage, RunPlan
from ._pools import PoolHandle, pool_for
from ._rate import rate_text
from ._report import RunReport
from ._runner import Runner
from ._sinks import ListSink, NullSink, Sink
from ._stage import Pool, Stage, duplicate_names
from ._sync_iter import SyncResults

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
            raise ConfigError(Problem("a pipeline needs at least one stage", key="stages"))
        problems = duplicate_names(self.stages)
        known = ", ".join(sorted(self.executors)) or "none declared"
        for index, stage in enumerate(self.stages):
            executor = stage.executor
            if isinstance(executor, str) and executor not in self.executors:
                hint = did_you_mean(executor, list(self.executors))
                problems.append(
                    Problem(
                        f"unknown executor {executor!r} (executors: {known}){hint}",
                        stage.name,
                        index,
                        "executor",
                    )
                )
            if stage.on_error == "dead_letter" and self.dead_letter is None:
                problems.append(
                    Problem(
                        "on_error is dead_letter but there is no dead_letter sink "
                        "(Pipeline(dead_letter=...); in a config, e.g. "
                        "`dead_letter: {jsonl: errors.jsonl}`)",
                        stage.name,
                        index,
                        "on_error",
                    )
                )
        shared = _same_file(self.sink, self.dead_letter)
        if shared is not None:
            problems.append(
                Problem(
                    f"writes to the sink's own file {shared}, which would mix results and "
                    "dead-letter records in one file; give it a file of its own",
                    key="dead_letter",
                )
            )
        if problems:
            raise ConfigError(sorted(problems, key=lambda p: p.index or 0))

    def plan(self) -> RunPlan:
        """What one run executes: the stages with pools of their own for that run."""
        pools: dict[str, PoolHandle] = {}
        stages = [PlannedStage(s, pool_for(s, self.executors, pools)) for s in self.stages]
        return RunPlan(
            name=self.name,
            stages=stages,
            pools=pools,
            budget=ErrorBudget(self.max_errors, self.max_error_rate),
            sink_queue_size=self.sink_queue_size,
            dead_letter=self.dead_letter,
        )

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
        control: RunControl | None = None,
    ) -> RunReport:
        """Run the pipeline to the end of its source and return what it did.

        Args:
            source: Overrides the pipeline's source for this run.
            progress: Called on the event loop with the live report about 5 times a second.
            control: A `RunControl` through which the app stops the run gracefully (the
                first `stop()` drains, a second cancels) and watches it.

        Returns:
            The run's report: status `ok`, `interrupted` after a `stop()`, or
            `cancelled` after a second one.

        Raises:
            PipelineError: An item failed a stage whose `on_error` is `fail`, or the source
                or the sink raised. Any `PipeflowError` a run raises carries the run's
                report as its `report` attribute.
            PipeflowError: Awaited without a running asyncio event loop (under trio).
        """
        _require_asyncio()
        control = RunControl() if control is None else control
        runner = Runner(self.plan(), self._source(source), self.sink or NullSink(), progress)
        try:
            return await control._run(runner)
        except PipeflowError as exc:
            exc.report = runner.report
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
        _require_asyncio()
        sink = ListSink()
        runner = Runner(self.plan(), self._source(source), sink)
        await runner.run()
        return sink.items

    @asynccontextmanager
    async def stream(
        self, source: Any = None, *, control: RunControl | None = None
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """Run the pipeline in the background and iterate over its results.

        Leaving the block early (a `break`, an exception) cancels the run and shuts its
        pools down before the block is left.

        Args:
            source: Overrides the pipeline's source for this run.
            control: A `RunControl`, as for `run()`: after its first `stop()` the results
                end once every item taken from the source has come out.

        Raises:
            PipelineError: As `run()`.
        """
        _require_asyncio()
        send, recv = anyio.create_memory_object_stream[list[Any]](2)
        runner = Runner(self.plan(), self._source(source), _ChannelSink(send))
        control = RunControl() if control is None else control
        results = _Results(recv)
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(control._run, runner)
                try:
                    yield results
                finally:
                    if not results.exhausted:
                        tg.cancel_scope.cancel()
                    recv.close()
        except BaseExceptionGroup as group:
            error = unwrap_group(group)
        if error is not None:
            # raised outside the except block: the group is no part of the error's context
            raise error from error.__cause__

    def iter(self, source: Any = None) -> SyncResults:
        """Run the pipeline in a background thread and iterate over its results, from
        synchronous code (a script, a notebook cell).

        The run is `stream()`'s, on an event loop of its own: it waits while results are
        not taken, and closing the iterator (a `with` block's end, `close()`, leaving a
        `for` loop by `break` or an exception, dropping the iterator) cancels the run and
        returns once its pools are shut down; its `stop()` stops the run gracefully,
        as `RunControl.stop()` does. In Jupyter it runs in a cell like any synchronous
        code.

        Args:
            source: Overrides the pipeline's source for this run.

        Returns:
            An iterator over the results, which is also a context manager.

        Raises:
            RuntimeError: Called from async code (a running event loop outside Jupyter):
                use `async with pipeline.stream(...)`.
            PipelineError: From the iterator, as `stream()` raises it.
        """
        if _loop_running() and not _in_notebook():
            raise RuntimeError(
                "iter() called inside an event loop, where waiting for a result would block "
                "it: use `async with pipeline.stream(source) as results: async for ...`"
            )
        return SyncResults(self.stream, source)

    def describe(self) -> list[dict[str, Any]]:
        """Each stage's name, kind, workers, op, queue bound, rate and group, as a graph
        would show them."""
        rows = []
        for stage, pool in self.plan().stages:
            workers = pool.workers if pool else stage.workers
            rows.append(
                {
                    "name": stage.name,
                    "kind": "auto" if stage.kind == "auto" else pool.kind if pool else "async",
                    "workers": "auto" if stage.auto_workers else workers,
                    "executor": pool.name if pool and isinstance(stage.executor, str) else None,
                    "op": stage.op,
                    "ordered": stage.ordered,
                    "queue_size": stage.queue_size,
                    "on_error": stage.on_error,
                    "rate": None if stage.rate_limit is None else rate_text(stage.rate_limit),
                    "group": _group_text(stage.grouping),
                }
            )
        return rows


def _group_text(group: Group | None) -> str | None:
    """A group as a config writes it: its size, `within`, and the name of its key."""
    if group is None:
        return None
    parts = [] if group.size is None else [f"size {group.size}"]
    if group.within is not None:
        parts.append(f"within {group.within:g}s")
    if group.by is not None:
        parts.append(f"by {getattr(group.by, '__name__', 'key')}")
    return " ".join(parts)


def _same_file(sink: Sink | None, dead_letter: Sink | None) -> str | None:
    """The file both sinks write to, if they write to the same one."""
    paths = [getattr(s, "path", None) for s in (sink, dead_letter)]
    if not all(isinstance(p, os.PathLike | str) for p in paths):
        return None
    first, second = (Path(p).resolve() for p in paths)  # type: ignore[arg-type]
    if first == second or (first.exists() and second.exists() and first.samefile(second)):
        return str(paths[0])
    return None


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _in_notebook() -> bool:
    """Whether this is a Jupyter kernel's thread, whose cells run on its event loop."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _require_asyncio() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise PipeflowError(
            "pipeflow runs on asyncio only, and no asyncio event loop is running here "
            "(trio, for one, is not supported): run the pipeline under asyncio "
            "(asyncio.run, anyio.run(..., backend='asyncio'), a notebook) or call run_sync()"
        ) from None


class _ChannelSink(Sink):
    """The sink of `stream()`: batches go to the consumer through a small bounded queue."""

    def __init__(self, send: MemoryObjectSendStream[list[Any]]) -> None:
        self.send = send

    async def write(self, values: list[Any]) -> None:
        try:  # no checkpoint first: it would add a turn of the loop to every result's way
            self.send.send_nowait(values)
        except anyio.WouldBlock:
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

    async def next_batch(self) -> list[Any] | None:
        """The results not taken yet of the current batch, or the next batch; None at
        the end."""
        if self.position < len(self.buffer):
            rest = self.buffer[self.position :]
            self.buffer, self.position = [], 0
            return rest
        try:
            return await self.recv.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self.exhausted = True
            return None

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
