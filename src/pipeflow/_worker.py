"""What runs inside a worker thread or process: one call applies a stage to a chunk.

This module is imported by every process worker, so it imports nothing heavy: no anyio,
no structlog. A chunk is applied item by item and each item's outcome is kept, so one
failing item never fails its chunk-mates.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle

from . import _identity
from ._errors import ItemTimeout
from ._identity import WorkerInfo

__all__ = [
    "ChunkResult",
    "Failure",
    "NotLoaded",
    "SetupFailed",
    "StageCall",
    "StageEnd",
    "end_stage",
    "init_process_worker",
    "run_chunk",
]


@dataclass(frozen=True)
class StageCall:
    """How a worker finds the stage's callable: by object (threads) or pickled (processes).

    `key` is unique per stage and run, so a worker loads the callable and runs `setup`
    once, however many chunks it is given. A call whose `fn` is None carries the key
    only: a worker that has not loaded the stage raises NotLoaded (see _shipping).
    """

    key: str
    fn: Callable[..., Any] | bytes | None
    op: str
    setup: Callable[[], Any] | bytes | None = None
    teardown: Callable[[Any], Any] | bytes | None = None
    # seconds each item may take, timed by the worker itself (see _run_timed)
    timeout: float | None = None
    # given to a setup with one required parameter (the index is the worker's own), and the
    # table process workers draw their index from (see _identity)
    worker_info: WorkerInfo | None = None
    index_file: str | None = None


@dataclass
class Failure:
    """One item's exception, as it travels back from the worker."""

    position: int
    error: BaseException
    error_type: str
    message: str
    traceback: str


@dataclass
class ChunkResult:
    """What a worker returns for a chunk.

    `kept` maps each output to the position of its input in the chunk; None means output
    i comes from input i (a map or map_batch with no failure). `started` is the worker's
    `time.perf_counter()` when the call began: the caller's own clock in a thread.
    """

    outputs: list[Any]
    kept: list[int] | None
    failures: list[Failure]
    busy_s: float
    worker: str
    started: float = 0.0

    def __reduce__(self) -> tuple[Any, ...]:
        packed: bytes | None = self.__dict__.get("packed")
        rest = (self.kept, self.failures, self.busy_s, self.worker, self.started)
        if packed is None:
            return (ChunkResult, (self.outputs, *rest))
        return (_unpacked, (packed, *rest))


def _unpacked(
    packed: bytes,
    kept: list[int] | None,
    failures: list[Failure],
    busy_s: float,
    worker: str,
    started: float,
) -> ChunkResult:
    return ChunkResult(pickle.loads(packed), kept, failures, busy_s, worker, started)


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def pack_outputs(result: ChunkResult, op: str, items: int) -> ChunkResult:
    """Pickle a process worker's outputs before they leave it, and fail alone each item
    whose result cannot be pickled.

    Were the pool to find an unpicklable result, the whole call would fail and every
    item of the chunk would run again. The outputs are pickled once, as a whole; only
    when that fails is each output tried, to find the items to fail.
    """
    try:
        result.packed = _dumps(result.outputs)  # type: ignore[attr-defined]
        return result
    except Exception as exc:
        whole = exc
    kept = result.kept if result.kept is not None else list(range(len(result.outputs)))
    bad: dict[int, BaseException] = {}
    for output, position in zip(result.outputs, kept, strict=True):
        if position not in bad:
            try:
                _dumps(output)
            except Exception as exc:
                bad[position] = exc
    if not bad:
        raise whole  # the outputs fail together only (too deep, say): the call fails as a whole
    if op == "map_batch":  # one call made every output: its items fail together
        first = next(iter(bad.values()))
        bad = dict.fromkeys(range(items), first)
    failures = [f for f in result.failures if f.position not in bad]
    for position, problem in bad.items():
        kind = type(problem).__qualname__
        message = f"the result cannot be pickled to leave the worker process: {problem}"
        stand_in = UnpicklableError(f"{kind}: {message}")
        failures.append(Failure(position, stand_in, kind, message, f"{kind}: {message}\n"))
    failures.sort(key=lambda f: f.position)
    pairs = [(o, p) for o, p in zip(result.outputs, kept, strict=True) if p not in bad]
    result = ChunkResult(
        [o for o, _ in pairs],
        [p for _, p in pairs],
        failures,
        result.busy_s,
        result.worker,
        result.started,
    )
    result.packed = _dumps(result.outputs)  # type: ignore[attr-defined]
    return result


class UnpicklableError(Exception):
    """Stands in for an exception that cannot cross a process boundary."""


RUN_WATCH_INTERVAL_S = 0.5  # where a process's end cannot be waited for, how often to look

_loaded: dict[str, tuple[Callable[..., Any], Any, bool]] = {}
_loaded_lock = threading.Lock()
_thread_loaded = threading.local()
_in_process_worker = False


def init_process_worker(sys_path: list[str], run_pid: int | None = None) -> None:
    """Initializer of every pipeflow process worker: the parent's import path, first.

    Args:
        sys_path: The run's `sys.path`.
        run_pid: The run's process: the worker ends when it is gone.
    """
    global _in_process_worker
    _in_process_worker = True
    # Ctrl-C reaches the whole process group: the parent decides how a run stops, and a
    # worker killed by it mid-item would look like a crash
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for entry in reversed(sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if run_pid is not None:
        threading.Thread(
            target=_exit_with, args=(run_pid,), name="pipeflow-run-watch", daemon=True
        ).start()


def _exit_with(pid: int) -> None:
    # A worker's parent is the forkserver, not the run, so PR_SET_PDEATHSIG would not see
    # the run die; and a run killed by SIGKILL or the OOM killer never shuts its pool down.
    # Without this a worker blocks for ever on a queue whose write end it holds itself.
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None  # not Linux >= 5.3: poll instead
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the process has ended
    else:
        while _identity.alive(pid):
            time.sleep(RUN_WATCH_INTERVAL_S)
    os._exit(1)


def mark_process_worker() -> None:
    """Run chunks in this process as a process worker does (in a Dask worker, say):
    callables cached process-wide, exceptions checked to pickle, tracebacks as text."""
    global _in_process_worker
    _in_process_worker = True


def _in_child_process() -> bool:
    import multiprocessing

    return multiprocessing.parent_process() is not None


def _load(obj: Any) -> Any:
    return cloudpickle.loads(obj) if isinstance(obj, bytes) else obj


# A process worker's teardowns still to run, by stage key: by the run's end-of-run call
# (see end_stage), or when the worker exits first (recycled by max_tasks_per_child).
_process_teardowns: dict[str, tuple[Callable[[Any], Any], Any, Any]] = {}


def _teardown_at_exit(key: str, teardown: Callable[[Any], Any], state: Any) -> None:
    import multiprocessing.util

    # Runs when the worker process exits normally (after the pool's shutdown sentinel,
    # or its last call under max_tasks_per_child).
    finalizer = multiprocessing.util.Finalize(
        None, _teardown_reporting, args=(key, teardown, state), exitpriority=10
    )
    _process_teardowns[key] = (teardown, state, finalizer)


def _teardown_reporting(key: str, teardown: Callable[[Any], Any], state: Any) -> None:
    """Run a teardown as its worker exits: nobody waits for a result then, so a failure
    is written to the worker's stderr with the stage and the worker."""
    _process_teardowns.pop(key, None)
    try:
        teardown(state)
    except Exception as exc:
        stage = key.split(":", 1)[-1]
        print(
            f"pipeflow: teardown of stage {stage!r} failed in worker pid {os.getpid()} "
            f"as it exited:\n{user_traceback(exc)}",
            file=sys.stderr,
            flush=True,
        )


def _stage_fn(call: StageCall) -> tuple[Callable[..., Any], Any, bool]:
    """The callable, its per-worker state and whether it takes state, loaded once."""
    cache: dict[str, tuple[Callable[..., Any], Any, bool]]
    # a pickled callable came to a process (a lent pool's worker has no pipeflow initializer)
    in_process = _in_process_worker or isinstance(call.fn, bytes)
    if in_process:
        cache = _loaded
    else:
        cache = getattr(_thread_loaded, "cache", None) or {}
        _thread_loaded.cache = cache
    entry = cache.get(call.key)
    if entry is None:
        if call.fn is None:
            raise NotLoaded(_worker_name())
        fn = _load(call.fn)
        has_state = call.setup is not None
        try:
            if has_state and call.worker_info is not None:
                state = _identity.call_setup(_load(call.setup), _worker_info(call, in_process))
            else:
                state = _load(call.setup)() if has_state else None
        except Exception as exc:
            raise SetupFailed(_portable_failure(exc)) from None
        teardown = _load(call.teardown) if has_state and call.teardown is not None else None
        if in_process:
            if teardown is not None:
                _teardown_at_exit(call.key, teardown, state)
        else:
            # every entry is registered, so that the run's end drops it from this
            # thread's cache even when the thread outlives the run (a lent pool)
            with _loaded_lock:
                ended = call.key in _ended_keys
                if not ended:
                    _thread_states.append((call.key, cache, teardown, state, _worker_name()))
            if ended:  # a call its run no longer waits for: leave nothing behind
                _identity.release_thread_indexes(call.key)
                if teardown is not None:
                    teardown(state)
                raise RuntimeError(f"stage {call.key!r} was called after its run ended")
        entry = (fn, state, has_state)
        cache[call.key] = entry
    return entry


def _worker_info(call: StageCall, in_process: bool) -> WorkerInfo:
    """The WorkerInfo of this worker for the stage, its index claimed for the run."""
    assert call.worker_info is not None
    if not in_process:
        index: int | None = _identity.claim_thread_index(call.key)
    elif call.index_file is not None:
        index = _identity.claim_process_index(call.key, call.index_file)
    else:
        index = None
    return dataclasses.replace(call.worker_info, index=index)


# Thread workers' cache entries, dropped (and torn down) by the run that created them.
_thread_states: list[tuple[str, dict[str, Any], Callable[[Any], Any] | None, Any, str]] = []


# The keys of stages whose run has ended, so that a thread still running a call of that
# run does not set the stage up again (bounded: such calls come just after the end).
_ended_keys: collections.deque[str] = collections.deque(maxlen=256)


def thread_teardowns(key: str) -> list[tuple[str, Callable[[Any], Any], Any]]:
    """Drop every thread worker's cached entry for `key`, and return the (worker,
    teardown, state) triples still to run for them."""
    with _loaded_lock:
        _ended_keys.append(key)
        mine = [e for e in _thread_states if e[0] == key]
        _thread_states[:] = [e for e in _thread_states if e[0] != key]
    _identity.release_thread_indexes(key)
    for _, cache, _, _, _ in mine:
        cache.pop(key, None)
    return [(worker, t, state) for _, _, t, state, worker in mine if t is not None]


class NotLoaded(Exception):
    """A call without the stage's callables reached a worker that has not loaded them:
    the call is to be sent again with them."""


class SetupFailed(Exception):
    """A stage's setup raised in a worker: the stage cannot run there, whatever the item."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure)
        self.failure = failure


def _portable_failure(exc: BaseException) -> Failure:
    """`exc` as a Failure that can travel back from any process, a lent pool's too."""
    failure = _failure(0, exc)
    exc.__traceback__ = None
    failure.error = _portable(exc)
    return failure


@dataclass
class StageEnd:
    """What ending a stage did in one process worker (see end_stage)."""

    worker: str
    loaded: bool
    failure: Failure | None


def end_stage(key: str, linger: float = 0.0) -> StageEnd:
    """End a run's stage in this process worker: run its teardown, drop its callable and
    state. Holds the worker for `linger` seconds after, so that the other end-of-run
    calls of the same round reach the other workers.
    """
    loaded = _loaded.pop(key, None) is not None
    _identity.end_process_claim(key)
    failure = None
    pending = _process_teardowns.pop(key, None)
    if pending is not None:
        teardown, state, finalizer = pending
        finalizer.cancel()
        try:
            teardown(state)
        except Exception as exc:
            failure = _portable_failure(exc)
        del teardown, state
    if linger:
        time.sleep(linger)
    return StageEnd(f"pid {os.getpid()}", loaded, failure)


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling both ways, else a stand-in with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return UnpicklableError(f"{type(exc).__qualname__}: {exc}")
    return exc


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def user_traceback(exc: BaseException) -> str:
    """The traceback text of `exc` without pipeflow's own frames at its top."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def _failure(position: int, exc: BaseException) -> Failure:
    tb = user_traceback(exc)
    error = exc
    if _in_process_worker:
        exc.__traceback__ = None
        error = _portable(exc)
    return Failure(position, error, type(exc).__qualname__, str(exc), tb)


def _worker_name() -> str:
    if _in_process_worker:
        return f"pid {os.getpid()}"
    return threading.current_thread().name


class Collector:
    """Gathers the outcomes of one chunk, item by item, whatever the stage's op."""

    def __init__(self, op: str) -> None:
        self.op = op
        self.outputs: list[Any] = []
        self.kept: list[int] | None = None if op in ("map", "map_batch") else []
        self.failures: list[Failure] = []

    def add(self, position: int, value: Any, result: Any) -> None:
        """Record what the callable returned for the item at `position`."""
        op = self.op
        if op == "map":
            self.outputs.append(result)
            if self.kept is not None:
                self.kept.append(position)
        elif op == "filter":
            if result:
                self.outputs.append(value)
                self.kept.append(position)  # type: ignore[union-attr]
        else:  # flat_map: iterating the result may raise, before anything is recorded
            produced = list(result)
            self.outputs.extend(produced)
            self.kept.extend([position] * len(produced))  # type: ignore[union-attr]

    @staticmethod
    def failure_of(exc: BaseException) -> Failure:
        """`exc` as a Failure (outside any chunk: a setup or a teardown)."""
        return _failure(0, exc)

    def fail(self, position: int, exc: BaseException) -> None:
        """Record the exception the item at `position` raised."""
        if self.kept is None:
            self.kept = list(range(len(self.outputs)))
        self.failures.append(_failure(position, exc))

    def add_batch(self, values: list[Any], results: Any) -> None:
        """Record what a map_batch callable returned for the whole chunk."""
        self.outputs = list(results)
        if len(self.outputs) != len(values):
            self.kept = [0] * len(self.outputs)

    def fail_batch(self, values: list[Any], exc: BaseException) -> None:
        """Record a map_batch callable's exception against every item of the chunk."""
        self.outputs, self.kept = [], []
        self.failures = [_failure(position, exc) for position in range(len(values))]

    def result(self, started: float) -> ChunkResult:
        """The chunk's outcome, with the time since `started` as its busy time."""
        busy = time.perf_counter() - started
        return ChunkResult(self.outputs, self.kept, self.failures, busy, _worker_name(), started)


class _Paced:
    """A stage's callable, each of whose calls waits for its start time (see _rate)."""

    def __init__(self, fn: Callable[[Any], Any], starts: list[int]) -> None:
        self.fn = fn
        self.starts = iter(starts)
        self.waited = 0.0

    def wait(self) -> None:
        from ._rate import sleep_until

        self.waited += sleep_until(next(self.starts))

    def __call__(self, value: Any) -> Any:
        self.wait()
        return self.fn(value)


def run_chunk(call: StageCall, values: list[Any], starts: list[int] | None = None) -> ChunkResult:
    """Apply the stage's callable to every value of a chunk, keeping each item's outcome.

    With `starts` (a rate-limited stage), each call of the callable waits for its start
    time (ns since the epoch), and the time waited is not counted as busy.
    """
    started = time.perf_counter()
    if not _in_process_worker and isinstance(call.fn, bytes) and _in_child_process():
        # a worker of a process pool the app lent: it never ran pipeflow's initializer,
        # but its results and errors must travel back the same way
        mark_process_worker()
    fn, state, has_state = _stage_fn(call)
    if has_state:
        fn = _with_state(fn, state)
    paced = None if starts is None else _Paced(fn, starts)
    collector = Collector(call.op)
    if call.timeout is not None and threading.current_thread() is threading.main_thread():
        # an item's clock starts at its start time: the wait comes before the timer
        _run_timed(fn, call.op, values, call.timeout, collector, paced)
    elif paced is not None:
        _run_paced(paced, call.op, values, collector)
    elif call.op == "map_batch":
        try:
            collector.add_batch(values, fn(values))
        except Exception as exc:
            collector.fail_batch(values, exc)
    elif call.op == "map":
        # the hot loop of a trivial map: no method call per item
        outputs = collector.outputs
        append = outputs.append
        failed_at = -1
        for position, value in enumerate(values):
            try:
                append(fn(value))
            except Exception as exc:
                collector.fail(position, exc)
                failed_at = position
                break
        # outside the `except` above: an item's exception must not carry another
        # item's exception as its context (its traceback would show both)
        if failed_at >= 0:
            kept = collector.kept
            assert kept is not None
            for later, value in enumerate(values[failed_at + 1 :], failed_at + 1):
                try:
                    append(fn(value))
                    kept.append(later)
                except Exception as exc:
                    collector.fail(later, exc)
    else:
        for position, value in enumerate(values):
            try:
                collector.add(position, value, fn(value))
            except Exception as exc:
                collector.fail(position, exc)
    if paced is not None:
        started += paced.waited
    if _in_process_worker:
        return pack_outputs(collector.result(started), call.op, len(values))
    return collector.result(started)


def _run_paced(paced: _Paced, op: str, values: list[Any], collector: Collector) -> None:
    """Apply a rate-limited stage's callable to a chunk (off the hot path of the others)."""
    if op == "map_batch":
        try:
            collector.add_batch(values, paced(values))
        except Exception as exc:
            collector.fail_batch(values, exc)
        return
    for position, value in enumerate(values):
        try:
            collector.add(position, value, paced(value))
        except Exception as exc:
            collector.fail(position, exc)


# --- per-item timeouts ---------------------------------------------------------------------

# Whether a process worker can interrupt an item that runs past its time (not on Windows).
ITEM_TIMERS = hasattr(signal, "setitimer")

_item_running = False


class _ItemDeadline(BaseException):
    """Raised into an item whose time is up. Not an Exception, so that a stage's own
    `except Exception` cannot swallow it."""


def _on_alarm(signum: int, frame: Any) -> None:
    # a late alarm, delivered after its item has returned, is ignored
    if _item_running:
        raise _ItemDeadline


def _timed(fn: Callable[[Any], Any], arg: Any, seconds: float, materialize: bool) -> Any:
    global _item_running
    signal.setitimer(signal.ITIMER_REAL, seconds)
    _item_running = True
    try:
        result = fn(arg)
        return list(result) if materialize else result  # a flat_map's work is in its iteration
    finally:
        _item_running = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def _run_timed(
    fn: Callable[[Any], Any],
    op: str,
    values: list[Any],
    timeout: float,
    collector: Collector,
    paced: _Paced | None = None,
) -> None:
    """Apply `fn` to a chunk in a process worker's main thread, each item on its own clock.

    SIGALRM interrupts Python code (and a blocking system call) of an item that runs past
    `timeout`; the item fails with ItemTimeout and its chunk-mates go on. An item stuck in
    C code that never returns to the interpreter cannot be interrupted this way: the
    parent's deadline for the whole call catches it and kills the worker. A map_batch call
    gets `timeout` for each item it holds. The previous SIGALRM handler is restored after
    the chunk, so a pool lent by the app is left as it was.
    """
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        if op == "map_batch":
            allowed = timeout * len(values)
            if paced is not None:
                paced.wait()
            try:
                collector.add_batch(values, _timed(fn, values, allowed, False))
            except _ItemDeadline as deadline:
                message = f"timed out after {allowed:g}s ({len(values)} items at {timeout:g}s each)"
                collector.fail_batch(values, ItemTimeout(message))
                for failure in collector.failures:
                    failure.traceback = _deadline_traceback(deadline, message)
            except Exception as exc:
                collector.fail_batch(values, exc)
            return
        flat = op == "flat_map"
        for position, value in enumerate(values):
            if paced is not None:
                paced.wait()
            try:
                collector.add(position, value, _timed(fn, value, timeout, flat))
            except _ItemDeadline as deadline:
                message = f"timed out after {timeout:g}s in a process worker"
                collector.fail(position, ItemTimeout(message))
                collector.failures[-1].traceback = _deadline_traceback(deadline, message)
            except Exception as exc:
                collector.fail(position, exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _deadline_traceback(deadline: _ItemDeadline, message: str) -> str:
    """Where the item was when its time ran out, then the ItemTimeout."""
    frames = [
        frame
        for frame in traceback.extract_tb(deadline.__traceback__)
        if not frame.filename.startswith(_PACKAGE_DIR)
    ]
    stack = "".join(traceback.format_list(frames))
    return f"Traceback (most recent call last):\n{stack}ItemTimeout: {message}\n"


def _with_state(fn: Callable[..., Any], state: Any) -> Callable[[Any], Any]:
    def call(value: Any) -> Any:
        return fn(value, state)

    return call
