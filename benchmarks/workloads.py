"""The work the benchmarks apply: module-level functions and sources, so pools can pickle them.

Every contender in `run.py`, pipeflow and peers alike, calls these same functions on items
from these same sources.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import zlib
from collections.abc import Iterator

# Sleep of one I/O-bound item.
IO_SLEEP_S = 0.005
# Loop length of one CPU-heavy item: about 3 ms of pure Python on the reference machine.
CPU_HEAVY_LOOPS = 40_000
MIB = 1 << 20
KIB = 1 << 10

# Incompressible bytes that items are cut from, so that zlib does real work.
_RANDOM = os.urandom(2 * MIB)


def square(x: int) -> int:
    """The trivial map: almost no work, so what is measured is the framework."""
    return x * x


def identity(x: object) -> object:
    """A stage that only passes its item on (latency, chains)."""
    return x


async def inc_async(x: int) -> int:
    """A trivial coroutine: what an async stage costs by itself."""
    return x + 1


def burn(loops: int) -> int:
    """Pure-Python CPU work that holds the GIL for `loops` iterations."""
    total = 0
    for i in range(loops):
        total += i * i % 7
    return total


def cpu_heavy(x: int) -> int:
    """A few milliseconds of CPU per item."""
    return burn(CPU_HEAVY_LOOPS) + x


def io_sleep(x: int) -> int:
    """A blocking I/O call stand-in: 5 ms that hold no CPU."""
    time.sleep(IO_SLEEP_S)
    return x


async def io_sleep_async(x: int) -> int:
    """The same wait, as a coroutine."""
    await asyncio.sleep(IO_SLEEP_S)
    return x


def nbytes(blob: bytes) -> int:
    """The large-item stage: the cost is carrying the item, not the function."""
    return len(blob)


def sha256_hex(blob: bytes) -> str:
    """A hash over the item: CPU work proportional to its size, GIL released by hashlib."""
    return hashlib.sha256(blob).hexdigest()


def digest_and_compress(blob: bytes) -> tuple[str, int]:
    """GIL-releasing work (hashlib, zlib) that threads can run side by side."""
    return hashlib.sha256(blob).hexdigest(), len(zlib.compress(blob, 1))


def ints(n: int) -> Iterator[int]:
    """A generator source of `n` ints: the shape of a real source, unlike a `range`."""
    yield from range(n)


def blobs(n: int, size: int) -> Iterator[bytes]:
    """`n` distinct items of `size` bytes, made one at a time (a reader's shape)."""
    span = len(_RANDOM) - size
    for i in range(n):
        offset = (i * 4099) % span if span > 0 else 0
        yield i.to_bytes(8, "little") + _RANDOM[offset + 8 : offset + size]


def paced(n: int, interval_s: float, emitted: list[float]) -> Iterator[int]:
    """A slow source: item i is yielded at start + i * interval_s; its time goes to emitted[i]."""
    start = time.perf_counter()
    for i in range(n):
        delay = start + i * interval_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        emitted.append(time.perf_counter())
        yield i


BOUND_TABLE_BYTES = 20 * MIB


def bound_table() -> list[int]:
    """A lookup table of about 20 MB pickled: what a stage binds into its callable."""
    return list(range(BOUND_TABLE_BYTES // 5))


def look_up(table: list[int], x: int) -> int:
    """An item's entry in a table bound with `functools.partial(look_up, table)`."""
    return table[x % len(table)]


def look_up_in_state(x: int, table: list[int]) -> int:
    """The same lookup, the table loaded by the stage's `setup` instead."""
    return table[x % len(table)]


_initialized_table: list[int] = []


def init_table() -> None:
    """A `Pool(initializer=...)` that loads the table once per worker."""
    _initialized_table[:] = bound_table()


def look_up_initialized(x: int) -> int:
    return _initialized_table[x % len(_initialized_table)]
