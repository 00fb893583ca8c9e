"""Stage functions for the tests: importable, so process workers can load them by name."""

from __future__ import annotations

import math
import os
import signal
import sys
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


def stuck_on_5(n: int) -> int:
    """Item 5 writes the file $PIPEFLOW_TEST_MARKER, then blocks for good (no timeout)."""
    if n == 5:
        with open(os.environ["PIPEFLOW_TEST_MARKER"], "w") as marker:
            marker.write(str(os.getpid()))
        threading.Event().wait()


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


class BurnWhileTheHostTicks:
    """Burns CPU until the host's heartbeat, which writes its tick count to `path`, has
    ticked twice; gives up with an error if the host's loop stays silent for `patience` s."""

    def __init__(self, path: str, patience: float = 10.0) -> None:
        self.path = path
        self.patience = patience

    def ticks(self) -> int:
        try:
            with open(self.path) as file:
                return int(file.read() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def __call__(self, n: int) -> int:
        first = self.ticks()
        give_up = time.monotonic() + self.patience
        while self.ticks() < first + 2:
            if time.monotonic() > give_up:
                raise RuntimeError(f"the host's loop did not tick while item {n} ran")
            deadline = time.perf_counter() + 0.001
            while time.perf_counter() < deadline:
                pass
        return n


# --- stage functions of the property tests: each logs every call it receives ---

SLOW_S = 3.0  # how long a "slow" item runs: well past the property tests' timeouts


def key_of(item: Any) -> int:
    """The source position an item of the property tests carries (items may carry bytes)."""
    return item if isinstance(item, int) else int(item[0])


class Recorded:
    """A map that logs each call to a file (threads and processes alike): `start K` when
    it receives item K and `done K` when it returns it. Items in `slow` sleep first,
    items in `bad` raise ValueError, items in `unpicklable` return a result that cannot
    cross a process boundary."""

    def __init__(
        self,
        log: str,
        bad: frozenset[int] = frozenset(),
        slow: frozenset[int] = frozenset(),
        unpicklable: frozenset[int] = frozenset(),
    ) -> None:
        self.log = log
        self.bad = bad
        self.slow = slow
        self.unpicklable = unpicklable

    def record(self, event: str, keys: list[int]) -> None:
        line = f"{event} {' '.join(map(str, keys))}\n".encode()
        try:
            fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError:  # an abandoned call that outlives its test's folder
            return
        try:
            os.write(fd, line)  # one write per line: O_APPEND keeps lines whole
        finally:
            os.close(fd)

    def outcome(self, item: Any) -> Any:
        key = key_of(item)
        if key in self.bad:
            raise ValueError(f"bad item {key}")
        self.record("done", [key])
        if key in self.unpicklable:
            return (key, threading.Lock())
        return item

    def __call__(self, item: Any) -> Any:
        key = key_of(item)
        self.record("start", [key])
        if key in self.slow:
            time.sleep(SLOW_S)
        return self.outcome(item)


class AsyncRecorded(Recorded):
    async def __call__(self, item: Any) -> Any:  # type: ignore[override]
        import anyio

        key = key_of(item)
        self.record("start", [key])
        await anyio.sleep(SLOW_S if key in self.slow else 0)
        return self.outcome(item)


class BatchRecorded(Recorded):
    """A map_batch that logs the items of each call it receives."""

    def __call__(self, items: list[Any]) -> list[Any]:  # type: ignore[override]
        keys = [key_of(item) for item in items]
        self.record("batch", keys)
        for key in keys:
            self.record("start", [key])
            self.record("done", [key])
        return list(items)


def read_log(path: str) -> list[tuple[str, list[int]]]:
    """The events a Recorded stage function logged, in order."""
    try:
        with open(path) as file:
            lines = file.read().splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        event, *keys = line.split()
        events.append((event, [int(k) for k in keys]))
    return events


# --- a worker that dies in the middle of sending its result back ---

# write(2)'s syscall number, where /proc/<pid>/task/<tid>/syscall can show it
_WRITE_SYSCALL = {"x86_64": "1", "aarch64": "64"}.get(os.uname().machine)
CAN_DIE_MID_WRITE = sys.platform == "linux" and _WRITE_SYSCALL is not None


def _die_once_writing(tid: int) -> None:
    path = f"/proc/self/task/{tid}/syscall"
    while True:  # until the worker's main thread is inside a large write(2): the result's
        with open(path) as file:
            fields = file.read().split()
        if fields and fields[0] == _WRITE_SYSCALL and int(fields[3], 16) > 1_000_000:
            break
        time.sleep(0.0002)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does to the biggest process


def die_while_sending_3(n: int) -> int | bytes:
    """Item 3's worker is killed while it writes its (large) result to the parent."""
    if n != 3:
        return n
    threading.Thread(target=_die_once_writing, args=(threading.get_native_id(),)).start()
    return b"x" * 200_000_000


def setup_with_worker_info(info: Any) -> Any:
    """A setup that keeps the WorkerInfo it is given, with the worker that got it."""
    import os
    import threading

    return {"info": info, "worker": (os.getpid(), threading.get_ident())}


def tag_with_worker_info(n: int, state: dict[str, Any]) -> tuple[int, int, str, int, str, Any]:
    """The item with what its worker was told in setup, and that worker's identity."""
    info = state["info"]
    return (n, info.index, info.stage, info.workers, info.kind, state["worker"])


async def async_setup_with_worker_info(info: Any) -> Any:
    return {"info": info, "worker": "loop"}


async def async_tag_with_worker_info(n: int, state: dict[str, Any]) -> Any:
    return tag_with_worker_info(n, state)


def identity_claims_held(_: Any = None) -> int:
    """How many worker indexes this process still holds for stages of past runs."""
    from pipeflow import _identity

    return len(_identity._claims) + len(_identity._thread_indexes)


BIG_BYTES = 256 * 1024


class BigLookup:
    """A callable that carries its data with it: BIG_BYTES pickled, whatever the item."""

    def __init__(self, crash_on: int | None = None) -> None:
        self.table = bytes(range(256)) * (BIG_BYTES // 256)
        self.crash_on = crash_on

    def __call__(self, n: int) -> int:
        if n == self.crash_on:
            os._exit(1)
        return n + self.table[n % 256]


big_lookup = BigLookup()
# --- rate limits ---


def stamped(count: int) -> Any:
    """`count` items, each carrying the wall-clock time (ns) at which the source yielded it."""
    for index in range(count):
        yield {"i": index, "yielded": time.time_ns()}


def stamp_start(item: dict[str, int]) -> dict[str, int]:
    """The item, with the wall-clock time (ns) at which this call of the stage started."""
    return {**item, "started": time.time_ns()}


# --- groups ---

_held: dict[int, Any] = {}


async def stepped(count: int) -> Any:
    """`count` items, one at a time: the next only once the stage holds the one before
    (`held_by_stage`, its group's `by`, says so), as from a slow source."""
    import asyncio

    for index in range(count):
        _held[index] = asyncio.Event()
        yield index
        await _held[index].wait()
        del _held[index]


def held_by_stage(item: int) -> None:
    """A group key, the same for every item, that tells `stepped` the stage holds `item`."""
    _held[item].set()


def group_as_one(items: list[Any]) -> list[list[Any]]:
    """One output per call: the group it was given."""
    return [list(items)]


def fail_group_with_5(items: list[int]) -> list[int]:
    if 5 in items:
        raise ValueError(f"cannot insert {items}")
    return items


def loaded_modules(item: Any) -> list[str]:
    """The modules the worker that runs this has imported, whatever the item."""
    import sys

    return sorted(sys.modules)


# --- workers: auto (test_auto.py) ---

_running = 0
_running_lock = threading.Lock()


def waits_counting(n: int) -> list[int]:
    """Waits 2 ms like I/O; returns [n, how many calls ran at once as it started]."""
    global _running
    with _running_lock:
        _running += 1
        seen = _running
    try:
        time.sleep(0.002)
    finally:
        with _running_lock:
            _running -= 1
    return [n, seen]


_running_async = 0


async def waits_counting_async(n: int) -> list[int]:
    """Waits 2 ms on the loop; returns [n, how many coroutines ran at once as it started]."""
    import asyncio

    global _running_async
    _running_async += 1
    seen = _running_async
    try:
        await asyncio.sleep(0.002)
    finally:
        _running_async -= 1
    return [n, seen]


def holds_the_gil(n: int) -> int:
    """About 2 ms of pure-Python work: it holds the GIL, so threads add no throughput."""
    total = 0
    deadline = time.perf_counter() + 0.002
    while time.perf_counter() < deadline:
        total += 1
    return n


_holding = 0


def holds_the_gil_counting(n: int) -> tuple[int, int, int, float, float]:
    """`holds_the_gil`; returns n, how many calls ran at once in its process as it
    started, its process id, and its start and end (`time.perf_counter()`)."""
    global _holding
    started = time.perf_counter()
    with _running_lock:
        _holding += 1
        seen = _holding
    try:
        holds_the_gil(n)
    finally:
        with _running_lock:
            _holding -= 1
    return n, seen, os.getpid(), started, time.perf_counter()
