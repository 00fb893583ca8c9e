"""Q6 of the notebook: exceptions in workers, and a worker process that dies.

The notebook's worker computes `10 / n` and fails for 0. These are the stage functions of
the `configs/errors_*.yaml` and `configs/worker_crash.yaml` examples; the configs choose
what happens to a failing item (`on_error`, `retries`), not the functions.
"""

import os
import threading
from collections import Counter

_calls: Counter[int] = Counter()
_calls_lock = threading.Lock()


def ten_divided_by(n: float) -> float:
    """`10 / n`: raises ZeroDivisionError for 0, as in the notebook."""
    return 10 / n


def flaky_ten_divided_by(n: float) -> float:
    """`10 / n`, but the first try of every item fails as a busy server would.

    It counts tries in this process, so it belongs on a thread stage: a retry may land
    on another process, which would not know the item was tried already.

    Raises:
        ConnectionError: On the first try of each item.
    """
    with _calls_lock:
        _calls[n] += 1
        first_try = _calls[n] == 1
    if first_try:
        raise ConnectionError(f"server busy, try {n} again")
    return 10 / n


def square_or_die(n: int) -> int:
    """`n * n`, except that 7 kills the worker process on the spot, as a segfault would."""
    if n == 7:
        os._exit(1)
    return n * n
