"""What a run did: counts and times per stage, collected while it runs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["RunReport", "StageReport"]

Status = Literal["running", "ok", "failed", "cancelled", "interrupted"]


@dataclass
class StageReport:
    """Counts and times of one stage.

    For a `map` stage every item is accounted for:
    `items_in == items_out + skipped + dead_lettered + failed + in_flight`.
    A `filter` stage adds `filtered_out`; a `flat_map` stage may emit any number of outputs.

    Attributes:
        name: The stage's name.
        kind: `async`, `thread`, `process` or `dask`; a pool passed in by the caller
            shows its own kind (`thread`, `process`), or `executor` when it is another.
        workers: Pool size, or concurrent tasks for async.
        items_in: Items the stage received.
        items_out: Results it emitted.
        errors: Items whose final outcome was an error (skipped, dead-lettered or failed).
        retries: Extra attempts made after an error.
        skipped: Items dropped by `on_error: skip`.
        dead_lettered: Items sent to the dead-letter sink.
        failed: Items that failed the run (0 or 1).
        filtered_out: Items a `filter` stage dropped.
        in_flight: Items received but not finished when the run ended early.
        crashed: Items whose worker process died.
        timed_out: Items that ran past `timeout`.
        busy_s: Seconds spent in the stage's callable, summed over workers.
        loop_blocked_s: For an async stage, seconds its steps held the event loop in
            steps over 100 ms (time it ran without awaiting, stalling every other stage).
        max_loop_block_s: For an async stage, its longest such step.
        idle_s: Seconds the stage waited on an empty input queue.
        blocked_s: Seconds the stage waited on a full output queue (backpressure).
        calls: Executor calls made (chunks).
        queue_size: The bound of the input queue, in batches.
        queue_high_water: The most batches its input queue ever held.
        pool_start_s: Seconds spent creating the stage's pool.
        by_worker: Items handled per worker (`pid N` or a thread name).
        latency_p50_s: Seconds per item in the worker, median (a call's time over its
            items; for an async stage, each coroutine's own time).
        latency_p90_s: The same, 90th percentile.
        latency_p99_s: The same, 99th percentile.
        workers_auto: For `workers: auto`, its bounds `{min, max}`; `workers` is then the
            concurrency the stage ended with.
        concurrency: For `workers: auto`, each change of concurrency as `(t, workers)`,
            seconds from the stage's first result (at most 200).
        decisions: For `workers: auto`, what was measured at each step, as `{t, workers,
            reason}` (at most 200).
        kind_choice: For `kind: auto`, where the stage ran and why, as `{kind, reason}`.
    """

    name: str
    kind: str
    workers: int
    items_in: int = 0
    items_out: int = 0
    errors: int = 0
    retries: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    failed: int = 0
    filtered_out: int = 0
    in_flight: int = 0
    crashed: int = 0
    timed_out: int = 0
    busy_s: float = 0.0
    loop_blocked_s: float = 0.0
    max_loop_block_s: float = 0.0
    idle_s: float = 0.0
    blocked_s: float = 0.0
    calls: int = 0
    queue_size: int = 0
    queue_high_water: int = 0
    pool_start_s: float = 0.0
    by_worker: dict[str, int] = field(default_factory=dict)
    latency_p50_s: float = 0.0
    latency_p90_s: float = 0.0
    latency_p99_s: float = 0.0
    workers_auto: dict[str, int] | None = None
    concurrency: list[tuple[float, int]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    kind_choice: dict[str, str] | None = None


@dataclass
class RunReport:
    """What one run of a pipeline did.

    Attributes:
        name: The pipeline's name.
        status: `ok`, `failed`, `cancelled`, `interrupted`, or `running` while it runs.
        wall_s: Seconds from start to end.
        items_read: Items taken from the source.
        items_written: Items given to the sink.
        source_blocked_s: Seconds the source waited on the first stage's full queue
            (backpressure reaching the source).
        stages: One `StageReport` per stage, in order.
        error: The failure's message when the run failed.
    """

    name: str
    status: Status = "running"
    wall_s: float = 0.0
    items_read: int = 0
    items_written: int = 0
    source_blocked_s: float = 0.0
    stages: list[StageReport] = field(default_factory=list)
    error: str | None = None

    def stage(self, name: str) -> StageReport:
        """The report of the stage called `name`.

        Raises:
            KeyError: No stage has that name.
        """
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def utilisation(self, name: str) -> float:
        """Busy time of stage `name` over (wall time x workers), between 0 and 1."""
        stage = self.stage(name)
        available = self.wall_s * stage.workers
        return min(1.0, stage.busy_s / available) if available > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data, as written by `--report`."""
        data = asdict(self)
        for stage in data["stages"]:
            for key, value in stage.items():
                if isinstance(value, float):
                    stage[key] = round(value, 6)
            stage["utilisation"] = round(self.utilisation(stage["name"]), 4)
        data["wall_s"] = round(self.wall_s, 6)
        data["source_blocked_s"] = round(self.source_blocked_s, 6)
        return data

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)
