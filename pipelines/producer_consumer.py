"""Q4 of the notebook: one thread adds numbers, another removes them.

The notebook shares a list between the two threads and guards it with a `threading.Lock`.
In a pipeline the list is the bounded queue between two stages: returning a number from
`add` appends it, `remove` receives it in order (the notebook's `pop(0)`), and the queue
does the locking. A small `queue_size` makes the fast adder wait for the slow remover
(backpressure), which the run's report shows as `add`'s `blocked_s`.
"""

import random
import time
from collections.abc import Iterator

REMOVE_WORK_S = 0.02


def numbers(count: int = 10, seed: int = 0) -> Iterator[int]:
    """The numbers to add: `count` random ints in 1..100, the same ones for the same seed."""
    rng = random.Random(seed)
    for _ in range(count):
        yield rng.randint(1, 100)


def add(number: int) -> int:
    """The adder: the number it returns is appended to the next stage's queue."""
    return number


def remove(number: int) -> str:
    """The remover: takes the oldest number from its queue and simulates some work."""
    time.sleep(REMOVE_WORK_S)
    return f"Removed: {number}"
