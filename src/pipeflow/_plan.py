"""What one run executes, as the engine takes it: a plain plan, never a `Pipeline`.

`Pipeline` checks what the user declared and builds a `RunPlan` for each run; `Runner`
executes it. The plan holds the run's own pool handles (made once per named executor,
lent executor or stage, by `_pools.pool_for`), so two runs of one pipeline share nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ._errors import ErrorBudgetExceeded
from ._pools import PoolHandle
from ._report import RunReport
from ._sinks import Sink
from ._stage import Stage

__all__ = ["ErrorBudget", "PlannedStage", "RunPlan"]


@dataclass(frozen=True)
class ErrorBudget:
    """How many failed items a run may skip or dead-letter before it is aborted.

    Attributes:
        max_errors: The most items that may be skipped or dead-lettered, or None.
        max_error_rate: The largest share of the items read that may be (checked once
            there are 10 such items), or None.
    """

    max_errors: int | None = None
    max_error_rate: float | None = None

    def check(self, report: RunReport) -> None:
        """Raise ErrorBudgetExceeded if the run's skipped + dead-lettered items exceed it."""
        budget, rate = self.max_errors, self.max_error_rate
        if budget is None and rate is None:
            return
        errors = sum(s.skipped + s.dead_lettered for s in report.stages)
        seen = max(1, report.items_read)
        if (budget is not None and errors > budget) or (
            rate is not None and errors >= 10 and errors / seen > rate
        ):
            raise ErrorBudgetExceeded(
                f"{errors} items skipped or dead-lettered out of {seen} read, over the "
                f"error budget (max_errors={budget}, max_error_rate={rate})"
            )


class PlannedStage(NamedTuple):
    """A stage and the pool it runs in during one run (None: on the event loop)."""

    stage: Stage
    pool: PoolHandle | None


@dataclass(frozen=True)
class RunPlan:
    """Everything one run needs, and nothing of the `Pipeline` that built it.

    Attributes:
        name: The pipeline's name, for logs and the report.
        stages: The stages in order, each with its pool.
        pools: The run's pool handles, each once (several stages may share one).
        budget: The error budget.
        sink_queue_size: The bound, in batches, of the queue in front of the sink.
        dead_letter: The sink of dead-letter records, or None.
    """

    name: str
    stages: list[PlannedStage]
    pools: dict[str, PoolHandle]
    budget: ErrorBudget
    sink_queue_size: int
    dead_letter: Sink | None
