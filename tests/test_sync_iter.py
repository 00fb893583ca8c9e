"""`Pipeline.iter()`: results from synchronous code, with stream()'s backpressure and ends."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import fns
from conftest import worker_processes
from pipeflow import Pipeline, PipelineError, Stage
from test_cli import child_env


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


class _Source:
    """An endless source that says how far it was pulled and whether it was closed."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.pulled = 0
        self.closed = threading.Event()
        self.reached = threading.Event()
        self.stop_at = stop_at

    def __call__(self) -> Iterator[int]:
        try:
            for n in itertools.count():
                self.pulled = n + 1
                if self.stop_at is not None and n == self.stop_at:
                    self.reached.set()
                yield n
        finally:
            self.closed.set()


def test_iter_gives_every_result_in_order_and_leaves_nothing_running() -> None:
    before = _threads()
    pipeline = Pipeline([Stage(fns.square, kind="process", workers=2)])
    assert list(pipeline.iter(range(50))) == [n * n for n in range(50)]
    assert _threads() == before
    assert not worker_processes()


def _leave(pipeline: Pipeline, source: _Source, how: str) -> list[int]:
    seen: list[int] = []
    if how == "break":
        for value in pipeline.iter(source()):
            seen.append(value)
            if len(seen) == 5:
                break
    elif how == "close":
        results = pipeline.iter(source())
        seen.extend(itertools.islice(results, 5))
        results.close()
    elif how == "with":
        with pipeline.iter(source()) as results:
            seen.extend(itertools.islice(results, 5))
    elif how == "exception":
        with pytest.raises(KeyError):
            for value in pipeline.iter(source()):
                seen.append(value)
                if len(seen) == 5:
                    raise KeyError("the loop body failed")
    else:  # dropped: the garbage collector closes it
        results = pipeline.iter(source())
        seen.extend(itertools.islice(results, 5))
        del results
    return seen


@pytest.mark.parametrize("how", ["break", "close", "with", "exception", "dropped"])
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_leaving_early_ends_the_run_and_its_pools_before_going_on(kind: str, how: str) -> None:
    before = _threads()
    source = _Source()
    pipeline = Pipeline([Stage(fns.square, kind=kind, workers=2)])  # type: ignore[arg-type]
    seen = _leave(pipeline, source, how)
    assert seen == [n * n for n in range(5)]
    # checked at once: the run ended before control came back
    assert source.closed.is_set()
    assert not worker_processes()
    assert _threads() == before


def test_a_failed_run_raises_pipeline_error_in_the_callers_thread() -> None:
    before = _threads()
    pipeline = Pipeline([Stage(fns.fail_on_3, kind="process", workers=2)])
    raised_in: list[threading.Thread] = []
    with pytest.raises(PipelineError, match="stage 'fail_on_3', item 3") as raised:
        try:
            for _ in pipeline.iter(range(10)):
                pass
        except PipelineError:
            raised_in.append(threading.current_thread())
            raise
    assert raised_in == [threading.main_thread()]
    assert isinstance(raised.value.__cause__, ZeroDivisionError)
    assert _threads() == before
    assert not worker_processes()


def test_a_reader_that_does_not_read_holds_the_source_back() -> None:
    # an unbounded run would pull 100,000 items in far less than the wait below
    source = _Source(stop_at=100_000)
    pipeline = Pipeline([Stage(fns.square, kind="thread", workers=2, queue_size=2)])
    with pipeline.iter(source()) as results:
        assert next(results) == 0
        assert not source.reached.wait(3.0), f"the source was pulled {source.pulled} times"
        assert next(results) == 1


def test_a_stopped_run_gives_what_it_took_from_the_source_then_ends() -> None:
    source = _Source()
    seen = []
    results = Pipeline([Stage(fns.square, kind="thread")]).iter(source())
    for value in results:
        seen.append(value)
        if len(seen) == 3:
            results.stop()
    assert seen == [n * n for n in range(len(seen))]
    assert len(seen) >= 3


def test_iter_is_refused_inside_an_event_loop_with_a_pointer_to_stream() -> None:
    async def main() -> None:
        Pipeline([Stage(fns.square, kind="thread")]).iter(range(3))

    with pytest.raises(RuntimeError, match=r"inside an event loop.*pipeline\.stream"):
        asyncio.run(main())


LEFT_OPEN = """
import functools, sys
import fns
from pipeflow import Pipeline, Stage

log = sys.argv[1]
stage = Stage(
    fns.add_one_with_state,
    kind="process",
    workers=2,
    setup=functools.partial(fns.open_counted, log),
    teardown=functools.partial(fns.close_counted, log),
)
results = Pipeline([stage]).iter(range(10**9))
print(next(results), flush=True)
"""


def test_a_script_that_leaves_its_iterator_open_ends_its_run_cleanly_at_exit(
    tmp_path: Path,
) -> None:
    log = tmp_path / "lifecycle.log"
    done = subprocess.run(
        [sys.executable, "-c", LEFT_OPEN, str(log)],
        cwd=Path(fns.__file__).parent,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]
    events = log.read_text().split("\n")
    setups = sorted(line.split()[1] for line in events if line.startswith("setup"))
    teardowns = sorted(line.split()[1] for line in events if line.startswith("teardown"))
    # the run was ended as the interpreter exited, not its workers killed with it
    assert setups and teardowns == setups
    assert not any(psutil.pid_exists(int(pid)) for pid in setups)
