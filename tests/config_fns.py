"""Callables that the test configs name by `config_fns:NAME` (run with tests/ as app dir)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any


def identity(value: Any) -> Any:
    return value


async def async_double(n: int) -> int:
    return 2 * n


def square(n: int) -> int:
    return n * n


def double(n: int) -> int:
    return 2 * n


def fail_on_3(n: int) -> int:
    if n == 3:
        raise ValueError(f"three is not allowed (got {n})")
    return n


def slow(n: int) -> int:
    """A thread stage that takes a while, so a run lasts long enough to watch."""
    time.sleep(0.05)
    return n


def count_up(stop: int, *, step: int = 1) -> Iterator[int]:
    yield from range(0, stop, step)


async def count_up_async(stop: int) -> AsyncIterator[int]:
    for n in range(stop):
        yield n


collected: list[Any] = []


def collect(value: Any) -> None:
    """A sink: keeps every result in `collected`."""
    collected.append(value)


class _Locked:
    """A callable holding a lock: it works in a thread but cannot be sent to a process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, n: int) -> int:
        with self.lock:
            return n


unpicklable = _Locked()
not_callable = 42


async def hog_on_2(n: int) -> int:
    """Item 2 blocks the event loop for 1 s: a blocking call inside `async def`."""
    if n == 2:
        time.sleep(1.0)  # noqa: ASYNC251 - the blocking call this test is about
    return n


async def hog_for_good_on_2(n: int) -> int:
    """Item 2 writes $PIPEFLOW_TEST_MARKER, then holds the event loop for an hour."""
    if n == 2:
        with open(os.environ["PIPEFLOW_TEST_MARKER"], "w") as marker:  # noqa: ASYNC230
            marker.write("holding the loop")
        time.sleep(3600)  # noqa: ASYNC251 - the blocking call this test is about
    return n
