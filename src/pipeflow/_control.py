"""A handle on one run, for the app that started it: stop it gracefully, watch it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from ._errors import PipeflowError
from ._report import RunReport

if TYPE_CHECKING:
    from ._runner import Runner

__all__ = ["RunControl"]


class RunControl:
    """A handle on one run: stop it gracefully, read its live report, see its workers.

    Pass one to `Pipeline.run(control=...)` or `Pipeline.stream(control=...)`, then call
    `stop()` from any task on the run's event loop (a signal handler, a web endpoint, a
    timer). The first `stop()` stops taking items from the source and lets every item
    already taken finish and reach the sink; the run then ends with status
    `interrupted`. A second `stop()` cancels the run: what is in flight is dropped, and
    `run()` returns the report with status `cancelled`. A stop before the run starts
    takes effect as it starts. One handle serves one run.

    Args:
        keep_samples: Keep the items and results of the first few calls of each stage
            whose calls cross a process boundary (see `samples()`), to estimate what
            pickling them costs.

    Example:
        ```python
        control = pipeflow.RunControl()
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_request, control)   # calls control.stop()
            report = await pipeline.run(control=control)
        ```
    """

    def __init__(self, *, keep_samples: bool = False) -> None:
        self.keep_samples = keep_samples
        self.stops = 0
        self._runner: Runner | None = None
        self._scope: anyio.CancelScope | None = None  # made on the run's event loop

    def stop(self) -> None:
        """Stop the run: the first call drains what was taken from the source, a second
        cancels. Call it on the run's event loop thread."""
        self.stops += 1
        if self._runner is not None:
            self._apply()

    @property
    def stopping(self) -> bool:
        """Whether `stop()` was called."""
        return self.stops > 0

    @property
    def report(self) -> RunReport | None:
        """The run's live report (updated as the run goes), or None before it starts."""
        return self._runner.report if self._runner is not None else None

    def worker_pids(self) -> list[int]:
        """The process ids of the run's pool workers alive now (process and local Dask
        pools; threads have none)."""
        if self._runner is None:
            return []
        return [pid for pool in self._runner.pools.values() for pid in pool.pids()]

    @property
    def pool_start_s(self) -> float:
        """Seconds spent starting the run's pools, each pool counted once."""
        if self._runner is None:
            return 0.0
        return sum(pool.start_s for pool in self._runner.pools.values())

    @property
    def abandoned_threads(self) -> int:
        """Threads this run gave up on after a timeout: they may never return, so a
        command-line run ends its process without waiting for them."""
        if self._runner is None:
            return 0
        return sum(pool.abandoned for pool in self._runner.pools.values())

    def samples(self, stage: str) -> list[tuple[list[Any], list[Any]]] | None:
        """The (items, results) of the first calls of `stage`, or None if they are not
        kept: `keep_samples` is off, or the stage's calls do not cross a process boundary."""
        if self._runner is None:
            return None
        for run in self._runner.stages:
            if run.name == stage and run.samples is not None:
                return list(run.samples)
        return None

    def _apply(self) -> None:
        assert self._runner is not None and self._scope is not None
        if self.stops >= 1:
            self._runner.request_stop()
        if self.stops >= 2:
            self._scope.cancel()

    async def _run(self, runner: Runner) -> RunReport:
        """Run `runner` under this handle; a cancelling stop returns the report."""
        if self._runner is not None:
            raise PipeflowError("a RunControl serves one run: make a new one for each run")
        self._runner = runner
        self._scope = anyio.CancelScope()
        if self.keep_samples:
            for stage in runner.stages:
                if stage.pool is not None and stage.pool.remote:
                    stage.samples = []
        if self.stops:
            self._apply()
        with self._scope:
            return await runner.run()
        return runner.report  # cancelled by a second stop()
