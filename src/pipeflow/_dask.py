"""Stages on a Dask cluster: a local one the run owns, or an existing scheduler.

`distributed` is an optional extra (`pipeflow[dask]`), imported only when a Dask pool
starts, so pipeflow imports without it.

The run talks to the cluster through a synchronous `distributed.Client`: it keeps its own
event loop in a thread of its own, so it never competes with the pipeline's loop, and
work goes through the client's `concurrent.futures` interface (`Client.get_executor()`),
one task per chunk, like a process pool. `DaskExecutor` adds three things to it:

- the task marks its Dask worker process as a pipeflow worker (process-wide callable
  cache, per-item exceptions checked to pickle, tracebacks sent back as text);
- a chunk whose tasks kept killing their workers (Dask's `KilledWorker`) fails with
  `WorkerCrashed`, which the engine pins on the items that cause it, like a process crash;
- closing it cancels what is still pending and closes the client, and the cluster too
  when the run started it. Its pending calls then fail with `BrokenProcessPool`, which
  tells the engine to run them again, so a local cluster is replaced like a process pool
  (a timed-out item's task cannot be interrupted in its Dask worker thread: the run
  ends the cluster instead).

A worker process of a cluster the run started ends, once its Dask worker has closed,
as a forkserver child of a process pool does: after `multiprocessing`'s exit hooks (the
stages' teardowns among them), without the interpreter's teardown of every module it
imported (about 50 ms of CPU with `distributed` loaded, which the run's end waits for).
The workers of a cluster the run was lent are left alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import _worker
from ._errors import ConfigError, ItemError, PoolStartError, WorkerCrashed
from ._log import logger

if TYPE_CHECKING:
    from ._stage import Pool

__all__ = ["DaskExecutor", "require_distributed", "start"]

# Where the dashboard of a local cluster is served when asked for; never on a public address.
DASHBOARD_ADDRESS = "127.0.0.1:8787"
# A local cluster's scheduler sends a worker no more tasks than it has threads: the others
# wait at the scheduler for the first free worker (a process pool's shared queue), never
# behind a slow task on a busy worker, where their wait would count against their timeout.
LOCAL_CLUSTER_CONFIG: dict[str, Any] = {"distributed.scheduler.worker-saturation": 1.0}
# A scheduler always serves HTTP (on port 8787 unless told otherwise). Without a dashboard,
# it serves no routes, on a free port of 127.0.0.1: nothing to see, nothing to collide with.
NO_DASHBOARD_CONFIG: dict[str, Any] = {"distributed.scheduler.http.routes": []}
NO_DASHBOARD_SCHEDULER = {"dashboard_address": "127.0.0.1:0"}


def require_distributed() -> ModuleType:
    """The `distributed` module.

    Raises:
        ConfigError: The `pipeflow[dask]` extra is not installed.
    """
    try:
        import distributed
    except ImportError as exc:
        raise ConfigError(
            f"kind: dask needs Dask's distributed scheduler ({exc}); "
            "install pipeflow[dask], e.g. pip install 'pipeflow[dask]'"
        ) from None
    return distributed


def start(name: str, spec: Pool) -> DaskExecutor:
    """Start (`address: local`) or reach (an address) the cluster of pool `name`.

    Blocking: call from a thread.

    Raises:
        ConfigError: `distributed` is not installed, or `security` is of the wrong type.
        PoolStartError: The scheduler cannot be reached, or the cluster does not start.
    """
    distributed = require_distributed()
    security = _security(distributed, spec.security, local=spec.address == "local")
    cluster: Any = None
    try:
        if spec.address == "local":
            import dask

            config = LOCAL_CLUSTER_CONFIG | ({} if spec.dashboard else NO_DASHBOARD_CONFIG)
            with dask.config.set(config):
                cluster = distributed.LocalCluster(
                    n_workers=spec.workers,
                    threads_per_worker=spec.threads_per_worker,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=DASHBOARD_ADDRESS if spec.dashboard else None,
                    security=security,
                    scheduler_kwargs=None if spec.dashboard else NO_DASHBOARD_SCHEDULER,
                )
            client = distributed.Client(cluster, set_as_default=False, security=cluster.security)
            client.wait_for_workers(spec.workers)
            if spec.dashboard:
                logger.info("dask_dashboard", pool=name, url=client.dashboard_link)
        else:
            client = distributed.Client(spec.address, set_as_default=False, security=security)
        try:
            # import pipeflow in every worker now, so start-up is paid (and measured) before
            # the work, and a cluster whose workers lack pipeflow fails here, clearly
            client.run(_mark_owned_worker if cluster is not None else _worker.mark_process_worker)
        except Exception as exc:
            client.close()
            raise PoolStartError(
                f"pool {name!r}: the Dask workers cannot run pipeflow's worker code "
                f"({type(exc).__name__}: {exc}); install pipeflow on every worker"
            ) from exc
    except BaseException as exc:
        if cluster is not None:
            cluster.close()
        if isinstance(exc, OSError | TimeoutError):
            where = "start a local Dask cluster" if cluster is None else "reach its workers"
            if spec.address != "local":
                where = f"reach the Dask scheduler at {spec.address}"
            raise PoolStartError(f"pool {name!r}: cannot {where}: {exc}") from exc
        raise
    logger.debug("dask_pool_started", pool=name, scheduler=client.scheduler.address)
    return DaskExecutor(client, cluster)


def _security(distributed: ModuleType, security: Any, *, local: bool) -> Any:
    if security is None or isinstance(security, distributed.Security):
        return security
    if security is True and local:
        return True  # LocalCluster makes temporary self-signed credentials
    if isinstance(security, Mapping):
        return distributed.Security(**security)
    raise ConfigError(
        "security must be a distributed.Security, a mapping of its arguments, or True "
        f"(address: local only), got {security!r}"
    )


class _Arguments:
    """A call's arguments, as one object that Dask sends as it is.

    Dask looks into the lists, tuples and dicts a task is given, element by element, for
    futures and keys to substitute (in the client, the scheduler and the worker): for a
    chunk of thousands of items that walk costs more than the call itself.
    """

    __slots__ = ("args",)

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Arguments, (self.args,))


def _on_worker(fn: Callable[..., Any], arguments: _Arguments, owned: bool) -> Any:
    """Run `fn` in a Dask worker process as it would run in a pipeflow process worker."""
    if owned:
        _mark_owned_worker()  # a worker the nanny started again after a crash, too
    else:
        _worker.mark_process_worker()
    return fn(*arguments.args)


# Runs after every other exit hook of `multiprocessing` (they run by priority, highest first).
QUICK_EXIT_PRIORITY = -(1 << 30)
_quick_exit_armed = False


def _mark_owned_worker() -> None:
    """Mark a worker of a cluster the run started, and arm its quick exit (see above)."""
    global _quick_exit_armed
    _worker.mark_process_worker()
    if _quick_exit_armed:
        return
    import multiprocessing.util

    if multiprocessing.parent_process() is None:
        return  # not a worker process of its own: nothing to end
    multiprocessing.util.Finalize(None, _exit_now, exitpriority=QUICK_EXIT_PRIORITY)
    _quick_exit_armed = True


def _exit_now() -> None:
    """End a worker process whose Dask worker returned normally (not on an exception,
    whose exit code and traceback the normal exit reports)."""
    if sys.exc_info()[0] is not None:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


class DaskExecutor(concurrent.futures.Executor):
    """An executor on a Dask cluster, for the pool of one run.

    Args:
        client: A synchronous `distributed.Client`; the executor closes it.
        cluster: The `LocalCluster` the run started, closed with the client; None for an
            existing scheduler, which is never shut down.
    """

    def __init__(self, client: Any, cluster: Any = None) -> None:
        self.client = client
        self.cluster = cluster
        # pure=False: two chunks with equal items (a retry, say) are two tasks, not one
        self._executor = client.get_executor(pure=False)
        self.closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run `fn(*args)` in a Dask worker; the future fails with `WorkerCrashed` if the
        workers running it kept dying."""
        if kwargs:
            raise TypeError("DaskExecutor.submit takes positional arguments only")
        if self.closed:
            raise BrokenProcessPool("the pool's Dask client is closed")
        task = self._executor.submit(_on_worker, fn, _Arguments(args), self.cluster is not None)
        future: Future[Any] = Future()
        # cancelling ours (a run cancelled, an item timed out) cancels the Dask task
        future.add_done_callback(functools.partial(_cancel_task, task))
        task.add_done_callback(functools.partial(self._relay, future))
        return future

    def _relay(self, future: Future[Any], task: Future[Any]) -> None:
        """Hand a Dask task's outcome to our future (on the client's thread)."""
        if future.done():
            return
        exc: BaseException | None
        if task.cancelled():
            # not by us (our future is still pending): by shutdown(), or by the cluster
            exc = (
                BrokenProcessPool("the pool's Dask client was closed")
                if self.closed
                else ItemError("the Dask cluster cancelled this chunk's task")
            )
        else:
            exc = task.exception()
        if isinstance(exc, require_distributed().KilledWorker):
            crash = WorkerCrashed(
                f"the Dask worker running this item died ({exc.allowed_failures + 1} in a "
                f"row; last {exc.last_worker.address})"
            )
            crash.__cause__ = exc
            exc = crash
        # our future may be cancelled concurrently from the pipeline's thread
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if exc is None:
                future.set_result(task.result())
            else:
                future.set_exception(exc)

    def pids(self) -> list[int]:
        """The process ids of the cluster's workers (from the workers themselves)."""
        return sorted(self.client.run(os.getpid).values())

    def kill_workers(self) -> None:
        """SIGKILL the worker processes of a cluster the run started (no-op otherwise).

        A Dask worker cannot interrupt a task, and closing it waits for its running
        tasks; a failed or timed-out run must not wait for a hung one.
        """
        if self.cluster is None:
            return
        for nanny in list(self.cluster.workers.values()):
            # tell the nanny first, or it starts a new worker only to stop it again
            nanny.close_gracefully(reason="pipeflow-kill")
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(nanny.pid, signal.SIGKILL)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Close the client, and the cluster if the run started it.

        Args:
            wait: Wait for pending tasks first (unless `cancel_futures`).
            cancel_futures: Cancel pending tasks instead, releasing them on the cluster.
        """
        self.closed = True
        try:
            self._executor.shutdown(wait=wait and not cancel_futures)
        finally:
            try:
                self.client.close()
            finally:
                if self.cluster is not None:
                    self.cluster.close()


def _cancel_task(task: Future[Any], future: Future[Any]) -> None:
    if future.cancelled():
        task.cancel()
