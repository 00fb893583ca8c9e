"""Timing an async stage's steps: what runs between two awaits holds the event loop.

asyncio's debug mode warns about a callback slower than 100 ms; pipeflow does the same for
the stages, always on and cheaply, by driving a stage's coroutine itself: each `send` or
`throw` into it is one step, and nothing else can run on the loop while it lasts. A step
over `LOOP_BLOCK_S` is reported against the stage that took it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["LOOP_BLOCK_S", "TimedSteps"]

LOOP_BLOCK_S = 0.1

T = TypeVar("T")

_NOT_STARTED: Any = object()


class TimedSteps(Generic[T]):
    """Awaits `coro`, calling `on_block(seconds)` for each step longer than `LOOP_BLOCK_S`."""

    def __init__(
        self,
        coro: Coroutine[Any, Any, T],
        on_block: Callable[[float], None],
        yielded: Any = _NOT_STARTED,
    ) -> None:
        # `yielded`: what the coroutine's first step (taken and timed by the caller) yielded
        self._coro = coro
        self._on_block = on_block
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, T]:
        coro = self._coro
        step: Callable[[Any], Any] | None = coro.send
        message: Any = None
        yielded = self._yielded
        if yielded is not _NOT_STARTED:
            step = None
        while True:
            if step is not None:
                started = time.perf_counter()
                try:
                    yielded = step(message)
                except StopIteration as done:
                    self._took(started)
                    return done.value  # type: ignore[no-any-return]
                except BaseException:
                    self._took(started)
                    raise
                self._took(started)
            try:
                message = yield yielded
                step = coro.send
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation, thrown in by the task
                step, message = coro.throw, exc

    def _took(self, started: float) -> None:
        took = time.perf_counter() - started
        if took > LOOP_BLOCK_S:
            self._on_block(took)
