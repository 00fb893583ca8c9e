"""Stage functions for the tests: importable, so process workers can load them by name."""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any


def square(n: int) -> int:
    return n * n


def factorial(n: int) -> tuple[int, int]:
    return n, math.factorial(n)


def fail_on_3(n: int) -> int:
    if n == 3:
        return n // 0
    return n


def pid_of(_: Any) -> int:
    return os.getpid()


def burn(n: int) -> int:
    """About 20 ms of pure-Python work."""
    total = 0
    deadline = time.perf_counter() + 0.02
    while time.perf_counter() < deadline:
        total += 1
    return n


def is_even(n: int) -> bool:
    return n % 2 == 0


def repeat(n: int) -> list[int]:
    return [n] * (n % 3)


def double_all(values: list[int]) -> list[int]:
    return [v * 2 for v in values]


def add_state(n: int, state: dict[str, Any]) -> tuple[int, int]:
    return n + state["offset"], state["worker"]


def make_state() -> dict[str, Any]:
    return {"offset": 100, "worker": os.getpid() * 1000 + threading.get_ident() % 1000}


def slow_identity(n: int) -> int:
    time.sleep(0.001)
    return n


class FlakyOnce:
    """Fails the first time it sees each item in `bad`, then succeeds (thread stages)."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = set(bad)
        self.seen: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self, n: int) -> int:
        with self.lock:
            first = n in self.bad and n not in self.seen
            self.seen.add(n)
        if first:
            raise ConnectionError(f"flaky {n}")
        return n


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(a)


def exit_on_13(n: int) -> int:
    if n == 13:
        os._exit(1)
    return n


def segfault_on_13(n: int) -> int:
    if n == 13:
        import ctypes

        ctypes.string_at(0)
    return n


def sigkill_self_on_13(n: int) -> int:
    if n == 13:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    return n


def hang_on_5(n: int) -> int:
    if n == 5:
        time.sleep(3600)
    return n


def hang_briefly_on_5(n: int) -> int:
    if n == 5:
        time.sleep(3)
    return n


def unpicklable_result_on_4(n: int) -> object:
    if n == 4:
        return threading.Lock()
    return n


def burn_briefly(n: int) -> dict[str, int]:
    """About 2 ms of pure-Python work; returns a record for a JSON-lines sink."""
    deadline = time.perf_counter() + 0.002
    while time.perf_counter() < deadline:
        pass
    return {"n": n, "square": n * n}


def hang_uninterruptibly_on_0(n: int) -> int:
    """Item 0 hangs where no signal can interrupt it (as C code that never returns to
    Python would); the others take a moment."""
    import signal

    if n == 0:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)
    time.sleep(0.01)
    return n


def nap(n: int) -> int:
    time.sleep(0.05)
    return n


def sleep_03(n: int) -> int:
    time.sleep(0.3)
    return n


def sleep_06(n: int) -> int:
    time.sleep(0.6)
    return n


def batch_sizes(values: list[int]) -> list[int]:
    """map_batch: every item reports how many items its call received."""
    return [len(values)] * len(values)


def exit_on_2(n: int) -> int:
    if n == 2:
        os._exit(1)
    return n


def sleep_1(n: int) -> int:
    time.sleep(1)
    return n


def pid_and_square(n: int) -> tuple[int, int]:
    return os.getpid(), n * n


def open_counted(path: str) -> dict[str, Any]:
    """A setup that records itself (one line per call, from any process) in `path`."""
    with open(path, "a") as log:
        log.write(f"setup {os.getpid()}\n")
    return {"ballast": bytearray(1 << 20)}  # 1 MB, as a client or a model would hold


def close_counted(path: str, state: dict[str, Any]) -> None:
    with open(path, "a") as log:
        log.write(f"teardown {os.getpid()}\n")


def add_one_with_state(n: int, state: dict[str, Any]) -> int:
    return n + 1


def failing_teardown(state: Any) -> None:
    raise ValueError("cannot close the connection")


def failing_setup() -> Any:
    raise ValueError("cannot open the connection")


def make_empty_state() -> dict[str, Any]:
    return {}


def cached_stage_entries(_: Any = None) -> int:
    """How many stages this worker (process, or calling thread) still holds loaded."""
    from pipeflow import _worker

    thread_cache = getattr(_worker._thread_loaded, "cache", None) or {}
    return len(_worker._loaded) + len(thread_cache) + len(_worker._process_teardowns)


def add_one_with_state_failing_on_30(n: int, state: dict[str, Any]) -> int:
    if n == 30:
        raise ValueError("bad item 30")
    return n + 1
