"""`Pipeline.iter()`: a pipeline's results as a plain iterator, for code without an event loop.

The run is `stream()` itself, on an event loop of its own in a background thread. Results
cross to the caller's thread a batch at a time, through a handoff that holds at most
`HANDOFF_BATCHES` batches: while the caller does not take results, the run waits, as a
`stream()` whose reader does not read. Closing the iterator (leaving a `with` block,
`close()`, `break` out of a `for` loop, an exception in its body, the iterator being
garbage collected) cancels the run, and returns once its pools are shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

from ._compat import at_threading_exit, join_loop_threads
from ._control import RunControl

__all__ = ["HANDOFF_BATCHES", "SyncResults"]

# batches a run may have handed to the caller's thread that the caller has not taken yet
HANDOFF_BATCHES = 2

# how long the end of a run waits for the helper threads of its event loop
THREAD_JOIN_S = 5.0

OpenStream = Callable[..., AbstractAsyncContextManager[AsyncIterator[Any]]]


class _Handoff:
    """What the run's thread and the caller's thread share, and nothing else: the run's
    thread holds no reference to the iterator, so that dropping it closes the run."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.credit: asyncio.Semaphore | None = None
        self.task: asyncio.Task[Any] | None = None
        self.ready = threading.Event()
        self.closing = False

    def give_credit(self) -> None:
        """Let the run hand over one more batch (the caller took one)."""
        loop, credit = self.loop, self.credit
        if loop is not None and credit is not None:
            with contextlib.suppress(RuntimeError):  # the run's loop has closed since
                loop.call_soon_threadsafe(credit.release)

    def cancel(self, *, wait: bool = True) -> None:
        """Cancel the run, from any thread (without `wait`, from the run's own thread:
        a run not started yet sees `closing` as it starts)."""
        self.closing = True
        if wait:
            self.ready.wait()
        loop, task = self.loop, self.task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)

    def call_on_loop(self, fn: Callable[[], Any]) -> None:
        """Call `fn` on the run's event loop, from any thread (nothing once it ended)."""
        self.ready.wait()
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(fn)


async def _serve(handoff: _Handoff, open_stream: OpenStream, source: Any, control: Any) -> None:
    handoff.loop = asyncio.get_running_loop()
    handoff.credit = credit = asyncio.Semaphore(HANDOFF_BATCHES)
    handoff.task = asyncio.current_task()
    handoff.ready.set()
    if handoff.closing:
        return
    async with open_stream(source, control=control) as results:
        next_batch = results.next_batch  # type: ignore[attr-defined]
        while True:
            await credit.acquire()
            batch = await next_batch()
            if batch is None:
                return
            handoff.queue.put(("values", batch))


def _run(handoff: _Handoff, open_stream: OpenStream, source: Any, control: Any) -> None:
    outcome: tuple[str, Any] = ("end", None)
    try:
        asyncio.run(_serve(handoff, open_stream, source, control))
    except asyncio.CancelledError:
        pass  # closed by the caller, who waits for nothing more
    except BaseException as exc:
        outcome = ("error", exc)
    finally:
        handoff.ready.set()  # even when the loop never started
        if handoff.loop is not None:
            join_loop_threads(handoff.loop, THREAD_JOIN_S)
        handoff.queue.put(outcome)


# iterators not closed yet, closed before the interpreter waits for its threads to end
_open: weakref.WeakSet[SyncResults] = weakref.WeakSet()


def _close_all() -> None:
    for results in list(_open):
        results.close()


at_threading_exit(_close_all)


class SyncResults:
    """The iterator `Pipeline.iter()` returns; also a context manager that closes it.

    Raises:
        PipelineError: From `next()`, as `stream()` raises it, once the results that
            came out before the failure have been taken.
    """

    def __init__(self, open_stream: OpenStream, source: Any) -> None:
        self._handoff = handoff = _Handoff()
        self._control = control = RunControl()
        self._buffer: list[Any] = []
        self._position = 0
        self._done = False
        self._owner = threading.current_thread()
        self._thread = threading.Thread(
            target=_run,
            args=(handoff, open_stream, source, control),
            name="pipeflow-iter",
            daemon=True,
        )
        _open.add(self)
        self._thread.start()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._position < len(self._buffer):
            value = self._buffer[self._position]
            self._position += 1
            return value
        while not self._done:
            try:
                kind, payload = self._handoff.queue.get()
            except BaseException:  # a KeyboardInterrupt while the caller waits
                self.close()
                raise
            if kind != "values":
                break
            self._handoff.give_credit()
            if payload:
                self._buffer, self._position = payload, 1
                return payload[0]
        else:
            raise StopIteration
        self._finish()
        if kind == "error":
            raise payload
        raise StopIteration

    def _finish(self) -> None:
        self._done = True
        self._buffer, self._position = [], 0
        self._thread.join()
        _open.discard(self)

    def stop(self) -> None:
        """Stop the run gracefully, from the iterating thread: the source is read no
        more, and the results end once every item taken from it has come out."""
        self._handoff.call_on_loop(self._control.stop)

    def close(self) -> None:
        """Cancel the run if it is still going, and return once its pools are shut down.

        Results not taken yet are dropped; an error the run raised after the last
        result taken is dropped too (leaving early is the caller's decision).
        """
        if self._done:
            return
        self._done = True
        self._buffer, self._position = [], 0
        if threading.current_thread() is self._thread:
            # dropped by a garbage collection in the run's own thread: it cannot wait
            # for itself, and the run ends as its thread returns
            self._handoff.cancel(wait=False)
            return
        self._handoff.cancel()
        self._thread.join()
        _open.discard(self)

    def __enter__(self) -> SyncResults:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if threading.current_thread() is self._owner:
                self.close()
            elif not self._done:
                # collected on another thread (one of the run's own, maybe): waiting for
                # the run there could wait for itself
                self._done = True
                self._handoff.cancel(wait=False)
