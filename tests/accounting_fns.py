"""Stage and sink functions for test_accounting: importable by name in process workers."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

ONE_MIB = 1 << 20


def fail_on_0_and_1(n: int) -> int:
    if n in (0, 1):
        raise ValueError(f"bad item {n}")
    return n


def lock_for_3_logging_calls(n: int, path: str) -> Any:
    """Appends `n` to the file `path` (one line per call), then returns a lock (which
    cannot be pickled) for 3 and `n` otherwise."""
    with open(path, "a") as log:
        log.write(f"{n}\n")
    return threading.Lock() if n == 3 else n


def fail_odd(n: int) -> int:
    if n % 2:
        raise ValueError(f"odd {n}")
    return n


def mib_items(count: int) -> Any:
    """`count` items of 1 MiB each, made as they are pulled (every page touched)."""
    for n in range(count):
        yield bytes([n % 251]) * ONE_MIB


def first_byte(item: bytes) -> bytes:
    """The item back, as large as it came (its bytes cross the process boundary twice)."""
    return item


def fail_all(n: int) -> int:
    raise ValueError(f"no {n}")


def fail_at(n: int, at: int) -> int:
    if n == at:
        raise RuntimeError(f"item {n} is fatal")
    return n


def identity(value: Any) -> Any:
    return value


def record_slowly(record: dict[str, Any]) -> None:
    """A dead-letter sink slower than the stage: appends the record's index to the file
    named by ACCOUNTING_DEAD, a millisecond per record."""
    time.sleep(0.001)
    with open(os.environ["ACCOUNTING_DEAD"], "a") as out:
        out.write(f"{record['index']}\n")
