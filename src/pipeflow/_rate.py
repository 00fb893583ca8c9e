"""Rate limits: at most so many calls of a stage's function per period, wherever they run.

The stage's dispatcher, in the run's process, owns the bucket. It gives every call of the
function a start time by the generic cell rate algorithm (virtual scheduling), and the
worker that makes the call (a thread, a process, a Dask worker, a task on the event
loop) waits until the wall clock reaches that time. One owner makes the limit exact
across all the stage's workers, whatever runs them, with nothing shared between them but
the machine's clock (`time.time_ns()`, the same in every process of a machine).

Times are integer nanoseconds, so that the spacing of start times is exact: with an
interval `T = per / calls` and `burst` B, any K consecutive start times span at least
`(K - B) * T`. A call can start late (a loaded machine, a worker busy with the call
before it), never early.

This module is imported by process workers: it imports nothing heavy.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError

__all__ = [
    "MAX_BURST",
    "Pacer",
    "Rate",
    "parse_rate",
    "rate_text",
    "seconds_until",
    "sleep_until",
    "wait_until",
]

_LIMIT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*(\d+(?:\.\d*)?|\.\d+)?\s*(ms|s|m|min|h)\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
# the unit a period of one of these lengths is written in; other periods in ms
_UNIT_OF = {per: unit for unit, per in _UNIT_S.items() if unit in ("s", "min", "h")}
# A rate's burst is the most calls that may start at once after an idle spell; beyond
# this it is a typo, and would let a stage hold that many start times at once.
MAX_BURST = 100_000


def parse_rate(text: Any) -> tuple[float, float]:
    """`10/s`, `100/min`, `5/250ms` as (calls, per seconds).

    Raises:
        ValueError: The text is not a rate.
    """
    match = _LIMIT.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"bad rate {text!r}: write calls/period, e.g. 10/s, 100/min or 5/250ms")
    calls = float(match.group(1))
    per = float(match.group(2) or 1) * _UNIT_S[match.group(3)]
    if calls <= 0 or per <= 0:
        raise ValueError(f"bad rate {text!r}: the calls and the period must be positive")
    return calls, per


def rate_text(rate: Rate) -> str:
    """`rate` as a config writes it: `10/s`, `5/250ms`, with its burst when not 1."""
    per = _UNIT_OF.get(rate.per, f"{rate.per * 1000:g}ms")
    text = f"{rate.calls:g}/{per}"
    return text if rate.burst == 1 else f"{text} burst {rate.burst}"


@dataclass(frozen=True)
class Rate:
    """At most `calls` calls of a stage's function per `per` seconds.

    A call is one item for `map`, `filter` and `flat_map`, one batch (or group) for
    `map_batch`; a retry is a call too. Start times are spaced `per / calls` apart, and
    after an idle spell up to `burst` calls may start at once: in any window of `per`
    seconds at most `calls + burst - 1` calls start.

    Args:
        calls: Calls per period (may be fractional: `Rate(1, per=60)` is one a minute).
        per: The period, in seconds.
        burst: How many calls may start at once after an idle spell (1: evenly spaced).
    """

    calls: float
    per: float = 1.0
    burst: int = 1

    def __post_init__(self) -> None:
        for name in ("calls", "per"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"rate {name} must be a positive number, got {value!r}")
        if (
            isinstance(self.burst, bool)
            or not isinstance(self.burst, int)
            or not 1 <= self.burst <= MAX_BURST
        ):
            raise ConfigError(
                f"rate burst must be an int from 1 to {MAX_BURST}, got {self.burst!r}"
            )

    @classmethod
    def parse(cls, text: str, burst: int = 1) -> Rate:
        """A rate from its text: `10/s`, `100/min`, `5/250ms`.

        Raises:
            ConfigError: The text is not a rate, or `burst` is not a positive int.
        """
        try:
            calls, per = parse_rate(text)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls(calls, per, burst)

    @property
    def interval_ns(self) -> int:
        """The spacing of start times, in nanoseconds (rounded up: never faster)."""
        return max(1, math.ceil(self.per * 1e9 / self.calls))


class Pacer:
    """The start times of a stage's calls, one bucket per stage and run (in the parent)."""

    def __init__(self, rate: Rate) -> None:
        self.interval = rate.interval_ns
        # how far ahead of its theoretical time a call may start: the burst
        self.tolerance = (rate.burst - 1) * self.interval
        self.theoretical: int | None = None  # when the next call is due, at the rate

    def starts(self, calls: int) -> list[int]:
        """Take start times (ns since the epoch) for `calls` calls, in order."""
        now = time.time_ns()
        due = self.theoretical if self.theoretical is not None else now
        interval, tolerance = self.interval, self.tolerance
        starts = []
        for _ in range(calls):
            start = max(now, due - tolerance)
            starts.append(start)
            due = max(due, start) + interval
        self.theoretical = due
        return starts


def sleep_until(start_ns: int) -> float:
    """Block until the wall clock reaches `start_ns`; return the seconds waited."""
    waited = 0.0
    while (left := start_ns - time.time_ns()) > 0:
        time.sleep(left / 1e9)
        waited += left / 1e9
    return waited


async def wait_until(start_ns: int) -> None:
    """Wait on the event loop until the wall clock reaches `start_ns`."""
    import asyncio  # a process worker imports this module, and never waits this way

    # a time on the wall clock, which the loop's (monotonic) clock may not keep pace with
    while (left := start_ns - time.time_ns()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(left / 1e9)


def seconds_until(starts: list[int] | None) -> float:
    """Seconds from now to the last of `starts` (0 if it has passed, or for None)."""
    if not starts:
        return 0.0
    return max(0.0, (starts[-1] - time.time_ns()) / 1e9)
