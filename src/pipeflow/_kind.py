"""`kind: auto` for a plain function: measured on threads, then threads or processes.

The stage starts on threads, a few calls at once: if those together hardly want a CPU, the
function waits (I/O) and stays on threads, decided in a few calls. Otherwise it runs 1 call
at a time, then 2 (`KindProbe`), and `choose_kind` decides from what it measured: whether
the function wants a CPU at all (or waits), whether a second thread got it more work done
and more CPU time (a thread waiting for the GIL gets none), and what pickling an item and
its result costs against the work on it. The engine moves the stage at most once, at a
chunk boundary once its calls in flight have ended.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from ._auto import STARVED, Window, free_cores
from ._report import StageReport

__all__ = ["CpuTimed", "KindProbe", "choose_kind", "pickling_cost", "sched_seconds", "unpicklable"]

# a function that wants a CPU (runs, or waits for one on a busy machine) less than this
# share of its time waits (I/O, sleep): threads. A waiting thread that wakes on a busy
# machine waits for a CPU too (on a machine with 10 runnable threads per core, a 5 ms
# sleep took 13 ms, 8 of them waiting for a CPU), so this is not much under the whole.
CPU_BOUND = 0.8
# 2 threads doing this many times the items of 1 run in parallel: the GIL is released
PARALLEL = 1.3
# processes are chosen only if pickling an item and its result costs less than this
# share of the work on the item
PICKLE_SHARE = 0.2
# each of the two probe windows lasts at least this long and holds MIN_PROBE_CALLS calls
PROBE_WINDOW_S = 0.05
MIN_PROBE_CALLS = 3
# the first window, with a few calls at once, lasts at least this long and holds
# FIRST_WAVES calls per call at once
FIRST_WINDOW_S = 0.02
FIRST_WAVES = 2


class CpuTimed:
    """A stage function that adds the CPU time of its calls' threads to `cpu_s`.

    `time.thread_time` counts the thread's time on a CPU, not its time waiting for the
    GIL or for I/O: over wall time, it tells whether a function computes or waits.
    """

    def __init__(self, fn: Callable[..., Any], *, batch: bool = False) -> None:
        self.fn = fn
        self.batch = batch
        self.cpu_s = 0.0
        # the first item and its result, to measure what pickling them costs
        self.sample: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        started = time.thread_time()
        try:
            result = self.fn(*args)
        finally:
            spent = time.thread_time() - started
            with self._lock:
                self.cpu_s += spent
        if self.sample is None:
            if not self.batch:
                self.sample = (args[0], result)
            elif args[0] and isinstance(result, list | tuple) and result:
                self.sample = (args[0][0], result[0])
        return result


def choose_kind(
    one: Window,
    two: Window,
    cpu_share: float,
    cores: int,
    pickle_s: float | None,
    unpicklable: str | None,
    cpu_scaling: float | None = None,
) -> tuple[str, str]:
    """Threads or processes for a plain function, from what it did on threads.

    Args:
        one: A window with 1 call at a time.
        two: A window with 2 calls at a time.
        cpu_share: The share of its wall time the function wanted a CPU (ran, or waited
            for one on a busy machine), with 1 call at a time.
        cores: The cores free to the run.
        pickle_s: Seconds to pickle and unpickle one item and its result.
        unpicklable: Why the function, an item or a result cannot be pickled, or None.
        cpu_scaling: The CPU seconds per second the pool's threads got with 2 calls at
            once over those with 1, where the system tells it (Linux): a thread waiting
            for the GIL sleeps, so a function that holds it gets no more CPU from a second
            thread. Without it, the items per second of the two windows are compared.

    Returns:
        `thread` or `process`, and the reason in words.
    """
    scaling = two.throughput / one.throughput if one.throughput > 0 else 1.0
    per_item = one.latency_s
    if cpu_share < CPU_BOUND:
        return "thread", f"it waits: it wanted a CPU {cpu_share:.0%} of its time"
    # threads unless both signals say the GIL is held: a busy machine blurs either
    parallel = scaling >= PARALLEL
    measured = f"2 threads did {scaling:.1f}x the items of 1"
    if cpu_scaling is not None:
        parallel = parallel or cpu_scaling >= PARALLEL
        measured += f" and got {cpu_scaling:.1f}x its CPU time"
    if parallel:
        return "thread", f"it releases the GIL ({measured})"
    held = f"it holds the GIL ({measured})"
    if cores < 2:
        return "thread", f"{held}, but 1 free core: processes cannot add CPU"
    if unpicklable is not None:
        return "thread", f"{held}, but {unpicklable}"
    if pickle_s is None or pickle_s > PICKLE_SHARE * per_item:
        cost = "unknown" if pickle_s is None else f"{pickle_s * 1e6:,.0f} us"
        return "thread", (
            f"{held}, but pickling an item and its result ({cost}) costs too much of the "
            f"work on it ({per_item * 1e6:,.0f} us)"
        )
    return "process", (
        f"{held}; pickling an item and its result costs {pickle_s / per_item:.0%} of the "
        f"work on it ({per_item * 1e6:,.0f} us): processes, up to {cores} cores"
    )


def unpicklable(fn: Any) -> str | None:
    """Why `fn` cannot be pickled for a process, or None if it can."""
    try:
        cloudpickle.dumps(fn)
    except Exception as exc:
        return f"its function cannot be pickled ({type(exc).__name__}: {exc})"
    return None


def pickling_cost(fn: Any, item: Any, result: Any) -> tuple[float | None, str | None]:
    """Seconds to pickle and unpickle `item` and `result`, and why `fn` or they cannot be."""
    if why := unpicklable(fn):
        return None, why
    started = time.perf_counter()
    for what, value in (("an item", item), ("a result", result)):
        try:
            pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
        except Exception as exc:
            return None, f"{what} cannot be pickled ({type(exc).__name__}: {exc})"
    return time.perf_counter() - started, None


def sched_seconds(threads: list[threading.Thread]) -> dict[int, tuple[float, float]] | None:
    """Seconds each thread ran, and waited for a CPU (Linux's schedstat), by native id."""
    seconds = {}
    for thread in threads:
        ident = thread.native_id
        if ident is None:
            continue
        try:
            with open(f"/proc/self/task/{ident}/schedstat", "rb") as file:
                ran, waited = file.read().split()[:2]
        except (OSError, ValueError):
            if thread.is_alive():
                return None  # the system does not tell
            continue
        seconds[ident] = (int(ran) / 1e9, int(waited) / 1e9)
    return seconds


class KindProbe:
    """`kind: auto` for a plain function: run on threads 1 call at a time, then 2, and
    choose between threads and processes (see `choose_kind`).

    Args:
        fn: The stage's function, wrapped to count its CPU time.
        report: The stage's report (its `idle_s` and `blocked_s` are read).
        set_limit: Sets the calls at once while the probe runs.
        threads: The threads of the stage's pool.
        clock: Seconds, monotonic.
        first: The calls at once of a first window that tells a function that waits
            (1: none, the probe starts with 1 call at a time).
        held: The calls admitted and not yet done (the limit's permits held), the one
            that completes included.
    """

    def __init__(
        self,
        fn: CpuTimed,
        report: StageReport,
        set_limit: Callable[[int], None],
        threads: Callable[[], list[threading.Thread]] = list,
        clock: Callable[[], float] = time.perf_counter,
        first: int = 1,
        held: Callable[[], int] = lambda: 1,
    ) -> None:
        self.fn = fn
        self.held = held
        # completions still to come of calls admitted before the limit last changed: a
        # call may start well after its admission (its chunk waits for company, its
        # thread for the GIL), so its start time alone cannot tell
        self._stale = 0
        self.threads = threads
        # per window: the share of their busy time the threads wanted a CPU (ran, or
        # waited for one), and the CPU seconds per second they got
        self.shares: list[float | None] = []
        self.cpu_rates: list[float] = []
        self.report = report
        self.set_limit = set_limit
        self.clock = clock
        self.choice: tuple[str, str] | None = None
        self.windows: list[Window] = []
        self.cpu_share = 0.0
        self._started: float | None = None
        # calls that started before the limit last changed are not measured
        self._changed_at = -float("inf")
        self.first = first if first > 1 else None
        self.first_limit = first
        # the first window, when it decided: `workers: auto` goes on from it, straight
        # to as many calls at once as would want CPU_BOUND of one CPU (a limit and why)
        self.first_window: Window | None = None
        self.room: tuple[int, str] | None = None
        set_limit(first if first > 1 else 1)

    def _begin(self, now: float) -> None:
        self._started = now
        self._items = self._calls = 0
        self._busy = 0.0
        self._cpu_at = self.fn.cpu_s
        self._sched_at = sched_seconds(self.threads())
        self._starved_at = self.report.idle_s + self.report.blocked_s

    def completed(self, items: int, busy_s: float, started: float | None = None) -> None:
        """Count a completed call of `items` items that took `busy_s` from `started`
        (by default, it ended now)."""
        if self.choice is not None:
            return
        now = self.clock()
        if started is None:
            started = now - busy_s
        if self._stale > 0 or self._started is None or started < self._changed_at:
            self._stale = max(0, self._stale - 1)
            # the first call warms up, and a call started at the last limit tells
            # nothing of this one: not measured
            self._begin(now)
            return
        self._items += items
        self._calls += 1
        self._busy += busy_s
        elapsed = now - self._started
        if self.first is not None:
            if elapsed < FIRST_WINDOW_S or self._calls < FIRST_WAVES * self.first:
                return
        elif elapsed < PROBE_WINDOW_S or self._calls < MIN_PROBE_CALLS:
            return
        starved = self.report.idle_s + self.report.blocked_s - self._starved_at
        window = Window(elapsed, self._items, self._busy / max(1, self._items), starved)
        if self.first is not None:
            self._first_window(now, window)
            return
        if starved > STARVED * elapsed:
            self._begin(now)  # waiting on its queues: the window says nothing
            return
        busy = max(self._busy, 1e-9)
        sched, before = sched_seconds(self.threads()), self._sched_at
        if sched is not None and before is not None:
            ran = waited = 0.0
            for ident, (run_s, wait_s) in sched.items():
                run_before, wait_before = before.get(ident, (0.0, 0.0))
                ran, waited = ran + run_s - run_before, waited + wait_s - wait_before
            self.shares.append(min(1.0, (ran + waited) / busy))
            self.cpu_rates.append(ran / elapsed)
        else:
            self.shares.append(None)
        if not self.windows:
            share = self.shares[0]
            self.cpu_share = share if share is not None else (self.fn.cpu_s - self._cpu_at) / busy
        self.windows.append(window)
        self._begin(now)
        if len(self.windows) == 1:
            self._limit(now, 2)
            return
        pickle_s: float | None = None
        unpicklable: str | None = "no result to measure pickling on"
        if self.fn.sample is not None:
            pickle_s, unpicklable = pickling_cost(self.fn.fn, *self.fn.sample)
        rates = self.cpu_rates
        cpu_scaling = rates[1] / rates[0] if len(rates) == 2 and rates[0] > 0 else None
        self.choice = choose_kind(
            self.windows[0],
            self.windows[1],
            self.cpu_share,
            free_cores(),
            pickle_s,
            unpicklable,
            cpu_scaling,
        )

    def _limit(self, now: float, calls: int) -> None:
        self._changed_at = now
        self._stale = max(0, self.held() - 1)  # all but the call that completes now
        self.set_limit(calls)

    def _first_window(self, now: float, window: Window) -> None:
        """A few calls at once that together wanted less than `CPU_BOUND` of one CPU: the
        function waits, and stays on threads. Else measure 1 call at a time, then 2.

        What they wanted is counted over the time the calls ran, not the window's: a
        stage that waited on its queues (as one whose threads hold the GIL may, the event
        loop waiting for it) ran fewer calls at once, not calls that want less.
        """
        first, self.first = self.first, None
        assert first is not None
        sched, before = sched_seconds(self.threads()), self._sched_at
        if sched is not None and before is not None:
            wanted = sum(
                run_s + wait_s - sum(before.get(ident, (0.0, 0.0)))
                for ident, (run_s, wait_s) in sched.items()
            )
        else:
            wanted = self.fn.cpu_s - self._cpu_at
        cpus = wanted * first / max(self._busy, 1e-9)
        if cpus < CPU_BOUND:
            self.choice = "thread", (f"it waits: {first} calls at once wanted {cpus:.2f} of a CPU")
            self.first_window = window
            room = int(first * CPU_BOUND / max(cpus, 0.01))
            self.room = room, f"{room} calls at once would want {CPU_BOUND:.0%} of one CPU"
            return
        self._begin(now)
        self._limit(now, 1)
