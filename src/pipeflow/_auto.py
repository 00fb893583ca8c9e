"""`workers: auto`: a stage's concurrency tuned while the run goes, from what it measures.

The shape is an adaptive concurrency limiter (TCP's slow start, then additive probes):

- **climb**: from the start value the limit doubles while each doubling brings at least
  `GAIN` more throughput (and leaps 4 times after one that nearly doubled it); the first
  step that does not is undone (fewer workers for about the same throughput win);
- **hold**: the limit stays, and every `PROBE_EVERY` windows one step (a quarter of the
  limit) is tried up, then down: up is kept if it brings `GAIN / 2` more, down if it
  loses less than `SAME`. Each probe that is not kept doubles the windows until the next
  (up to `MAX_PROBE_EVERY`): a probe down costs a window at fewer workers (and below 4
  workers a step is more than a quarter of them: probes come as much less often);
- **the work changed**: throughput at the same limit moving by more than `CHANGED` in two
  windows running, with the time per item moving the other way (a service that slowed
  down), starts a new climb from where it is.

A window in which the stage mostly waited for input or for room in its output queue says
nothing about its own concurrency, and changes nothing. A window starts after a change has
taken effect: a call that started before it is not counted. While climbing, a window is
short (each worker's call ended `CLIMB_WAVES` times): doubling the workers moves the
throughput far more than what a short window blurs, and a slow climb costs a run that is
short as much as the best limit saves it. The limit never leaves
[low, high]. `ConcurrencyController` is the pure core (windows in, decisions out, no
clock); `StageTuner` measures the windows for one stage of a run and applies decisions.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ._report import StageReport

__all__ = [
    "AdjustableLimiter",
    "ConcurrencyController",
    "Decision",
    "LatencyHistogram",
    "StageTuner",
    "Window",
    "auto_bounds",
    "free_cores",
    "tuner_for",
]

# a raise is kept when it brings this much more throughput
GAIN = 0.10
# a lower limit is as good when it loses less than this
SAME = 0.05
# throughput at the same limit moving this much means the work itself changed
CHANGED = 0.30
# a doubling that brought this much more throughput is followed by a leap of LEAP times
LINEAR = 0.8
LEAP = 4
# hold windows between two probes, and between two once probes keep bringing nothing
PROBE_EVERY = 6
MAX_PROBE_EVERY = 48
# a window whose stage waited on its queues for more than this share of it is not counted
STARVED = 0.5
# a window lasts at least this long, and holds at least MIN_CALLS completed calls
WINDOW_S = 0.05
MIN_CALLS = 4
# while climbing, a window ends once it holds this many calls per worker, and lasts at
# least CLIMB_MIN_S
CLIMB_WAVES = 2
CLIMB_MIN_S = 0.01
# the report keeps at most this many concurrency changes and decisions
MAX_HISTORY = 200
# default bounds of `workers: auto`, per kind (processes: the free cores, see auto_bounds)
DEFAULT_HIGH = {"thread": 64, "async": 256}
# where a thread or async stage starts: a few calls at once cost little even when one
# is best, and save a doubling or two when many are
START = 4

Phase = Literal["climb", "hold", "probe"]


def free_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def auto_bounds(kind: str, low: int | None, high: int | None) -> tuple[int, int]:
    """The [low, high] bounds of `workers: auto` on a stage of `kind`.

    A process stage never gets more processes than free cores, whatever `high` says.
    """
    low = 1 if low is None else low
    if kind == "process":
        cap = free_cores()
        high = cap if high is None else min(high, cap)
    elif high is None:
        high = DEFAULT_HIGH.get(kind, 64)
    high = max(high, 1)
    return min(low, high), high


@dataclass(frozen=True)
class Window:
    """What a stage did over one measurement window, at one concurrency.

    Attributes:
        elapsed_s: Wall seconds the window covered.
        items: Items completed in it.
        latency_s: Mean seconds per item in the worker (a call's time over its items).
        starved_s: Seconds the stage waited on an empty input or a full output queue.
    """

    elapsed_s: float
    items: int
    latency_s: float = 0.0
    starved_s: float = 0.0

    @property
    def throughput(self) -> float:
        """Items per second."""
        return self.items / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class Decision:
    """A change of a stage's concurrency, and why.

    Attributes:
        t: Seconds since the stage's first measurement.
        workers: The new concurrency.
        reason: What was measured, in words.
    """

    t: float
    workers: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """As the report stores it."""
        return {"t": round(self.t, 3), "workers": self.workers, "reason": self.reason}


def _pct(new: float, old: float) -> str:
    return f"{(new / old - 1) * 100:+.0f}%" if old > 0 else "+inf%"


class ConcurrencyController:
    """The pure core of `workers: auto`: windows in, decisions out.

    Args:
        low: The fewest workers.
        high: The most workers.
        start: The first limit (clamped to the bounds); `low` by default.
    """

    def __init__(self, low: int, high: int, start: int | None = None) -> None:
        if not 1 <= low <= high:
            raise ValueError(f"bad bounds [{low}, {high}]")
        self.low, self.high = low, high
        self.limit = self._clamp(low if start is None else start)
        self.phase: Phase = "climb"
        # climb: the last limit measured and its throughput
        self._prev: tuple[int, float, float] | None = None
        # hold: the throughput and latency to compare with, windows since the last probe
        self._base = 0.0
        self._base_latency = 0.0
        self._held = 0
        self._probe_every = PROBE_EVERY
        self._again = False
        self._shifted = 0
        self._probe_up = True
        self._probe_from = self.limit
        # a limit the next step of the climb may go straight to (see hint)
        self._hint: tuple[int, str] | None = None

    def hint(self, limit: int, why: str) -> None:
        """Let the next step of the climb go straight to `limit` (if it is higher than
        the step's own), for the reason `why`: measured, but not by this controller."""
        self._hint = limit, why

    def _clamp(self, value: int) -> int:
        return max(self.low, min(self.high, value))

    def observe(self, window: Window, t: float = 0.0) -> Decision | None:
        """Take one window measured at the current limit; return the change, if any."""
        if window.items <= 0 or window.elapsed_s <= 0:
            return None
        if window.starved_s > STARVED * window.elapsed_s:
            return None
        throughput = window.throughput
        if self.phase == "climb":
            return self._climb(throughput, window.latency_s, t)
        if self.phase == "probe":
            return self._probe(throughput, window.latency_s, t)
        return self._hold(throughput, window.latency_s, t)

    def _decide(self, t: float, workers: int, reason: str) -> Decision | None:
        workers = self._clamp(workers)
        if workers == self.limit:
            return None
        self.limit = workers
        return Decision(t, workers, reason)

    def _settle(self, throughput: float, latency: float) -> None:
        self.phase = "hold"
        self._base, self._base_latency = throughput, latency
        self._held = self._shifted = 0

    def _climb(self, throughput: float, latency: float, t: float) -> Decision | None:
        limit, prev = self.limit, self._prev
        rate = f"{throughput:,.0f} items/s at {limit}"
        if prev is not None and throughput < prev[1] * (1 + GAIN):
            back, back_rate, back_latency = prev
            self._prev = None
            self._settle(back_rate, back_latency)
            return self._decide(
                t,
                back,
                f"{rate} ({_pct(throughput, back_rate)} over {back_rate:,.0f} at {back}, "
                f"latency {back_latency * 1e3:.2f} -> {latency * 1e3:.2f} ms/item): "
                f"back to {back}",
            )
        if limit >= self.high:
            self._prev = None
            self._settle(throughput, latency)
            grown = f", {_pct(throughput, prev[1])} over {prev[0]}" if prev is not None else ""
            return Decision(t, limit, f"{rate}{grown}: held at the upper bound {self.high}")
        self._prev = (limit, throughput, latency)
        grown = f" ({_pct(throughput, prev[1])} over {prev[0]})" if prev is not None else ""
        # nearly twice the throughput for twice the workers: far from the top, go faster
        step = LEAP if prev is not None and throughput >= prev[1] * (1 + LINEAR) else 2
        target = self._clamp(limit * step)
        hint, self._hint = self._hint, None
        if hint is not None and self._clamp(hint[0]) > target:
            target = self._clamp(hint[0])
            return self._decide(t, target, f"{rate}{grown}: trying {target} ({hint[1]})")
        return self._decide(t, target, f"{rate}{grown}: trying {target}")

    def _hold(self, throughput: float, latency: float, t: float) -> Decision | None:
        base, base_latency = self._base, self._base_latency
        # at the same concurrency, work that changed moves its time per item the other way
        # (a service twice as slow: half the items per second, twice the time each); a
        # window that only got fewer items done (a pause of the input, the GIL, the
        # machine) is noise
        moved = base > 0 and abs(throughput - base) > CHANGED * base
        if moved and base_latency > 0:
            opposite = (throughput < base) == (latency > base_latency)
            moved = opposite and abs(latency - base_latency) > CHANGED / 2 * base_latency
        if moved:
            self._shifted += 1
            if self._shifted >= 2:
                # the work changed: measure again from here, upwards first
                reason = (
                    f"throughput {base:,.0f} -> {throughput:,.0f} items/s at the same "
                    f"{self.limit} (latency {self._base_latency * 1e3:.2f} -> "
                    f"{latency * 1e3:.2f} ms/item): the work changed, measuring again"
                )
                self.phase = "climb"
                self._probe_every = PROBE_EVERY
                self._prev = None
                if self.limit < self.high:
                    self._prev = (self.limit, throughput, latency)
                    return self._decide(
                        t, self.limit * 2, f"{reason}; trying {self._clamp(self.limit * 2)}"
                    )
                self._settle(throughput, latency)
                return Decision(t, self.limit, f"{reason}; held at the upper bound {self.high}")
            return None
        self._shifted = 0
        self._base = 0.7 * base + 0.3 * throughput if base > 0 else throughput
        self._base_latency = 0.7 * self._base_latency + 0.3 * latency
        self._held += 1
        step = max(1, self.limit // 4)
        # a probe down costs step / limit of a window's items: below 4 workers, where a
        # step is more than a quarter of them, probes come as much less often
        every = self._probe_every * max(1.0, 4 * step / self.limit)
        if (self._held < every and not self._again) or self.low == self.high:
            return None
        self._held, self._again = 0, False
        up = self._probe_up if self.low < self.limit < self.high else self.limit < self.high
        target = self.limit + step if up else self.limit - step
        self._probe_up, self._probe_from = up, self.limit
        self.phase = "probe"
        direction = "up" if up else "down"
        return self._decide(
            t, target, f"{self._base:,.0f} items/s at {self.limit}: probing {direction}"
        )

    def _probe(self, throughput: float, latency: float, t: float) -> Decision | None:
        base, origin, probed = self._base, self._probe_from, self.limit
        rate = f"{throughput:,.0f} items/s at {probed} ({_pct(throughput, base)} over {origin})"
        if self._probe_up:
            keep = throughput >= base * (1 + GAIN / 2)
        else:
            keep = throughput >= base * (1 - SAME)
        self._settle(throughput if keep else base, latency if keep else self._base_latency)
        if keep:
            # the same way again at the next window
            self._probe_every = PROBE_EVERY
            self._again = True
            return Decision(t, probed, f"{rate}: kept {probed}")
        self._probe_every = min(MAX_PROBE_EVERY, self._probe_every * 2)
        self._probe_up = not self._probe_up
        return self._decide(t, origin, f"{rate}: back to {origin}")


class AdjustableLimiter:
    """A semaphore whose number of permits can change while permits are held.

    Lowering the limit takes effect as permits come back: no holder is interrupted.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._drained: asyncio.Future[None] | None = None

    async def acquire(self) -> None:
        """Wait for a permit."""
        if self.held < self.limit and not self._waiters:
            self.held += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over as this was cancelled: pass it on
            else:
                with_waiter = waiter in self._waiters
                if with_waiter:
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a permit back."""
        self.held -= 1
        self._wake()
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def drain(self, keep: int = 1) -> None:
        """Wait until at most `keep` permits are held (the caller's own), letting none in."""
        limit, self.limit = self.limit, keep
        try:
            while self.held > keep:
                self._drained = asyncio.get_running_loop().create_future()
                await self._drained
        finally:
            self._drained = None
            self.limit = limit

    def set_limit(self, limit: int) -> None:
        """Change the number of permits."""
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.held < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.held += 1
                waiter.set_result(None)


class LatencyHistogram:
    """Seconds per item in logarithmic buckets (5 % apart), weighted by items."""

    _BASE = math.log(1.05)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0

    def add(self, seconds: float, items: int = 1) -> None:
        """Count `items` items that took `seconds` each."""
        if items <= 0:
            return
        bucket = math.floor(math.log(max(seconds, 1e-7)) / self._BASE)
        self.counts[bucket] = self.counts.get(bucket, 0) + items
        self.total += items

    def percentile(self, share: float) -> float:
        """The seconds under which `share` of the items completed (0 with none)."""
        if not self.total:
            return 0.0
        rank = share * self.total
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return math.exp((bucket + 0.5) * self._BASE)
        return 0.0  # unreachable: the counts add up to the total

    def fill(self, report: StageReport) -> None:
        """Write p50, p90 and p99 into the stage's report."""
        report.latency_p50_s = self.percentile(0.50)
        report.latency_p90_s = self.percentile(0.90)
        report.latency_p99_s = self.percentile(0.99)


class StageTuner:
    """Measures one stage's windows and applies what its controller decides.

    Args:
        low: The fewest workers.
        high: The most workers.
        start: The first concurrency.
        report: The stage's report: its `idle_s` and `blocked_s` are read, and the
            concurrency, its changes and the decisions are written to it.
        apply: Called with each new concurrency.
        clock: Seconds, monotonic.
    """

    def __init__(
        self,
        low: int,
        high: int,
        start: int,
        report: StageReport,
        apply: Callable[[int], None],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.controller = ConcurrencyController(low, high, start)
        self.report = report
        self.apply = apply
        self.clock = clock
        self.started: float | None = None
        # when the concurrency last changed: calls that started before do not count
        self._changed_at = -math.inf
        self._begin_window(clock())
        report.workers = self.controller.limit
        report.workers_auto = {"min": low, "max": high}

    def _begin_window(self, now: float) -> None:
        self._window_start = now
        self._items = self._calls = 0
        self._busy = 0.0
        self._starved_at = self.report.idle_s + self.report.blocked_s

    def seed(self, window: Window, hint: tuple[int, str] | None = None) -> None:
        """Take a window measured at the start limit before the tuner ran (by `kind:
        auto`'s probe): the climb goes on from it, straight to `hint` if one is given
        (a limit and why)."""
        now = self.clock()
        if self.started is None:
            self.started = now
            self._record(now, self.controller.limit, "start")
        if hint is not None:
            self.controller.hint(*hint)
        decision = self.controller.observe(window, now - self.started)
        self._begin_window(now)
        if decision is not None:
            self._record(now, decision.workers, decision.reason)

    def completed(
        self, items: int, busy_s: float, calls: int = 1, started: float | None = None
    ) -> None:
        """Count a completed call (or item) of `items` items that took `busy_s`, from
        `started` when the caller knows it (by default, a call ended now)."""
        now = self.clock()
        if self.started is None:
            # the window starts with the first completion: pool start and the source's
            # first items are not the stage's throughput
            self.started = now
            self._begin_window(now)
            self._record(now, self.controller.limit, "start")
            return
        if started is None:
            started = now - busy_s / max(1, calls)
        if started < self._changed_at:
            # a call that started before the last change says nothing about the new limit
            self._begin_window(now)
            return
        self._items += items
        self._calls += calls
        self._busy += busy_s
        elapsed = now - self._window_start
        limit = self.controller.limit
        if self.controller.phase == "climb":
            if elapsed < CLIMB_MIN_S or self._calls < max(MIN_CALLS, CLIMB_WAVES * limit):
                return
        elif elapsed < WINDOW_S or self._calls < max(MIN_CALLS, limit):
            return
        starved = self.report.idle_s + self.report.blocked_s - self._starved_at
        window = Window(elapsed, self._items, self._busy / max(1, self._items), starved)
        decision = self.controller.observe(window, now - self.started)
        self._begin_window(now)
        if decision is not None:
            self._record(now, decision.workers, decision.reason)

    def _record(self, now: float, workers: int, reason: str) -> None:
        assert self.started is not None
        t = now - self.started
        report = self.report
        if report.workers != workers or not report.concurrency:
            if len(report.concurrency) < MAX_HISTORY:
                report.concurrency.append((round(t, 3), workers))
            if report.workers != workers:
                report.workers = workers
                self._changed_at = now
                self.apply(workers)
        if len(report.decisions) < MAX_HISTORY:
            report.decisions.append(Decision(t, workers, reason).as_dict())


def tuner_for(
    auto_workers: tuple[int | None, int | None] | None,
    kind: str,
    workers: int,
    report: StageReport,
    apply: Callable[[int], None],
    start: int | None = None,
) -> StageTuner | None:
    """The tuner of a stage with `workers: auto` (None for a fixed number).

    Args:
        auto_workers: The stage's (min, max), each None for the kind's default.
        kind: Where the stage runs: `async`, `thread`, `process` or `executor`.
        workers: The most workers its pool has.
        report: The stage's report.
        apply: Called with each new concurrency.
        start: The first concurrency, if known better than the kind's default.
    """
    if auto_workers is None:
        return None
    low, high = auto_bounds(kind, *auto_workers)
    high = min(high, workers)
    low = min(low, high)
    if start is None:
        # a process costs a core: start with the fewest, and add one only for what it brings
        start = low if kind == "process" else START
    return StageTuner(low, high, max(low, min(high, start)), report, apply)
