"""The source side of a run: a sync source pulled in batches (a blocking iterator in a
thread of its own, see `_Puller`), an async one through a task, each batch delivered to
the first stage as soon as that stage is idle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import threading
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from typing import Any

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from ._batches import FLUSH_INTERVAL_S, MAX_SOURCE_BATCH_BYTES, Batch, _ByteGauge, _send
from ._errors import PipelineError
from ._failures import _error_of, _leaf
from ._report import RunReport
from ._stagerun import StageRun

# The first source batch is one item, so that it flows at once; the next ones are as
# large as the first stage can take in at once (see _max_source_batch), up to this.
SOURCE_MAX_BATCH = 16384


class _Puller:
    """A blocking iterator pulled in a thread of its own, one batch at a time.

    The thread pulls only the items a batch being taken has room for (nothing is read
    ahead of the run), and each item it has pulled can be taken at once: an iterator
    that blocks on its next item never holds back the items it already yielded. Items
    travel through a deque (thread-safe appends and pops, no lock per item); `pulled`
    is written by the thread only, `granted` and `taken` by the event loop only.
    """

    def __init__(self, iterator: Iterator[Any], stop: threading.Event) -> None:
        self.iterator = iterator
        self.stop = stop
        self.items: collections.deque[Any] = collections.deque()
        self.pulled = 0
        self.granted = 0
        self.taken = 0
        self.want_first = False
        self.ended = False
        self.error: BaseException | None = None
        self.quit = False
        self.cond = threading.Condition(threading.Lock())
        self.loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            self.loop.call_soon_threadsafe(self.changed.set)

    def pull(self) -> None:
        """The thread's work: pull the items granted, until the iterator ends."""
        try:
            iterator, items, stop = self.iterator, self.items, self.stop
            while True:
                if self.pulled >= self.granted:
                    with self.cond:
                        while self.pulled >= self.granted and not self.quit:
                            self.cond.wait()
                if self.quit or stop.is_set():
                    return
                try:
                    value = next(iterator)
                except StopIteration:
                    return
                items.append(value)
                self.pulled += 1
                # the loop sets want_first before it looks at the deque, and this reads
                # it after the append: one of the two sees the other
                if self.want_first or self.pulled >= self.granted:
                    self.want_first = False
                    self._notify()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended = True
            self._notify()

    async def _wait_until(self, done: Callable[[], bool], within: float | None) -> None:
        deadline = None if within is None else self.loop.time() + within
        while not done():
            self.changed.clear()
            if done():
                return
            if deadline is None:
                await self.changed.wait()
                continue
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return
            with anyio.move_on_after(remaining):
                await self.changed.wait()

    def _grant(self, size: int) -> None:
        with self.cond:
            self.granted = self.taken + size
            self.cond.notify()

    def _take_held(self) -> list[Any]:
        items = self.items
        values = [items.popleft() for _ in range(len(items))]
        self.taken += len(values)
        return values

    async def take(self, size: int, interval: float, idle: Callable[[], bool]) -> list[Any]:
        """Up to `size` items: the first whenever it comes, then what follows within
        `interval` (fewer if the iterator is slow, ends, or the run is stopping), or at
        once while `idle()` is true (`changed` is set when it becomes true)."""
        self._grant(size)
        self.want_first = True
        await self._wait_until(lambda: bool(self.items) or self.ended, None)
        self.want_first = False
        await self._wait_until(
            lambda: self.pulled >= self.granted or self.ended or self.stop.is_set() or idle(),
            interval,
        )
        values = self._take_held()
        self._grant(0)
        return values

    def stage_idle(self) -> None:
        """The first stage waits for input: a batch waiting for company goes at once."""
        if not self.want_first:  # waiting for a first item, nothing waits for company
            self.changed.set()

    async def finish(self) -> list[Any]:
        """The items pulled until the thread stops, once it is out of the iterator."""
        self.close()
        await self._wait_until(lambda: self.ended, None)
        return self._take_held()

    def close(self) -> None:
        """Let the thread go as soon as it is out of the iterator."""
        with self.cond:
            self.quit = True
            self.cond.notify()


class _SourcePump:
    """Runner's source side: pulls the source and delivers it to the first stage in
    batches sized for that stage."""

    # set by Runner
    source: Any
    stages: list[StageRun]
    report: RunReport
    _stop: anyio.Event
    _stop_pulling: threading.Event
    _source_scope: anyio.CancelScope
    _source_bytes: _ByteGauge

    async def _pump_source(self, send: MemoryObjectSendStream[Batch]) -> None:
        source = self.source
        try:
            async with send:
                with self._source_scope:
                    if isinstance(source, AsyncIterable):
                        await self._pump_async(source, send)
                    else:
                        await self._pump_sync(source, send)
        except (PipelineError, anyio.get_cancelled_exc_class()):
            raise
        except anyio.BrokenResourceError:
            return  # the first stage has gone: the run is ending
        except BaseException as exc:
            error = _leaf(exc)
            raise _error_of("source", None, None, error) from error

    def _max_source_batch(self) -> int:
        # Source batches are as big as the first stage can use at once: big for cheap
        # items, small for costly ones, so that the items read ahead of the work (and
        # left to finish when a run is stopped) stay few. A fixed batch bounds them too:
        # `batch: 1, queue_size: N` bounds the items taken ahead of the stage to about N.
        if not self.stages:
            return SOURCE_MAX_BATCH
        first = self.stages[0]
        if first.sizer.fixed is not None:
            return first.sizer.fixed
        by_bytes = self._source_bytes.items_within(MAX_SOURCE_BATCH_BYTES)
        return max(1, min(SOURCE_MAX_BATCH, first.sizer.size * first.workers, by_bytes))

    async def _deliver(self, send: MemoryObjectSendStream[Batch], values: list[Any]) -> None:
        report = self.report
        index = report.items_read
        self._source_bytes.observe(values)
        if self.stages:
            self.stages[0].hungry = False  # it has this batch to run, whether it woke yet
        report.source_blocked_s += await _send(
            send, Batch(range(index, index + len(values)), values)
        )
        report.items_read += len(values)

    async def _pump_sync(self, source: Iterable[Any], send: MemoryObjectSendStream[Batch]) -> None:
        iterator = iter(source)
        stop = self._stop_pulling
        try:
            if isinstance(source, range | list | tuple):
                size = 1
                while not stop.is_set():
                    values = list(itertools.islice(iterator, size))
                    if not values:
                        return
                    await self._deliver(send, values)
                    size = self._max_source_batch()
            else:
                # a generator may block (files, sockets): pull it in a thread of its own
                await self._pump_puller(_Puller(iterator, stop), send)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                with contextlib.suppress(ValueError):  # still running in an abandoned thread
                    close()

    async def _pump_puller(self, puller: _Puller, send: MemoryObjectSendStream[Batch]) -> None:
        size = 1
        # a batch waits for company (FLUSH_INTERVAL_S) only while the first stage is busy
        first = self.stages[0] if self.stages else None
        if first is not None:
            first.on_hungry = puller.stage_idle

        def idle() -> bool:
            return first is not None and first.hungry

        try:
            async with anyio.create_task_group() as tg:
                # abandoned if cancelled while the iterator blocks: it ends when it returns
                tg.start_soon(
                    functools.partial(anyio.to_thread.run_sync, abandon_on_cancel=True),
                    puller.pull,
                )
                while not puller.ended:
                    if self._stop_pulling.is_set():
                        # the item being pulled is delivered too (or dropped when the
                        # stop's grace period cancels the source)
                        values = await puller.finish()
                    else:
                        values = await puller.take(size, FLUSH_INTERVAL_S, idle)
                    if values:
                        await self._deliver(send, values)
                    size = self._max_source_batch()
        finally:
            puller.close()
        if puller.error is not None:
            raise puller.error

    async def _pump_async(
        self,
        source: AsyncIterable[Any],
        send: MemoryObjectSendStream[Batch],
    ) -> None:
        # unbuffered: an item the puller holds is either delivered or never taken from
        # the source (a stopping run drains the puller's pending send below)
        items_send, items_recv = anyio.create_memory_object_stream[Any](0)
        pulling = anyio.CancelScope()

        async def pull() -> None:
            iterator = aiter(source)
            try:
                with pulling:
                    async with items_send:
                        async for value in iterator:
                            await items_send.send(value)
            finally:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()

        # a batch waits for company (FLUSH_INTERVAL_S) only if the first stage is busy
        first = self.stages[0] if self.stages else None
        async with anyio.create_task_group() as tg, items_recv:
            tg.start_soon(pull)
            size = 1
            ended = False
            while not ended:
                # while this waits, the puller waits inside the source: cancelling it at
                # the end of a stop's grace period takes no item from the source
                try:
                    values = [await items_recv.receive()]
                except anyio.EndOfStream:
                    return
                deadline = anyio.current_time() + FLUSH_INTERVAL_S
                while len(values) < size and not self._stop.is_set():
                    try:
                        values.append(items_recv.receive_nowait())
                        continue
                    except anyio.EndOfStream:
                        ended = True
                        break
                    except anyio.WouldBlock:
                        pass
                    remaining = deadline - anyio.current_time()
                    if remaining <= 0 or (first is not None and first.hungry):
                        break
                    # (not woken when the stage turns idle: cancelling a receive could
                    # lose the item being handed over)
                    with anyio.move_on_after(remaining):
                        try:
                            values.append(await items_recv.receive())
                        except anyio.EndOfStream:
                            ended = True
                            break
                if self._stop.is_set():
                    with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
                        values.append(items_recv.receive_nowait())
                    # before the delivery below lets the puller run: it would take
                    # one more item from the source, which no one would deliver
                    pulling.cancel()
                    ended = True
                await self._deliver(send, values)
                size = self._max_source_batch()
            tg.cancel_scope.cancel()  # stopping: the puller waits inside the source
