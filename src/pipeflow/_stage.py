"""What one stage of a pipeline does: its callable, where it runs, how it treats errors."""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ._errors import ConfigError

__all__ = ["Kind", "Op", "OnError", "Pool", "Retry", "Stage"]

Kind = Literal["async", "thread", "process", "dask"]
Op = Literal["map", "filter", "flat_map", "map_batch"]
OnError = Literal["fail", "skip", "dead_letter"]

KINDS: tuple[str, ...] = ("async", "thread", "process", "dask")
OPS: tuple[str, ...] = ("map", "filter", "flat_map", "map_batch")
ON_ERROR: tuple[str, ...] = ("fail", "skip", "dead_letter")

# Bounds on sizes: beyond them a value is a typo or an attack, and would fork processes or
# allocate memory until the machine gives out. Process and local Dask pools scale with the
# cores, with a floor so that a config written for a bigger machine still runs on a laptop.
MAX_BATCH = 100_000
MAX_QUEUE_SIZE = 1_024
MAX_THREADS = 1_024
MAX_CONCURRENCY = 10_000  # async tasks of a stage, calls in flight on a remote Dask cluster


def max_processes() -> int:
    """The most worker processes one pool may start: 4 per core, and at least 32."""
    return max(32, 4 * (os.cpu_count() or 1))


def _workers_problem(kind: str | None, workers: Any, *, remote: bool = False) -> str | None:
    """What is wrong with `workers` for a pool of `kind` (None: a stage on a given pool)."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        return f"workers must be a positive int, got {workers!r}"
    if kind is None:
        return None
    if kind == "thread":
        limit, why = MAX_THREADS, "threads"
    elif kind in ("process", "dask") and not remote:
        limit, why = (
            max_processes(),
            f"processes: 4 per core on {os.cpu_count()} cores, at least 32",
        )
    else:
        limit, why = MAX_CONCURRENCY, "concurrent calls"
    if workers > limit:
        return f"workers must be at most {limit} for kind {kind} ({why}), got {workers}"
    return None


@dataclass(frozen=True)
class Retry:
    """How a stage retries a failing item before `on_error` decides its fate.

    Args:
        attempts: Total tries per item, the first included (1 = no retry).
        backoff: Seconds to wait before the first retry; doubles on each further one.
        max_backoff: The cap on the wait between two tries.
        jitter: Spread each wait randomly over [wait/2, wait] so retries don't stampede.
        retry_on: The exception types worth retrying; others go to `on_error` at once.
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 30.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"retries.attempts must be at least 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ConfigError("retries.backoff and retries.max_backoff must not be negative")

    def delay(self, attempt: int, rand: Callable[[], float]) -> float:
        """The wait before try number `attempt + 1`, after `attempt` failed tries."""
        wait = min(self.backoff * 2.0 ** (attempt - 1), self.max_backoff)
        return wait * (0.5 + rand() / 2) if self.jitter else wait


@dataclass(frozen=True)
class Pool:
    """A pool of workers that a pipeline creates, and that several stages may share.

    Args:
        kind: `thread`, `process` or `dask` (needs the `pipeflow[dask]` extra).
        workers: The number of threads or processes; for `dask`, of Dask worker
            processes to start (`address: local`) or to expect (an existing scheduler).
        start_method: For process pools: `forkserver` (default where available), `spawn`
            or `fork` (unsafe in a process that runs threads).
        max_tasks_per_child: For process pools: replace a worker after this many calls.
        threads_per_worker: For dask: threads in each Dask worker process.
        address: For dask: `local` starts a `distributed.LocalCluster` on 127.0.0.1 that
            the run owns and closes; `tcp://host:8786` (or `tls://...`) uses an existing
            scheduler, which the run never shuts down.
        security: For dask: a `distributed.Security`, a mapping of its arguments
            (`tls_ca_file`, `tls_client_cert`, ...), or True for temporary self-signed
            credentials (`address: local` only).
        dashboard: For dask with `address: local`: serve the scheduler's dashboard on
            127.0.0.1:8787 (off by default).
    """

    kind: Literal["thread", "process", "dask"] = "process"
    workers: int = 4
    start_method: str | None = None
    max_tasks_per_child: int | None = None
    threads_per_worker: int = 1
    address: str = "local"
    security: Any = None
    dashboard: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("thread", "process", "dask"):
            raise ConfigError(
                f"a pool's kind must be 'thread', 'process' or 'dask', got {self.kind!r}"
            )
        if self.workers < 1:
            raise ConfigError(f"a pool needs at least 1 worker, got {self.workers}")
        if problem := _workers_problem(self.kind, self.workers, remote=self.address != "local"):
            raise ConfigError(problem)
        if self.max_tasks_per_child is not None and (
            not isinstance(self.max_tasks_per_child, int) or self.max_tasks_per_child < 1
        ):
            raise ConfigError(
                f"max_tasks_per_child must be a positive int, got {self.max_tasks_per_child!r}"
            )
        if self.max_tasks_per_child is not None and (
            self.kind != "process" or self.start_method == "fork"
        ):
            raise ConfigError(
                "max_tasks_per_child applies to kind: process with the forkserver or spawn "
                "start method"
            )
        if not isinstance(self.threads_per_worker, int) or self.threads_per_worker < 1:
            raise ConfigError(
                f"threads_per_worker must be a positive int, got {self.threads_per_worker!r}"
            )
        if self.address != "local" and "://" not in self.address:
            raise ConfigError(
                f"address must be 'local' or a scheduler address such as "
                f"tcp://host:8786, got {self.address!r}"
            )
        if self.kind != "dask" and (
            self.address != "local" or self.security is not None or self.dashboard
        ):
            raise ConfigError("address, security and dashboard are options of kind: dask")
        if self.dashboard and self.address != "local":
            raise ConfigError(
                "dashboard applies to address: local; an existing scheduler serves its own"
            )
        if self.start_method not in (None, "forkserver", "spawn", "fork"):
            raise ConfigError(
                f"start_method must be forkserver, spawn or fork, got {self.start_method!r}"
            )


def _is_async_callable(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


def _name_of(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return str(getattr(fn, "__name__", type(fn).__name__))


@dataclass
class Stage:
    """One step of a pipeline: a callable applied to every item, on the loop or in a pool.

    Args:
        fn: The callable. `map`: item -> result; `filter`: item -> bool; `flat_map`:
            item -> iterable of results; `map_batch`: list of items -> list of results.
            With `setup`, it is called as `fn(item, state)`.
        name: Unique within the pipeline; defaults to the callable's name.
        kind: `async` (coroutines on the event loop), `thread`, `process`, or `dask` (a
            private `distributed.LocalCluster` of `workers` processes; share a `Pool` to
            reach an existing scheduler).
        workers: Pool size, or concurrent tasks for `async`. Ignored with `executor`.
        op: `map`, `filter`, `flat_map` or `map_batch`.
        ordered: Emit results in input order (through a bounded reorder window).
        batch: Items per executor call: `auto` or a positive int.
        queue_size: The bound of this stage's input queue, in batches.
        timeout: Seconds one item may take, or None.
        retries: A `Retry`, a number of attempts, or None.
        on_error: `fail`, `skip` or `dead_letter`.
        executor: A pool name from `Pipeline(executors=...)`, or any
            `concurrent.futures.Executor`, which the pipeline uses and never shuts down.
        setup: Called once per worker before its first item; its return value is passed
            to `fn` as `state`. May be `async def` for async stages.
        teardown: Called with the state when the worker's work is over.
        start_method: For a process stage's own pool (see `Pool`).
    """

    fn: Callable[..., Any]
    name: str | None = None
    kind: Kind = "thread"
    workers: int = 1
    op: Op = "map"
    ordered: bool = True
    batch: int | Literal["auto"] = "auto"
    queue_size: int = 8
    timeout: float | None = None
    retries: Retry | int | None = None
    on_error: OnError = "fail"
    executor: str | concurrent.futures.Executor | None = None
    setup: Callable[[], Any] | None = None
    teardown: Callable[[Any], Any] | None = None
    start_method: str | None = None
    retry: Retry | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(f"a stage's fn must be callable, got {self.fn!r}")
        if self.name is None:
            self.name = _name_of(self.fn)
        where = f"stage {self.name!r}"
        problems: list[str] = []
        if self.kind not in KINDS:
            problems.append(f"{where}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.op not in OPS:
            problems.append(f"{where}: op must be one of {', '.join(OPS)}, got {self.op!r}")
        if self.on_error not in ON_ERROR:
            problems.append(
                f"{where}: on_error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}"
            )
        # a stage given an executor runs on that pool: its own workers are never started
        kind = self.kind if self.executor is None else None
        if workers_problem := _workers_problem(kind, self.workers):
            problems.append(f"{where}: {workers_problem}")
        if self.batch != "auto" and (
            not isinstance(self.batch, int) or not 1 <= self.batch <= MAX_BATCH
        ):
            problems.append(
                f"{where}: batch must be 'auto' or an int from 1 to {MAX_BATCH}, got {self.batch!r}"
            )
        if not isinstance(self.queue_size, int) or not 1 <= self.queue_size <= MAX_QUEUE_SIZE:
            problems.append(
                f"{where}: queue_size must be an int from 1 to {MAX_QUEUE_SIZE}, "
                f"got {self.queue_size!r}"
            )
        if self.timeout is not None and self.timeout <= 0:
            problems.append(f"{where}: timeout must be positive, got {self.timeout!r}")
        is_async = _is_async_callable(self.fn)
        if self.kind == "async" and not is_async and self.executor is None:
            problems.append(
                f"{where}: {_name_of(self.fn)} is a plain function but the stage is async: it "
                "would block the event loop; use kind: thread (or process), or define it "
                "with async def"
            )
        if self.kind != "async" and is_async:
            problems.append(
                f"{where}: {_name_of(self.fn)} is a coroutine function; use kind: async "
                "(it cannot run in a thread or process pool)"
            )
        if self.kind != "async" and self.setup is not None and _is_async_callable(self.setup):
            problems.append(f"{where}: an async setup needs kind: async")
        if isinstance(self.retries, int) and not isinstance(self.retries, bool):
            self.retry = Retry(attempts=self.retries)
        elif isinstance(self.retries, Retry):
            self.retry = self.retries
        elif self.retries is not None:
            problems.append(f"{where}: retries must be a Retry or an int, got {self.retries!r}")
        if problems:
            raise ConfigError(problems)

    @property
    def is_async(self) -> bool:
        """Whether the stage's callable is a coroutine function."""
        return _is_async_callable(self.fn)


def check_unique_names(stages: Sequence[Stage]) -> None:
    """Raise ConfigError if two stages share a name."""
    seen: set[str] = set()
    for stage in stages:
        assert stage.name is not None
        if stage.name in seen:
            raise ConfigError(f"stage {stage.name!r}: duplicate stage name")
        seen.add(stage.name)
