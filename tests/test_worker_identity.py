"""Worker identity: a `setup` that takes an argument learns its worker's index and stage."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import multiprocessing
import tempfile
from pathlib import Path
from typing import Any

import pytest

import fns
from conftest import worker_processes
from pipeflow import Pipeline, Pool, Stage, WorkerInfo
from test_cli import pipeflow


def _stage(**kwargs: Any) -> Stage:
    return Stage(fns.tag_with_worker_info, batch=1, setup=fns.setup_with_worker_info, **kwargs)


def _index_of_each_worker(rows: list[Any]) -> dict[Any, set[int]]:
    """The indexes each worker (process and thread) reported."""
    by_worker: dict[Any, set[int]] = collections.defaultdict(set)
    for _, index, _, _, _, worker in rows:
        by_worker[tuple(worker)].add(index)
    return by_worker


def _index_files() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("pipeflow-workers-*"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["thread", "process", "dask"])
def test_each_worker_gets_its_own_index_and_the_stage_name(kind: str) -> None:
    if kind == "dask":
        pytest.importorskip("distributed", reason="needs the dask extra")
    tables = _index_files()
    pipeline = Pipeline([_stage(name="tag", kind=kind, workers=3)])  # type: ignore[arg-type]
    rows = list(pipeline.iter(range(60)))
    assert [row[0] for row in rows] == list(range(60))
    assert {row[2:5] for row in rows} == {("tag", 3, kind)}
    by_worker = _index_of_each_worker(rows)
    assert all(len(indexes) == 1 for indexes in by_worker.values()), by_worker
    indexes = [next(iter(i)) for i in by_worker.values()]
    assert len(set(indexes)) == len(indexes), "two workers share an index"
    assert set(indexes) <= {0, 1, 2}
    assert _index_files() == tables, "the run left its index table behind"


def test_a_recycled_worker_hands_its_index_to_its_replacement() -> None:
    pipeline = Pipeline(
        [_stage(executor="cpu")],
        executors={"cpu": Pool("process", workers=2, max_tasks_per_child=2)},
    )
    rows = list(pipeline.iter(range(24)))
    by_worker = _index_of_each_worker(rows)
    assert len(by_worker) >= 6, "the workers were not recycled"
    assert all(len(indexes) == 1 for indexes in by_worker.values()), by_worker
    assert set().union(*by_worker.values()) <= {0, 1}


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_lent_pool_gives_indexes_per_run_and_keeps_none_of_them(kind: str) -> None:
    if kind == "thread":
        lent: concurrent.futures.Executor = concurrent.futures.ThreadPoolExecutor(2)
    else:
        context = multiprocessing.get_context("forkserver")
        lent = concurrent.futures.ProcessPoolExecutor(2, mp_context=context)
    try:
        for _ in range(3):
            rows = list(Pipeline([_stage(executor=lent)]).iter(range(20)))
            by_worker = _index_of_each_worker(rows)
            assert all(len(indexes) == 1 for indexes in by_worker.values()), by_worker
            indexes = [next(iter(i)) for i in by_worker.values()]
            assert len(set(indexes)) == len(indexes)
            assert set(indexes) <= {0, 1}
            assert {row[3:5] for row in rows} == {(2, kind)}
        left = [lent.submit(fns.cached_stage_entries).result(timeout=30) for _ in range(4)]
        held = [lent.submit(fns.identity_claims_held).result(timeout=30) for _ in range(4)]
        assert left == [0, 0, 0, 0] and held == [0, 0, 0, 0]
    finally:
        lent.shutdown()
    assert not worker_processes()


def test_an_async_stage_sets_up_once_as_worker_0() -> None:
    stage = Stage(fns.async_tag_with_worker_info, workers=4, setup=fns.async_setup_with_worker_info)
    rows = list(Pipeline([stage]).iter(range(10)))
    assert {row[1:5] for row in rows} == {(0, "async_tag_with_worker_info", 4, "async")}


def _setup_results(setup: Any) -> list[Any]:
    stage = Stage(lambda n, state: (n, state), kind="thread", setup=setup)
    return [state for _, state in Pipeline([stage]).iter(range(3))]


def test_a_setup_that_can_be_called_without_arguments_is_called_without_any() -> None:
    def plain() -> str:
        return "plain"

    def optional(size: int = 10) -> int:
        return size

    def variadic(*args: Any) -> tuple[Any, ...]:
        return args

    assert _setup_results(plain) == ["plain"] * 3
    assert _setup_results(optional) == [10] * 3
    assert _setup_results(variadic) == [()] * 3


def test_a_setup_with_one_required_parameter_gets_worker_info() -> None:
    def needs_one(worker: WorkerInfo, size: int = 10) -> Any:
        return worker

    infos = _setup_results(needs_one)
    assert infos == [WorkerInfo(0, "<lambda>", 1, "thread")] * 3


def test_pipeflow_run_passes_worker_info_to_a_yaml_setup(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    config = tmp_path / "identity.yaml"
    config.write_text(
        "name: identity\n"
        "source: {range: {start: 0, stop: 40}}\n"
        "stages:\n"
        "  - name: tag\n"
        "    fn: fns:tag_with_worker_info\n"
        "    setup: fns:setup_with_worker_info\n"
        "    kind: process\n"
        "    workers: 2\n"
        "    batch: 1\n"
        f"sink: {{jsonl: {out}}}\n"
    )
    done = pipeflow("run", config, "--quiet")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row[0] for row in rows) == list(range(40))
    assert {tuple(row[2:5]) for row in rows} == {("tag", 2, "process")}
    by_worker = _index_of_each_worker(rows)
    assert all(len(indexes) == 1 for indexes in by_worker.values()), by_worker
    indexes = [next(iter(i)) for i in by_worker.values()]
    assert sorted(indexes) == list(range(len(indexes))) and set(indexes) <= {0, 1}


def test_worker_info_counts_the_pools_workers_under_workers_auto() -> None:
    # workers: auto starts below its bound and may raise it: a setup that shards by
    # index / workers must see the bound, which every index stays under
    stage = _stage(name="tag", kind="thread", workers={"min": 1, "max": 8})  # type: ignore[arg-type]
    pipeline = Pipeline([stage])
    rows = list(pipeline.iter(range(40)))
    assert {row[3] for row in rows} == {8}
    assert all(0 <= row[1] < 8 for row in rows)
