"""Retry and `on_error` settlement of a chunk's results: failed items are retried as
the stage's retry policy allows, then skipped, dead-lettered or made to fail the run.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from ._batches import Batch
from ._calls import _ExecutorCalls
from ._errors import ItemTimeout, PipelineError, RemoteTraceback, WorkerCrashed, short_repr
from ._log import logger
from ._stage import Retry
from ._worker import ChunkResult, Failure


class _Settlement(_ExecutorCalls):
    """StageRun's settlement of a chunk's results: retries, then `on_error`."""

    # set by StageRun
    retry: Retry | None
    random: random.Random
    dead_letter: Callable[[dict[str, Any]], Awaitable[None]]
    check_error_budget: Callable[[], None]

    async def process(self, chunk: Batch) -> Batch:
        """Run one chunk, retrying and settling failures; return its results in order."""
        return await self.settle(chunk, await self._call_isolating(chunk.values))

    async def settle(self, chunk: Batch, result: ChunkResult) -> Batch:
        """A chunk's results in order, once its failures are retried or settled."""
        if not result.failures:
            return self._outputs_fast(chunk, result)
        by_position: dict[int, list[Any]] = {}
        self._collect(result, range(len(chunk.values)), by_position)
        failures = result.failures
        attempt = 1
        while failures:
            retryable: list[Failure] = []
            for failure in failures:
                if self._should_retry(failure, attempt):
                    retryable.append(failure)
                else:
                    await self._settle_failure(chunk, failure, attempt, result.worker)
            if not retryable:
                break
            self.report.retries += len(retryable)
            assert self.retry is not None
            logger.info(
                "item_retry",
                stage=self.name,
                attempt=attempt + 1,
                items=[chunk.indices[f.position] for f in retryable],
                error=retryable[0].error_type,
            )
            await anyio.sleep(self.retry.delay(attempt, self.random.random))
            attempt += 1
            positions = [f.position for f in retryable]
            result = await self._call_isolating([chunk.values[p] for p in positions])
            self._collect(result, positions, by_position)
            failures = [
                Failure(positions[f.position], f.error, f.error_type, f.message, f.traceback)
                for f in result.failures
            ]
        indices: list[int] = []
        values: list[Any] = []
        for position in sorted(by_position):
            produced = by_position[position]
            values.extend(produced)
            indices.extend([chunk.indices[position]] * len(produced))
        self.report.items_out += len(values)
        return Batch(indices, values)

    def _outputs_fast(self, chunk: Batch, result: ChunkResult) -> Batch:
        self.report.items_out += len(result.outputs)
        if self.stage.op == "filter":
            self.report.filtered_out += len(chunk.values) - len(result.outputs)
        if result.kept is None:
            return Batch(chunk.indices, result.outputs)
        indices = chunk.indices
        return Batch([indices[p] for p in result.kept], result.outputs)

    def _collect(
        self, result: ChunkResult, positions: Sequence[int], by_position: dict[int, list[Any]]
    ) -> None:
        """File a (partial) chunk's outputs under the chunk positions they came from."""
        failed = {f.position for f in result.failures}
        kept = result.kept if result.kept is not None else range(len(result.outputs))
        for output, local in zip(result.outputs, kept, strict=True):
            by_position.setdefault(positions[local], []).append(output)
        if self.stage.op == "filter":
            passed = {positions[local] for local in kept}
            dropped = [p for i, p in enumerate(positions) if i not in failed and p not in passed]
            self.report.filtered_out += len(dropped)

    def _should_retry(self, failure: Failure, attempt: int) -> bool:
        retry = self.retry
        if retry is None or attempt >= retry.attempts or isinstance(failure.error, WorkerCrashed):
            return False
        return isinstance(failure.error, retry.retry_on)

    async def _settle_failure(
        self, chunk: Batch, failure: Failure, attempts: int, worker: str
    ) -> None:
        """Apply `on_error` to an item whose last attempt failed."""
        report = self.report
        index = chunk.indices[failure.position]
        value = chunk.values[failure.position]
        policy = self.stage.on_error
        report.errors += 1
        if isinstance(failure.error, WorkerCrashed):
            report.crashed += 1
        elif isinstance(failure.error, ItemTimeout):
            report.timed_out += 1
        logger.warning(
            "item_error",
            stage=self.name,
            index=index,
            item=short_repr(value),
            error=failure.error_type,
            message=failure.message,
            attempts=attempts,
            worker=worker,
            on_error=policy,
        )
        if policy == "fail":
            report.failed += 1
            raise self._pipeline_error(index, value, failure, attempts)
        if policy == "skip":
            report.skipped += 1
        else:
            report.dead_lettered += 1
            record = {
                "stage": self.name,
                "index": index,
                "item": value,
                "error": failure.error_type,
                "message": failure.message,
                "traceback": failure.traceback,
                "attempts": attempts,
            }
            await self.dead_letter(record)
        self.check_error_budget()

    def _pipeline_error(
        self, index: int, value: Any, failure: Failure, attempts: int
    ) -> PipelineError:
        error = PipelineError(
            stage=self.name,
            index=index,
            item_repr=short_repr(value),
            error_type=failure.error_type,
            error_message=failure.message,
            traceback=failure.traceback,
            attempts=attempts,
        )
        cause = failure.error
        if cause.__traceback__ is None and cause.__cause__ is None:
            cause.__cause__ = RemoteTraceback(failure.traceback)
        error.__cause__ = cause
        return error
