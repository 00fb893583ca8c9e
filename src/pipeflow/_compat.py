"""The CPython internals pipeflow relies on, in one place, each with a fallback.

The standard pools keep no public handle on their size, their worker processes or the
preparation a new process gets; pipeflow reads or extends those internals here only.
Where an internal is missing (another Python version or implementation), a fallback
keeps runs working with less: no extra thread after a timeout, no worker pids.

Process workers: with the spawn and forkserver start methods, `multiprocessing` makes
every new process import the parent's main module (to find what was defined there).
pipeflow pickles a process stage's callables by value, so its workers need that import
only for a script that guards its entry point: there, items of classes defined in the
script keep working as with `multiprocessing`. Anything else (a script that runs its
pipeline at import time, stdin, `-c`, the REPL, a notebook) gets workers that leave the
parent's main module alone, so importing it cannot run the pipeline again in a worker.
"""

from __future__ import annotations

import io
import multiprocessing
import multiprocessing.context
import os
import sys
import threading
import time
from types import FrameType, ModuleType
from typing import Any

__all__ = [
    "add_thread",
    "at_threading_exit",
    "join_loop_threads",
    "main_is_guarded",
    "max_workers",
    "pool_processes",
    "process_context",
]


def max_workers(executor: Any) -> int:
    """How many workers an executor runs at most (the CPU count when it does not say)."""
    for attr in ("_max_workers", "max_workers"):
        value = getattr(executor, attr, None)
        if isinstance(value, int):
            return value
    return os.cpu_count() or 1


def add_thread(executor: Any) -> bool:
    """Let a thread pool start one more thread than it has, for its next call.

    The pool counts a thread as idle once it has finished a call, even when that thread
    then took a call that hangs, and reuses "idle" threads before it starts new ones:
    that count is dropped, so the next call starts the new thread.

    Returns:
        Whether the pool could be grown (False where its internals are not the ones known).
    """
    size = getattr(executor, "_max_workers", None)
    idle = getattr(executor, "_idle_semaphore", None)
    adjust = getattr(executor, "_adjust_thread_count", None)
    if not isinstance(size, int) or idle is None or adjust is None:
        return False
    executor._max_workers = size + 1
    while idle.acquire(timeout=0):
        pass
    adjust()
    return True


def pool_processes(executor: Any) -> dict[int, Any]:
    """A process pool's own live `{pid: process}` map, which it extends when it starts a
    worker later; an empty dict when the pool has none (or has been shut down)."""
    processes = getattr(executor, "_processes", None)
    return processes if isinstance(processes, dict) else {}


def pool_broken(executor: Any) -> bool:
    """Whether a process pool knows it is broken (a worker died and it noticed)."""
    return bool(getattr(executor, "_broken", False))


def close_result_writer(executor: Any) -> None:
    """Close the parent's own write end of a process pool's result pipe (the parent never
    writes to it). Once every worker is dead, a read of half a result then ends at
    end-of-file instead of waiting forever; a pool without that pipe is left as it is."""
    queue = getattr(executor, "_result_queue", None)
    writer = getattr(queue, "_writer", None)
    close = getattr(writer, "close", None)
    if callable(close):
        close()


def skip_cancelled_calls_when_broken(executor: Any) -> None:
    """Make a process pool that breaks leave its cancelled calls alone (CPython 3.11).

    CPython 3.11 sets the broken pool's error on every pending call, and a call the run
    had cancelled raises InvalidStateError in the pool's manager thread, which then dies
    without ending the pool; 3.12 and later skip cancelled calls themselves. Applied to
    the manager thread of a pool pipeflow created, once that thread has started.
    """
    if sys.version_info >= (3, 12):
        return
    thread = getattr(executor, "_executor_manager_thread", None)
    terminate_broken = getattr(thread, "terminate_broken", None)
    if thread is None or terminate_broken is None:
        return

    def terminate_broken_skipping_cancelled(cause: Any) -> None:
        pending = getattr(thread, "pending_work_items", None)
        if isinstance(pending, dict):
            for work_id, item in list(pending.items()):
                if item.future.cancelled():
                    pending.pop(work_id, None)
        terminate_broken(cause)

    thread.terminate_broken = terminate_broken_skipping_cancelled


def at_threading_exit(fn: Any) -> None:
    """Call `fn` as the interpreter exits, before it waits for its non-daemon threads
    (as `concurrent.futures` ends its pools); at plain exit where that hook is missing."""
    register = getattr(threading, "_register_atexit", None)
    if callable(register):
        register(fn)
    else:
        import atexit

        atexit.register(fn)


def join_loop_threads(loop: Any, timeout: float) -> None:
    """Wait up to `timeout` seconds for the worker threads anyio started for `loop` (told
    to stop as the loop's main task ended, but not waited for); none where they don't
    say which loop they serve."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if getattr(thread, "loop", None) is loop and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def pool_threads(executor: Any) -> list[threading.Thread]:
    """A thread pool's worker threads; an empty list when the pool does not say."""
    threads = getattr(executor, "_threads", None)
    return [t for t in threads if isinstance(t, threading.Thread)] if threads else []


# --- the parent's main module in process workers ---


def _is_main_test(test: Any) -> bool:
    import ast

    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    if not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    constants = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and constants == ["__main__"]


def _main_module_frame(main: ModuleType, path: str) -> FrameType | None:
    """The frame of the main thread that runs the main module's own top-level code."""
    frames = getattr(sys, "_current_frames", None)
    if frames is None:
        return None
    frame: FrameType | None = frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        code = frame.f_code
        if (
            code.co_name == "<module>"
            and frame.f_globals is vars(main)
            and os.path.abspath(code.co_filename) == path
        ):
            return frame
        frame = frame.f_back
    return None


def main_is_guarded() -> bool:
    """Whether the parent's main module is a file whose top-level code runs inside
    `if __name__ == "__main__":` right now, so that importing it again under another
    name (as a worker does) does not run the caller again."""
    import ast
    import tokenize

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not isinstance(path, str):
        return False
    path = os.path.abspath(path)
    frame = _main_module_frame(main, path)
    if frame is None:
        return False
    line = frame.f_lineno
    try:
        with tokenize.open(path) as file:
            tree = ast.parse(file.read(), path)
    except (OSError, SyntaxError, ValueError):
        return False
    return any(
        isinstance(node, ast.If)
        and _is_main_test(node.test)
        and node.body[0].lineno <= line <= (node.body[-1].end_lineno or node.body[-1].lineno)
        for node in ast.walk(tree)
    )


_MAIN_KEYS = ("init_main_from_name", "init_main_from_path")


def _preparation_data(name: str) -> dict[str, Any]:
    """What a new process gets to prepare itself, less the import of the main module."""
    from multiprocessing import spawn

    data: dict[str, Any] = spawn.get_preparation_data(name)
    for key in _MAIN_KEYS:
        data.pop(key, None)
    return data


# The two Popen classes below are CPython's own (3.11 to 3.13 share them), except that
# the preparation data leaves the main module out.
_contexts: dict[str, type[multiprocessing.context.BaseContext]] = {}

try:
    from multiprocessing import forkserver, popen_forkserver, popen_spawn_posix, reduction, spawn
    from multiprocessing import util as _util
    from multiprocessing.context import set_spawning_popen

    util: Any = _util  # typeshed lacks some of its helpers

    def _launch_data(popen: Any, process_obj: Any) -> io.BytesIO:
        """What a new process reads first: its preparation data and its process object."""
        data = io.BytesIO()
        set_spawning_popen(popen)
        try:
            reduction.dump(_preparation_data(process_obj._name), data)
            reduction.dump(process_obj, data)
        finally:
            set_spawning_popen(None)
        return data

    class _ForkServerPopen(popen_forkserver.Popen):
        def _launch(self: Any, process_obj: Any) -> None:
            buf = _launch_data(self, process_obj)
            self.sentinel, w = forkserver.connect_to_new_process(self._fds)
            # a duplicate of the data pipe's write end is the parent's sentinel in the child
            _parent_w = os.dup(w)
            self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
            with open(w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
            self.pid = forkserver.read_signed(self.sentinel)

    class _SpawnPopen(popen_spawn_posix.Popen):
        def _launch(self: Any, process_obj: Any) -> None:
            from multiprocessing import resource_tracker

            tracker_fd = resource_tracker.getfd()
            self._fds.append(tracker_fd)
            fp = _launch_data(self, process_obj)
            parent_r = child_w = child_r = parent_w = None
            try:
                parent_r, child_w = os.pipe()
                child_r, parent_w = os.pipe()
                cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
                self._fds.extend([child_r, child_w])
                self.pid = util.spawnv_passfds(spawn.get_executable(), cmd, self._fds)
                self.sentinel = parent_r
                with open(parent_w, "wb", closefd=False) as f:
                    f.write(fp.getbuffer())
            finally:
                fds_to_close = [fd for fd in (parent_r, parent_w) if fd is not None]
                self.finalizer = util.Finalize(self, util.close_fds, fds_to_close)
                for fd in (child_r, child_w):
                    if fd is not None:
                        os.close(fd)

    class _ForkServerProcess(multiprocessing.context.ForkServerProcess):
        @staticmethod
        def _Popen(process_obj: Any) -> Any:
            return _ForkServerPopen(process_obj)

    class _SpawnProcess(multiprocessing.context.SpawnProcess):
        @staticmethod
        def _Popen(process_obj: Any) -> Any:
            return _SpawnPopen(process_obj)

    class _ForkServerContext(multiprocessing.context.ForkServerContext):
        Process = _ForkServerProcess

    class _SpawnContext(multiprocessing.context.SpawnContext):
        Process = _SpawnProcess

    if all(
        callable(getattr(module, name, None))
        for module, name in [
            (forkserver, "connect_to_new_process"),
            (forkserver, "read_signed"),
            (spawn, "get_preparation_data"),
            (spawn, "get_command_line"),
            (util, "spawnv_passfds"),
        ]
    ):
        _contexts = {"forkserver": _ForkServerContext, "spawn": _SpawnContext}
except (ImportError, AttributeError):  # Windows, or internals unlike CPython's 3.11-3.13
    pass


def process_context(method: str, *, import_main: bool) -> multiprocessing.context.BaseContext:
    """The multiprocessing context of a pipeflow process pool.

    Args:
        method: The start method (`forkserver`, `spawn`, `fork`).
        import_main: Whether new processes import the parent's main module, as
            `multiprocessing` makes them do (`fork` copies it, whatever this says).

    Returns:
        The context; the stock one where leaving the main module out is not supported.
    """
    context = multiprocessing.get_context(method)
    without_main = _contexts.get(method)
    if import_main or without_main is None:
        return context
    return without_main()
