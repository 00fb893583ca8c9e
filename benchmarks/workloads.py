"""The work the benchmarks apply: plain module-level functions, so process pools can pickle them.

Every runner in `run.py`, pipeflow and peers alike, calls these same functions.
"""

from __future__ import annotations

import asyncio
import time

# Sleep of one I/O-bound item.
IO_SLEEP_S = 0.005
# Loop length of one CPU-heavy item: about 3 ms of pure Python on the reference machine.
CPU_HEAVY_LOOPS = 40_000
# Loop length of the CPU stage of the 3-stage mix: about 1.5 ms.
CPU_MIX_LOOPS = 20_000


def square(x: int) -> int:
    """The trivial map: almost no work, so what is measured is the framework."""
    return x * x


def burn(loops: int) -> int:
    """Pure-Python CPU work that holds the GIL for `loops` iterations."""
    total = 0
    for i in range(loops):
        total += i * i % 7
    return total


def cpu_heavy(x: int) -> int:
    """A few milliseconds of CPU per item."""
    return burn(CPU_HEAVY_LOOPS) + x


def cpu_mix(x: int) -> int:
    """The CPU stage of the 3-stage mix."""
    return burn(CPU_MIX_LOOPS) + x


def io_sleep(x: int) -> int:
    """A blocking I/O call stand-in: 5 ms that hold no CPU."""
    time.sleep(IO_SLEEP_S)
    return x


async def io_sleep_async(x: int) -> int:
    """The same wait, as a coroutine."""
    await asyncio.sleep(IO_SLEEP_S)
    return x
