"""Groups: the calls of a `map_batch` stage made of real groups, not of what is queued.

A group leaves for the stage's function when it holds `size` items, or when its oldest
item has waited `within` seconds at the stage, or at the end of the input (the last,
partial groups leave then, oldest first). With `by`, each key has its own open group; at
most `max_keys` groups are open at once, and a new key beyond that sends the oldest open
group on its way first, so the items held stay below `max_keys * size`.

A reader task takes the stage's input as it comes and files each item in its group; the
stage's dispatcher takes the groups that are ready, one per free call slot. The reader
stops taking input while as many groups wait as the stage has slots, so a slow function
holds back its input queue, and with it the source.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ._errors import ConfigError

__all__ = ["MAX_GROUP_SIZE", "MAX_KEYS", "Group", "GroupedInput", "KeyFailed", "Ready"]

MAX_GROUP_SIZE = 100_000
MAX_KEYS = 100_000


@dataclass(frozen=True)
class Group:
    """How a `map_batch` stage groups its items into calls.

    Args:
        size: A group leaves when it holds this many items (at most 100,000, the
            default when only `within` is given).
        within: Seconds: a group leaves when its oldest item has waited this long,
            full or not. None: groups wait until full (or the end of the input).
        by: A function of an item returning its key (hashable): items of one key are
            grouped together. Called on the event loop as each item reaches the stage;
            an exception it raises fails the run.
        max_keys: With `by`, the most groups open at once; a new key beyond that sends
            the oldest open group on first.
    """

    size: int | None = None
    within: float | None = None
    by: Callable[[Any], Hashable] | None = None
    max_keys: int = 1000

    def __post_init__(self) -> None:
        if self.size is None and self.within is None:
            raise ConfigError("a group needs a size, a within, or both")
        if self.size is not None and (
            isinstance(self.size, bool)
            or not isinstance(self.size, int)
            or not 1 <= self.size <= MAX_GROUP_SIZE
        ):
            raise ConfigError(
                f"group size must be an int from 1 to {MAX_GROUP_SIZE}, got {self.size!r}"
            )
        if self.within is not None and (
            isinstance(self.within, bool)
            or not isinstance(self.within, int | float)
            or not self.within > 0
        ):
            raise ConfigError(f"group within must be a positive duration, got {self.within!r}")
        if self.by is not None and not callable(self.by):
            raise ConfigError(f"group by must be callable, got {self.by!r}")
        if (
            isinstance(self.max_keys, bool)
            or not isinstance(self.max_keys, int)
            or not 1 <= self.max_keys <= MAX_KEYS
        ):
            raise ConfigError(
                f"group max_keys must be an int from 1 to {MAX_KEYS}, got {self.max_keys!r}"
            )


class _Open:
    """A group still taking items."""

    __slots__ = ("deadline", "indices", "values")

    def __init__(self, deadline: float) -> None:
        self.indices: list[int] = []
        self.values: list[Any] = []
        self.deadline = deadline


class KeyFailed(Exception):
    """A group's `by` function raised for an item."""

    def __init__(self, index: int, value: Any, error: Exception) -> None:
        super().__init__(str(error))
        self.index = index
        self.value = value
        self.error = error


class Ready(NamedTuple):
    """A group that has left: its items' source positions and values."""

    indices: list[int]
    values: list[Any]


class GroupedInput:
    """One stage's open groups during one run, and the groups ready for a call."""

    def __init__(self, group: Group, *, slots: asyncio.Semaphore, max_ready: int) -> None:
        self.size = group.size or MAX_GROUP_SIZE
        self.within = group.within
        self.by = group.by
        self.max_keys = group.max_keys
        self.slots = slots
        self.max_ready = max_ready
        # in the order they opened: with one `within` for all, the order of their deadlines
        self.open: dict[Hashable, _Open] = {}
        self.ready: collections.deque[Ready] = collections.deque()
        self.ended = False
        self.changed = asyncio.Event()  # an item was filed, or the input ended
        self.room = asyncio.Event()  # a ready group was taken
        self.loop = asyncio.get_running_loop()

    # --- filing items ---

    def _close(self, key: Hashable) -> None:
        group = self.open.pop(key)
        self.ready.append(Ready(group.indices, group.values))

    def add(self, indices: Any, values: list[Any]) -> None:
        """File a batch of the stage's input, closing each group it fills or finds overdue."""
        now = self.loop.time()
        by, size, open_groups = self.by, self.size, self.open
        for index, value in zip(indices, values, strict=True):
            if by is None:
                key: Hashable = None
            else:
                try:
                    key = by(value)
                    hash(key)
                except Exception as exc:
                    raise KeyFailed(index, value, exc) from exc
            group = open_groups.get(key)
            if group is not None and group.deadline <= now:
                self._close(key)  # overdue: it leaves before this item could join it
                group = None
            if group is None:
                if len(open_groups) >= self.max_keys:
                    self._close(next(iter(open_groups)))
                deadline = now + self.within if self.within is not None else math.inf
                group = open_groups[key] = _Open(deadline)
            group.indices.append(index)
            group.values.append(value)
            if len(group.values) >= size:
                self._close(key)

    def _close_due(self) -> None:
        now = self.loop.time()
        while self.open:
            key, group = next(iter(self.open.items()))
            if group.deadline > now:
                return
            self._close(key)

    # --- the reader task ---

    async def read(
        self,
        recv: MemoryObjectReceiveStream[Any],
        on_wait: Callable[[bool], None],
        on_taken: Callable[[int], None],
    ) -> None:
        """Take the stage's input until it ends, filing every item.

        `on_wait(True)` is called as the reader starts to wait for input, and
        `on_wait(False)` once it has some; `on_taken(n)` for each batch of n items taken.
        """
        try:
            while True:
                while len(self.ready) >= self.max_ready:
                    self.room.clear()
                    await self.room.wait()
                try:
                    batch = recv.receive_nowait()
                except anyio.WouldBlock:
                    on_wait(True)
                    try:
                        batch = await recv.receive()
                    except anyio.EndOfStream:
                        return
                    finally:
                        on_wait(False)
                except anyio.EndOfStream:
                    return
                indices, values = batch
                on_taken(len(values))
                self.add(indices, values)
                self.changed.set()
        finally:
            self.ended = True
            self.changed.set()

    # --- the dispatcher's side ---

    async def groups(self) -> AsyncIterator[Ready]:
        """The groups in the order they leave, each holding a slot of `slots` (its taker
        releases it), until the input has ended and every group has left."""
        while True:
            await self.slots.acquire()
            while True:
                self._close_due()
                if self.ready:
                    break
                if self.ended:
                    for key in list(self.open):
                        self._close(key)
                    if not self.ready:
                        self.slots.release()
                        return
                    break
                self.changed.clear()
                if self.within is None or not self.open:
                    await self.changed.wait()
                    continue
                remaining = next(iter(self.open.values())).deadline - self.loop.time()
                with anyio.move_on_after(max(0.0, remaining)):
                    await self.changed.wait()
            group = self.ready.popleft()
            self.room.set()
            yield group
