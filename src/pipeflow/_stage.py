"""What one stage of a pipeline does: its callable, where it runs, how it treats errors.

The vocabulary of a pipeline (kinds, ops, error policies, start methods) is declared here
once, as `Literal` types; the config's schema uses the same types, and the rules that tie
the arguments together are checked here only, for Python and YAML alike.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ._auto import auto_bounds
from ._errors import ConfigError, Problem
from ._group import Group
from ._rate import Rate

__all__ = [
    "KINDS",
    "Kind",
    "ON_ERROR",
    "OPS",
    "OnError",
    "Op",
    "PICKLING_KINDS",
    "POOL_KINDS",
    "Pool",
    "PoolKind",
    "Retry",
    "START_METHODS",
    "Stage",
    "StartMethod",
]

PoolKind = Literal["thread", "process", "dask"]
Kind = Literal["async", PoolKind, "auto"]
Op = Literal["map", "filter", "flat_map", "map_batch"]
OnError = Literal["fail", "skip", "dead_letter"]
StartMethod = Literal["forkserver", "spawn", "fork"]

POOL_KINDS: tuple[PoolKind, ...] = get_args(PoolKind)
KINDS: tuple[Kind, ...] = get_args(Kind)
OPS: tuple[Op, ...] = get_args(Op)
ON_ERROR: tuple[OnError, ...] = get_args(OnError)
START_METHODS: tuple[StartMethod, ...] = get_args(StartMethod)
# the kinds whose callables are pickled to reach their workers
PICKLING_KINDS: tuple[PoolKind, ...] = ("process", "dask")

DASK_EXTRA_MISSING = (
    "kind dask needs the dask extra, which is not installed: pip install 'pipeflow[dask]'"
)


def _one_of(choices: Sequence[str]) -> str:
    return ", ".join(choices[:-1]) + f" or {choices[-1]}"


def _dask_installed() -> bool:
    # find_spec, not an import: distributed takes about a second to import
    try:
        return importlib.util.find_spec("distributed") is not None
    except (ImportError, ValueError):
        return False


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


def _auto_problem(workers: Any) -> tuple[str | None, tuple[int | None, int | None] | None]:
    """What is wrong with a `workers: auto` form, and its bounds (None, None: defaults)."""
    if workers == "auto":
        return None, (None, None)
    if not isinstance(workers, Mapping):
        return None, None
    unknown = sorted(str(key) for key in workers if key not in ("min", "max"))
    if unknown:
        return f"unknown key {unknown[0]!r} in workers; write auto or {{min: 1, max: 64}}", None
    bounds: list[int | None] = []
    for key in ("min", "max"):
        value = workers.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            return f"workers {key} must be a positive int, got {value!r}", None
        bounds.append(value)
    low, high = bounds
    if low is not None and high is not None and low > high:
        return f"workers min ({low}) must not be above max ({high})", None
    return None, (low, high)


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

    kind: PoolKind = "process"
    workers: int = 4
    start_method: StartMethod | None = None
    max_tasks_per_child: int | None = None
    threads_per_worker: int = 1
    address: str = "local"
    security: Any = None
    dashboard: bool = False

    def __post_init__(self) -> None:
        if self.kind not in POOL_KINDS:
            raise ConfigError(
                Problem(f"kind must be {_one_of(POOL_KINDS)}, got {self.kind!r}", key="kind")
            )
        if self.kind == "dask" and not _dask_installed():
            raise ConfigError(Problem(DASK_EXTRA_MISSING, key="kind"))
        if self.workers < 1:
            raise ConfigError(f"a pool needs at least 1 worker, got {self.workers}")
        if problem := _workers_problem(self.kind, self.workers, remote=self.address != "local"):
            raise ConfigError(Problem(problem, key="workers"))
        if self.max_tasks_per_child is not None and (
            not isinstance(self.max_tasks_per_child, int) or self.max_tasks_per_child < 1
        ):
            raise ConfigError(
                Problem(
                    f"max_tasks_per_child must be a positive int, got {self.max_tasks_per_child!r}",
                    key="max_tasks_per_child",
                )
            )
        if self.max_tasks_per_child is not None and (
            self.kind != "process" or self.start_method == "fork"
        ):
            raise ConfigError(
                Problem(
                    "max_tasks_per_child applies to kind: process with the forkserver or spawn "
                    "start method",
                    key="max_tasks_per_child",
                )
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
        if self.start_method is not None and self.start_method not in START_METHODS:
            raise ConfigError(
                Problem(
                    f"start_method must be {_one_of(START_METHODS)}, got {self.start_method!r}",
                    key="start_method",
                )
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
            reach an existing scheduler). By default `async` for a coroutine function,
            else `thread`. Not with `executor`, which decides where the stage runs.
            `auto`: `async` for a coroutine function; a plain one starts on threads and
            may move to processes once, early in the run, from what it measures there
            (see `_auto.choose_kind`); the report's `kind_choice` says why.
        workers: Pool size, or concurrent tasks for `async`. Ignored with `executor`.
            `"auto"` (or `{"min": 1, "max": 64}`) tunes the stage's concurrency while
            it runs, from its measured throughput (see `_auto`); a process stage then
            never gets more processes than free cores.
        op: `map`, `filter`, `flat_map` or `map_batch`.
        ordered: Emit results in input order (through a bounded reorder window).
        batch: Items per executor call: `auto` or a positive int.
        queue_size: The bound of this stage's input queue, in batches.
        timeout: Seconds one item may take, or None.
        retries: A `Retry`, a number of attempts, or None.
        on_error: `fail`, `skip` or `dead_letter`.
        executor: A pool name from `Pipeline(executors=...)`, or any
            `concurrent.futures.Executor`, which the pipeline uses and never shuts down.
            Not with `kind`.
        setup: Called once per worker before its first item; its return value is passed
            to `fn` as `state`. May be `async def` for async stages. A setup with one
            required parameter is passed a `WorkerInfo` (the worker's index, the stage).
        teardown: Called with the state when the worker's work is over.
        start_method: For a process stage's own pool (see `Pool`).
        rate: At most so many calls of `fn` per period, across all the stage's workers:
            a `Rate`, or its text (`"10/s"`, `"100/min"`, `"5/250ms"`). None: no limit.
        group: For `map_batch`: call fn with real groups, a `Group` (exactly `size`
            items, or what arrived `within` a time, per key `by`); an int N is short for
            `Group(size=N)`. Not with a fixed `batch`.
    """

    fn: Callable[..., Any]
    name: str | None = None
    kind: Kind | None = None
    workers: int | Literal["auto"] | Mapping[str, int] = 1
    op: Op = "map"
    ordered: bool = True
    batch: int | Literal["auto"] = "auto"
    queue_size: int = 8
    timeout: float | None = None
    retries: Retry | int | None = None
    on_error: OnError = "fail"
    executor: str | concurrent.futures.Executor | None = None
    setup: Callable[..., Any] | None = None
    teardown: Callable[[Any], Any] | None = None
    start_method: StartMethod | None = None
    rate: Rate | str | None = None
    group: Group | int | None = None
    retry: Retry | None = field(init=False, default=None)
    rate_limit: Rate | None = field(init=False, default=None)
    grouping: Group | None = field(init=False, default=None)
    # `workers: auto`: its (min, max), each None for the kind's default
    auto_workers: tuple[int | None, int | None] | None = field(init=False, default=None)
    # `kind: auto` was asked for (an async def's kind is then `async`)
    auto_kind: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(Problem(f"a stage's fn must be callable, got {self.fn!r}", key="fn"))
        if self.name is None:
            self.name = _name_of(self.fn)
        is_async = _is_async_callable(self.fn)
        if self.kind == "auto":
            self.auto_kind = True
            if is_async:
                self.kind = "async"
        if self.kind is None and self.executor is None:
            self.kind = "async" if is_async else "thread"
        problems: list[Problem] = []

        def problem(what: str, key: str | None = None) -> None:
            problems.append(Problem(what, self.name, key=key))

        if self.kind is not None and self.executor is not None:
            problem(
                "give kind or executor, not both (kind makes the stage its own pool, "
                "executor names a shared one or lends one)"
            )
        if self.kind is not None and self.kind not in KINDS:
            problem(f"kind must be {_one_of(KINDS)}, got {self.kind!r}", "kind")
        if self.op not in OPS:
            problem(f"op must be {_one_of(OPS)}, got {self.op!r}", "op")
        if self.on_error not in ON_ERROR:
            problem(f"on_error must be {_one_of(ON_ERROR)}, got {self.on_error!r}", "on_error")
        if self.start_method is not None and self.start_method not in START_METHODS:
            problem(
                f"start_method must be {_one_of(START_METHODS)}, got {self.start_method!r}",
                "start_method",
            )
        # a stage given an executor runs on that pool: its own workers are never started
        kind = self.kind if self.executor is None else None
        kind = "thread" if kind == "auto" else kind  # it starts on threads
        auto_problem, self.auto_workers = _auto_problem(self.workers)
        if auto_problem:
            problem(auto_problem, "workers")
        elif self.auto_workers is not None:
            if self.kind == "dask":
                problem("workers: auto applies to kinds async, thread and process", "workers")
            for bound in self.auto_workers:
                if bound is not None and (bound_problem := _workers_problem(kind, bound)):
                    problem(bound_problem, "workers")
                    break
        elif workers_problem := _workers_problem(kind, self.workers):
            problem(workers_problem, "workers")
        if self.batch != "auto" and (
            not isinstance(self.batch, int) or not 1 <= self.batch <= MAX_BATCH
        ):
            problem(
                f"batch must be 'auto' or an int from 1 to {MAX_BATCH}, got {self.batch!r}",
                "batch",
            )
        if not isinstance(self.queue_size, int) or not 1 <= self.queue_size <= MAX_QUEUE_SIZE:
            problem(
                f"queue_size must be an int from 1 to {MAX_QUEUE_SIZE}, got {self.queue_size!r}",
                "queue_size",
            )
        if self.timeout is not None and self.timeout <= 0:
            problem(f"timeout must be positive, got {self.timeout!r}", "timeout")
        if self.kind == "async" and not is_async:
            problem(
                f"{_name_of(self.fn)} is a plain function but the stage is async: it "
                "would block the event loop; use kind: thread (or process), or define it "
                "with async def",
                "kind",
            )
        if self.kind != "async" and is_async:
            problem(
                f"{_name_of(self.fn)} is a coroutine function; use kind: async, or leave "
                "kind out (it cannot run in a thread or process pool)",
                "executor" if self.executor is not None else "kind",
            )
        if self.kind == "dask" and not _dask_installed():
            problem(DASK_EXTRA_MISSING, "kind")
        if self.kind != "async" and self.setup is not None and _is_async_callable(self.setup):
            problem("an async setup needs kind: async", "setup")

        def option(key: str, value: Any, kind: type, shorthand: Any, expected: str) -> Any:
            """`value` as a `kind`: itself, built from its shorthand, or a problem."""
            if isinstance(value, kind):
                return value
            if shorthand is not None:
                try:
                    return shorthand(value)
                except ConfigError as exc:
                    problems.extend(Problem(p, self.name, key=key) for p in exc.problems)
            elif value is not None:
                problem(f"{key} must be {expected}, got {value!r}", key)
            return None

        def whole(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        self.retry = option(
            "retries",
            self.retries,
            Retry,
            (lambda n: Retry(attempts=n)) if whole(self.retries) else None,
            "a Retry or an int",
        )
        self.rate_limit = option(
            "rate",
            self.rate,
            Rate,
            Rate.parse if isinstance(self.rate, str) else None,
            "a Rate or a text such as '10/s'",
        )
        self.grouping = option(
            "group",
            self.group,
            Group,
            (lambda n: Group(size=n)) if whole(self.group) else None,
            "a Group or an int",
        )
        if self.group is not None and self.op != "map_batch":
            problem(
                f"group applies to op: map_batch (fn takes the group as a list), not {self.op}",
                "group",
            )
        if self.group is not None and self.batch != "auto":
            problem("give batch or group, not both: the group is the call", "group")
        if problems:
            raise ConfigError(problems)

    @property
    def pool_workers(self) -> int:
        """The size of the stage's own pool: `workers`, or the most that auto may use."""
        if self.auto_workers is None:
            assert isinstance(self.workers, int)
            return self.workers
        return auto_bounds(self.kind or "thread", *self.auto_workers)[1]

    @property
    def is_async(self) -> bool:
        """Whether the stage's callable is a coroutine function."""
        return _is_async_callable(self.fn)


def duplicate_names(stages: Sequence[Stage]) -> list[Problem]:
    """A problem for each stage whose name an earlier stage has."""
    first: dict[str | None, int] = {}
    problems = []
    for index, stage in enumerate(stages):
        if stage.name in first:
            problems.append(
                Problem(
                    f"duplicate stage name {stage.name!r} (stage {first[stage.name]} has it "
                    "too); stage names must be unique",
                    stage.name,
                    index,
                    "name",
                )
            )
        first.setdefault(stage.name, index)
    return problems
