"""Q5 of the notebook: sharing data between workers, two ways.

1. Shared state under a lock (threads only): every worker thread of the `tally` stage
   updates one module-level tally, and a `threading.Lock` makes each read-modify-write
   atomic. Process workers could not do this: each has its own copy of the module.
2. Partial results (threads, processes, anywhere): `partial_sum_of_squares` returns one
   partial result per batch, with no shared memory at all, and the `combine` sink adds
   them up in the one place that sees every result.
"""

import threading
import time
from typing import Any

TALLY_LOCK = threading.Lock()
TALLY = {"count": 0, "total": 0}


def _update(number: int) -> dict[str, int]:
    count, total = TALLY["count"], TALLY["total"]
    # a thread switch here makes two workers write back the same old values: the gap
    # that the lock closes
    time.sleep(0.001)
    TALLY["count"], TALLY["total"] = count + 1, total + number
    return {"item": number, "count": count + 1, "total": total + number}


def tally(number: int) -> dict[str, int]:
    """Add `number` to the shared tally under the lock; return the tally as it left it."""
    with TALLY_LOCK:
        return _update(number)


def tally_without_lock(number: int) -> dict[str, int]:
    """The same update without the lock: concurrent workers lose updates."""
    return _update(number)


def partial_sum_of_squares(batch: list[int]) -> list[dict[str, int]]:
    """One partial result for a whole batch: how many numbers, and the sum of their squares."""
    return [{"items": len(batch), "sum_of_squares": sum(n * n for n in batch)}]


COMBINED = {"items": 0, "sum_of_squares": 0}


def combine(partial: dict[str, Any]) -> None:
    """The sink: add one partial result to the running total and print the total so far.

    A `fn` sink is called for one result at a time, so it needs no lock.
    """
    COMBINED["items"] += partial["items"]
    COMBINED["sum_of_squares"] += partial["sum_of_squares"]
    print(f"after {COMBINED['items']} items: sum of squares {COMBINED['sum_of_squares']}")
