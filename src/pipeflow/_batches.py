"""Batches and their sizes: the `Batch` items travel in, the chunk sizer that sets
how many items an executor call holds (from measured cost and the items' bytes), and
the send that counts the time a full queue blocks it.
"""

from __future__ import annotations

import collections
import pickle
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectSendStream

# A batch from a slow source is sent after this long even if it is not full.
FLUSH_INTERVAL_S = 0.05
# `batch: auto` aims for executor calls this long: long enough to hide the call's
# overhead (~100 µs for a process pool), short enough to keep results flowing. An async
# stage's chunk is run by up to `workers` lanes (see _call_async), so its size costs no
# concurrency; it holds its results until its end, so it is sized by time as a thread
# call is: a chunk of coroutines that end at once holds thousands (its fixed costs, a
# task and its results' hop, are shared by them, and the next stage gets full batches),
# one of coroutines that wait holds few (but one per lane, see StageRun._chunk_size).
TARGET_CALL_S = {"process": 0.05, "executor": 0.05, "dask": 0.05, "thread": 0.02, "async": 0.02}
MAX_CHUNK = {"process": 16384, "executor": 16384, "dask": 16384, "thread": 1024, "async": 16384}


class Batch(NamedTuple):
    """Items in flight together: their source positions and their values."""

    indices: Sequence[int]
    values: list[Any]


# Memory in bytes: an executor call carries at most MAX_CALL_BYTES of items and a source
# batch at most MAX_SOURCE_BATCH_BYTES (always at least one item), so what a run holds
# stays near (queues + calls in flight) x a few MiB, or one item each, whatever the item
# size. A fixed `batch:` is the user's choice and is kept.
MAX_CALL_BYTES = 4 << 20
MAX_SOURCE_BATCH_BYTES = 2 << 20
# A chunk this large is sent even while every worker is busy (see _wait_for_a_worker).
WORTH_A_CALL_BYTES = 256 << 10
# An item whose size can't be read cheaply is pickled to measure it, once in this many
# batches (and on the first).
PICKLE_SAMPLE_EVERY = 16


def cheap_size(value: Any) -> int | None:
    """The bytes `value` holds, when that is cheap to know; None otherwise."""
    if isinstance(value, bytes | bytearray | str):
        return len(value)
    if isinstance(value, memoryview):
        return value.nbytes
    if value is None or isinstance(value, bool | int | float):
        return 32
    nbytes = getattr(value, "nbytes", None)  # numpy, pyarrow and the like
    return nbytes if isinstance(nbytes, int) else None


class _ByteGauge:
    """Bytes per item of a stream of batches, from a sample of each batch: quick to rise
    (a large item is believed at once), slow to fall."""

    def __init__(self) -> None:
        self.per_item = 0.0
        self._batches = 0

    def observe(self, values: Sequence[Any]) -> None:
        if not values:
            return
        self._batches += 1
        sizes = [cheap_size(values[0]), cheap_size(values[-1])]
        if None in sizes:
            if self._batches % PICKLE_SAMPLE_EVERY != 1:
                return
            try:
                sizes = [len(pickle.dumps(values[0], pickle.HIGHEST_PROTOCOL))]
            except Exception:  # it will fail where it must cross a process boundary
                return
        size = float(max(s for s in sizes if s is not None))
        self.per_item = size if size >= self.per_item else 0.8 * self.per_item + 0.2 * size

    def items_within(self, limit: int) -> int:
        """How many items fit in `limit` bytes (at least one)."""
        if self.per_item <= 0:
            return 1 << 30
        return max(1, int(limit // self.per_item))


# A call's round trip is its wall time less its items' time in the worker: sending it
# and its items, queueing, bringing the results back (~0.1 ms on a process pool, ~10 ms
# on a Dask cluster). The shortest of the last few is what one more call costs: a call
# that waited in the pool behind another shows that wait as well.
ROUND_TRIPS_KEPT = 8


class _ChunkSizer:
    """Items per executor call: fixed, or sized from the measured per-item cost and
    capped by the items' bytes."""

    def __init__(self, fixed: int | None, kind: str) -> None:
        self.fixed = fixed
        self.target = TARGET_CALL_S[kind]
        self.limit = MAX_CHUNK[kind]
        self.size = fixed or 1
        self.per_item: float | None = None
        self.by_time = self.size
        self.bytes = _ByteGauge()
        # A worker's first call loads the stage's callable (imports, setup) and costs
        # far more than its items: an estimate from first calls only is provisional, and
        # the first call that shows the items' own cost replaces it.
        self._seen: set[str] = set()
        self._provisional = True
        self._round_trips: collections.deque[float] = collections.deque(maxlen=ROUND_TRIPS_KEPT)

    def observe(self, items: int, busy_s: float, worker: str = "") -> None:
        if self.fixed is not None or items == 0:
            return
        cost = max(busy_s / items, 1e-8)
        first = worker not in self._seen
        if first:
            self._seen.add(worker)
            if not self._provisional:
                return
        if self.per_item is None or (self._provisional and not first):
            self.per_item = cost
        else:
            self.per_item = 0.7 * self.per_item + 0.3 * cost
        self._provisional = self._provisional and first
        self.by_time = max(1, min(self.limit, int(self.target / self.per_item)))
        self._resize()

    def observe_round_trip(self, wall_s: float, busy_s: float) -> None:
        """Learn the round trip of a call that took `wall_s` from its sending to its
        result, `busy_s` of it in the worker."""
        self._round_trips.append(max(0.0, wall_s - busy_s))

    @property
    def round_trip_s(self) -> float:
        """What one more call costs beyond its items (0 until a call has returned)."""
        return min(self._round_trips, default=0.0)

    def worth_a_call(self, items: int) -> bool:
        """Whether `items` items cost at least the round trip of a call of their own."""
        return self.per_item is None or items * self.per_item >= self.round_trip_s

    def observe_values(self, values: Sequence[Any]) -> None:
        """Learn the bytes per item from a batch of a stage's inputs or outputs."""
        if self.fixed is None:
            self.bytes.observe(values)
            self._resize()

    def _resize(self) -> None:
        self.size = min(self.by_time, self.bytes.items_within(MAX_CALL_BYTES))


async def _send(send: MemoryObjectSendStream[Any], item: Any) -> float:
    """Send; return the seconds spent blocked on a full queue."""
    try:
        try:
            send.send_nowait(item)
        except anyio.WouldBlock:
            started = time.perf_counter()
            await send.send(item)
            return time.perf_counter() - started
    except anyio.BrokenResourceError:
        # the receiver has gone because the run is ending: whoever ended it reports why
        await anyio.lowlevel.checkpoint_if_cancelled()
        raise
    return 0.0
