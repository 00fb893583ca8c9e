"""Stages on a Dask cluster (kind: dask): a real LocalCluster on 127.0.0.1, no mocks.

Each test compares a dask stage with the same stage on a process pool, or checks what a
user of a cluster would notice: nothing lost when a worker dies, nothing left running.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import fns
import pipeflow
from conftest import worker_processes
from pipeflow import Pipeline, Pool, Retry, Stage

distributed = pytest.importorskip(
    "distributed", reason="the dask extra is not installed (pip install 'pipeflow[dask]')"
)
import dask  # noqa: E402 - installed with distributed

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
COUNTERS = ("items_in", "items_out", "errors", "retries", "skipped", "dead_lettered", "failed")


def counters(report: pipeflow.RunReport) -> dict[str, int]:
    stage = report.stages[0]
    return {name: getattr(stage, name) for name in COUNTERS}


async def run_on(
    kind: str, fn: Any, source: Any, tmp_path: Path | None = None, **options: Any
) -> tuple[list[Any], pipeflow.RunReport, list[dict[str, Any]]]:
    """Run one stage of `kind` over `source`: its outputs, report and dead-letter records."""
    sink = pipeflow.ListSink()
    dead_path = (tmp_path or Path()) / f"dead-{kind}.jsonl"
    dead = pipeflow.JsonlSink(dead_path) if options.get("on_error") == "dead_letter" else None
    pipeline = Pipeline(
        [Stage(fn, name="work", kind=kind, workers=2, **options)],  # type: ignore[arg-type]
        sink=sink,
        dead_letter=dead,
    )
    with anyio.fail_after(45):
        report = await pipeline.run(source)
    records = [json.loads(line) for line in dead_path.read_text().splitlines()] if dead else []
    return sink.items, report, records


async def test_squares_match_a_process_stage() -> None:
    dask_out, report, _ = await run_on("dask", fns.square, range(1, 11))
    process_out, _, _ = await run_on("process", fns.square, range(1, 11))
    assert dask_out == process_out == [n * n for n in range(1, 11)]
    stage = report.stages[0]
    assert (stage.kind, stage.workers, stage.items_in, stage.items_out) == ("dask", 2, 10, 10)


async def test_a_100000_item_pipeline_matches_a_process_stage() -> None:
    source = range(100_000)
    dask_out, report, _ = await run_on("dask", fns.square, source)
    process_out, _, _ = await run_on("process", fns.square, source)
    assert dask_out == process_out
    assert len(dask_out) == 100_000
    stage = report.stages[0]
    assert stage.calls > 1, "work goes to the cluster in chunks, not in one call"
    assert len(stage.by_worker) == 2 and all(w.startswith("pid ") for w in stage.by_worker)


@pytest.mark.parametrize("policy", ["skip", "dead_letter", "retry"])
async def test_a_failing_item_is_settled_as_on_a_process_stage(policy: str, tmp_path: Path) -> None:
    options: dict[str, Any] = {"on_error": policy}
    if policy == "retry":
        options = {"on_error": "skip", "retries": Retry(attempts=3, backoff=0.001)}
    results = {
        kind: await run_on(kind, fns.fail_on_3, range(10), tmp_path, **options)
        for kind in ("dask", "process")
    }
    (dask_out, dask_report, dask_dead), (process_out, process_report, process_dead) = (
        results["dask"],
        results["process"],
    )
    assert dask_out == process_out == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert counters(dask_report) == counters(process_report)
    assert counters(dask_report)["retries"] == (2 if policy == "retry" else 0)
    drop = {"traceback"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in dask_dead] == [
        {k: v for k, v in r.items() if k not in drop} for r in process_dead
    ]
    if policy == "dead_letter":
        assert len(dask_dead) == 1 and "in fail_on_3" in dask_dead[0]["traceback"]


async def test_fail_names_the_item_with_the_remote_traceback_as_a_process_stage() -> None:
    errors = {}
    for kind in ("dask", "process"):
        with pytest.raises(pipeflow.PipelineError) as caught:
            await run_on(kind, fns.fail_on_3, range(10))
        errors[kind] = caught.value
    error = errors["dask"]
    assert str(error) == str(errors["process"])
    assert (error.stage, error.index, error.error_type) == ("work", 3, "ZeroDivisionError")
    assert isinstance(error.__cause__, ZeroDivisionError)
    remote = error.__cause__.__cause__
    assert isinstance(remote, pipeflow.RemoteTraceback) and "in fail_on_3" in remote.tb
    assert error.report.stages[0].failed == 1  # type: ignore[attr-defined]


@pytest.mark.timeout(150)
async def test_killing_a_dask_worker_mid_run_loses_no_item() -> None:
    total = 3000
    control = pipeflow.RunControl()
    killed: list[int] = []

    def kill_one_worker(report: pipeflow.RunReport) -> None:
        done = report.stages[0].items_out
        if not killed and 0 < done < total // 2:
            pid = control.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    sink = pipeflow.ListSink()
    pipeline = Pipeline([Stage(fns.slow_identity, kind="dask", workers=2)], sink=sink)
    with anyio.fail_after(120):  # a new cluster on a loaded machine takes seconds
        report = await pipeline.run(range(total), progress=kill_one_worker, control=control)
    assert killed, "the run ended before a worker could be killed"
    assert sink.items == list(range(total))
    stage = report.stages[0]
    assert stage.items_in == stage.items_out == total and stage.errors == 0


@pytest.fixture
def no_task_retries() -> Iterator[None]:
    """A task whose worker dies fails at once (KilledWorker), instead of running elsewhere."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        yield


@pytest.mark.usefixtures("no_task_retries")
async def test_an_item_that_keeps_killing_its_dask_worker_is_a_worker_crash() -> None:
    out, report, _ = await run_on("dask", fns.sigkill_self_on_13, range(40), on_error="skip")
    assert out == [n for n in range(40) if n != 13]
    stage = report.stages[0]
    assert (stage.items_out, stage.skipped, stage.crashed) == (39, 1, 1)


async def test_a_hung_item_times_out_and_the_others_complete() -> None:
    out, report, _ = await run_on(
        "dask", fns.hang_briefly_on_5, range(10), timeout=1.5, on_error="skip"
    )
    assert out == [n for n in range(10) if n != 5]
    assert report.stages[0].timed_out == 1


async def test_leaving_a_stream_early_releases_the_tasks_of_an_existing_cluster() -> None:
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as own_client,
    ):
        pool = Pool(kind="dask", workers=2, address=cluster.scheduler_address)
        pipeline = Pipeline(
            [Stage(fns.slow_identity, executor="shared")], executors={"shared": pool}
        )
        seen = []
        with anyio.fail_after(30):
            async with pipeline.stream(range(100_000)) as results:
                async for value in results:
                    seen.append(value)
                    if len(seen) == 50:
                        break
        assert seen == list(range(50))

        def tasks_on(dask_scheduler: Any) -> int:
            return len(dask_scheduler.tasks)

        with anyio.fail_after(10):
            # the scheduler forgets the tasks when it handles the client's departure
            while await anyio.to_thread.run_sync(own_client.run_on_scheduler, tasks_on):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        # the run closed its client only: the cluster it was lent still works
        assert own_client.submit(fns.square, 7).result(timeout=10) == 49
        assert len(own_client.scheduler_info()["workers"]) == 1
        # and its workers will exit as they would have (the quick exit is for workers
        # the run started and ends)
        assert not any(own_client.run(_quick_exit_armed).values())


def _quick_exit_armed() -> bool:
    from pipeflow import _dask

    return _dask._quick_exit_armed


def test_a_dask_pool_without_the_extra_asks_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    # refused where the stage is declared, before anything starts
    with pytest.raises(pipeflow.ConfigError, match=r"pip install 'pipeflow\[dask\]'"):
        Stage(fns.square, kind="dask")
    assert not worker_processes()


def test_dask_options_are_checked() -> None:
    with pytest.raises(pipeflow.ConfigError, match="address"):
        Pool(kind="dask", address="somewhere")
    with pytest.raises(pipeflow.ConfigError, match="kind: dask"):
        Pool(kind="process", address="tcp://127.0.0.1:8786")
    with pytest.raises(pipeflow.ConfigError, match="threads_per_worker"):
        Pool(kind="dask", threads_per_worker=0)
    with pytest.raises(pipeflow.ConfigError, match="dashboard"):
        Pool(kind="dask", address="tcp://127.0.0.1:8786", dashboard=True)


async def test_the_squares_dask_config_matches_its_process_twin() -> None:
    root = ROOT
    outputs = {}
    for kind in ("dask", "process"):
        pipeline = pipeflow.load(
            root / "configs" / "squares_dask.yaml",
            overrides={"stages.square.kind": kind},
            app_dir=root,
        )
        sink = pipeflow.ListSink()
        pipeline.sink = sink
        with anyio.fail_after(45):
            report = await pipeline.run()
        assert report.stages[0].kind == kind
        outputs[kind] = sink.items
    assert outputs["dask"] == outputs["process"] == [n * n for n in range(1, 11)]


def test_bench_compares_process_and_dask_points() -> None:
    import subprocess

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeflow",
            "bench",
            "configs/squares_dask.yaml",
            "--matrix",
            "stages.square.kind=process,dask",
            "--repeat",
            "1",
            "--warmup",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "kind=process" in done.stdout and "kind=dask" in done.stdout
    assert "Best:" in done.stdout and "differ" not in done.stdout


async def test_a_local_cluster_with_tls_runs_the_stage_over_tls() -> None:
    pytest.importorskip("cryptography", reason="TLS credentials need the cryptography package")
    addresses: list[str] = []
    control = pipeflow.RunControl()

    def progress(report: pipeflow.RunReport) -> None:
        for pool in control._runner.pools.values():  # type: ignore[union-attr]
            addresses.append(pool.executor.client.scheduler.address)

    pipeline = pipeflow.load(ROOT / "configs" / "squares_dask_tls.yaml", app_dir=ROOT)
    pipeline.sink = pipeflow.ListSink()
    await pipeline.run(progress=progress, control=control)
    assert pipeline.sink.items == [n * n for n in range(1, 11)]
    assert addresses and all(address.startswith("tls://") for address in addresses)
    assert not worker_processes()


async def test_the_workers_of_a_cluster_the_run_started_tear_down_before_they_exit(
    tmp_path: Path,
) -> None:
    # they end without the interpreter's teardown, but after the stages' teardowns
    log = tmp_path / "lifecycle.log"
    stage = Stage(
        fns.add_one_with_state,
        kind="dask",
        workers=2,
        batch=1,
        setup=functools.partial(fns.open_counted, str(log)),
        teardown=functools.partial(fns.close_counted, str(log)),
    )
    with anyio.fail_after(60):
        assert await Pipeline([stage]).collect(range(40)) == list(range(1, 41))
    lines = log.read_text().splitlines()
    setups = sorted(line.split()[1] for line in lines if line.startswith("setup "))
    teardowns = sorted(line.split()[1] for line in lines if line.startswith("teardown "))
    assert setups and teardowns == setups
    assert not worker_processes()
