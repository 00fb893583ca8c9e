"""A process stage's callable and what it carries go to each worker once per run."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest

import fns
from conftest import worker_processes
from pipeflow import ListSink, Pipeline, Pool, Stage
from test_cli import pipeflow


class _WatchedPool(concurrent.futures.ProcessPoolExecutor):
    """A lent process pool that records how many bytes each call hands it."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers, mp_context=multiprocessing.get_context("forkserver"))
        self.sent: list[int] = []
        self._lock = threading.Lock()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        size = len(pickle.dumps((fn, args, kwargs)))
        with self._lock:
            self.sent.append(size)
        return super().submit(fn, *args, **kwargs)


def _expected(items: range) -> list[int]:
    return [fns.big_lookup(n) for n in items]


def test_a_callable_bound_to_big_data_reaches_each_worker_once_not_every_call() -> None:
    pool = _WatchedPool(2)
    try:
        for _ in range(2):  # a second run sends them again: the first kept nothing
            pool.sent.clear()
            stage = Stage(fns.BigLookup(), executor=pool, batch=1)
            assert list(Pipeline([stage]).iter(range(100))) == _expected(range(100))
            heavy = [size for size in pool.sent if size >= fns.BIG_BYTES]
            # a worker without the callable answers "not loaded", and the call goes again
            # with it, to whichever worker is free (perhaps one that has it already): how
            # many calls carry it is random, a few per worker with a geometric tail; 20 is
            # far out in that tail, and far from the 100 of sending it with every call
            assert 1 <= len(heavy) <= 20, f"{len(heavy)} of {len(pool.sent)} calls carried it"
            assert len(pool.sent) >= 100
        left = [pool.submit(fns.cached_stage_entries).result(timeout=30) for _ in range(4)]
        assert left == [0, 0, 0, 0]
    finally:
        pool.shutdown()
    assert not worker_processes()


def test_a_worker_that_dies_is_replaced_by_one_that_gets_the_callable_again() -> None:
    sink = ListSink()
    stage = Stage(fns.BigLookup(crash_on=13), kind="process", workers=2, batch=1, on_error="skip")
    report = Pipeline([stage], sink=sink).run_sync(range(40))
    assert sink.items == [fns.big_lookup(n) for n in range(40) if n != 13]
    assert report.stages[0].skipped == 1
    assert not worker_processes()


def test_recycled_workers_run_a_callable_that_carries_big_data() -> None:
    stage = Stage(fns.BigLookup(), executor="cpu", batch=1)
    pipeline = Pipeline([stage], executors={"cpu": Pool("process", 2, max_tasks_per_child=2)})
    assert list(pipeline.iter(range(20))) == _expected(range(20))


@pytest.mark.parametrize("kind", ["process", "dask"])
def test_pipeflow_run_with_a_callable_that_carries_its_data(kind: str, tmp_path: Path) -> None:
    if kind == "dask":
        pytest.importorskip("distributed", reason="needs the dask extra")
    out = tmp_path / "out.jsonl"
    config = tmp_path / "big.yaml"
    config.write_text(
        "name: big\n"
        "source: {range: {start: 0, stop: 60}}\n"
        "stages:\n"
        "  - name: look_up\n"
        "    fn: fns:big_lookup\n"
        f"    kind: {kind}\n"
        "    workers: 2\n"
        "    batch: 1\n"
        f"sink: {{jsonl: {out}}}\n"
    )
    done = pipeflow("run", config, "--quiet")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == _expected(range(60))


class _InProcess(concurrent.futures.Executor):
    """An executor of the app's own make that runs calls on threads of this process."""

    def __init__(self) -> None:
        self._threads = concurrent.futures.ThreadPoolExecutor(2)
        self.calls = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._threads.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._threads.shutdown(wait, cancel_futures=cancel_futures)


def test_an_executor_of_unknown_make_gets_one_call_per_chunk() -> None:
    # it may run calls in this process, where a call without the callable is sent again
    # with it: each chunk would then cost two calls
    with _InProcess() as executor:
        stage = Stage(fns.BigLookup(), executor=executor, batch=1)
        assert list(Pipeline([stage]).iter(range(50))) == _expected(range(50))
        assert executor.calls == 50
    assert fns.cached_stage_entries() == 0, "the run left its callable in this process"
