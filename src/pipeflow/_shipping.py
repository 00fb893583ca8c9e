"""How a process stage's callables reach its workers: with every call, or once per worker.

A stage call carries the stage's callable, setup and teardown pickled (see `StageCall`).
Small ones travel with every call, as they cost less than a round trip. Past
`SEND_ONCE_BYTES` (a closure or a `functools.partial` over a big table, an object with
its data), a call carries only the stage's key: a worker that has the callables loaded
for that key runs the call; one that has not answers `NotLoaded` at once, and that call
is sent again with the callables, which the worker then keeps for the rest of the run.
So each worker receives them about once per run, whatever the number of calls, and a pool
replaced after a crash, or one lent by the app, needs nothing else.

Workers recycled under `max_tasks_per_child` are not sent calls without the callables:
an answer `NotLoaded` would use up one of the few calls such a worker takes.
"""

from __future__ import annotations

import dataclasses

from ._pools import PoolHandle
from ._worker import StageCall

__all__ = ["SEND_ONCE_BYTES", "light_call"]

# a stage whose callables pickle to more bytes than this sends them once per worker
SEND_ONCE_BYTES = 64 * 1024


def _size(part: object) -> int:
    return len(part) if isinstance(part, bytes) else 0


def light_call(call: StageCall, pool: PoolHandle | None) -> StageCall | None:
    """The call to send by default, without the callables, if they are worth sending once.

    Returns:
        The light call; None when every call should carry the callables.
    """
    if pool is None or pool.kind not in ("process", "dask") or not isinstance(call.fn, bytes):
        return None  # an executor of unknown make may run calls in this process
    if sum(_size(part) for part in (call.fn, call.setup, call.teardown)) <= SEND_ONCE_BYTES:
        return None
    spec = pool.spec
    recycles = (spec is not None and spec.max_tasks_per_child is not None) or getattr(
        pool.executor, "_max_tasks_per_child", None
    ) is not None
    if recycles:
        return None
    return dataclasses.replace(call, fn=None, setup=None, teardown=None)
