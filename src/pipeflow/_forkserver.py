"""The forkserver that process pools fork their workers from.

Kept apart from `_pools`, and light to import (the standard library only), so that the
`pipeflow` command can start the server before it imports anything else: the server's
own start-up (an interpreter, and the modules it preloads) then runs on another core
while the command imports its modules and reads the config, instead of delaying the
first pool.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading

__all__ = ["FORKSERVER_PRELOAD", "default_start_method", "start_forkserver"]

# what a forkserver imports once, before it forks each worker
FORKSERVER_PRELOAD = ("pipeflow._compat", "pipeflow._worker")


def default_start_method() -> str:
    """forkserver where the platform has it (safe in a threaded parent), else spawn."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def start_forkserver() -> None:
    """Start the forkserver, without waiting for it to be ready.

    Where forkserver is not the default, or a pool asks for another start method, the
    server just goes unused. Only the main thread starts it (signals are set there).
    """
    if (
        default_start_method() != "forkserver"
        or threading.current_thread() is not threading.main_thread()
    ):
        return
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(FORKSERVER_PRELOAD))
    # The server is started ignoring SIGINT, which it keeps across exec: Ctrl-C reaches the
    # whole process group, and the server ignores it only once its preload is done, so a
    # Ctrl-C meanwhile would print its KeyboardInterrupt traceback. The command decides how
    # a run stops (a Ctrl-C in the moment of the spawn itself is lost: press it again).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)
