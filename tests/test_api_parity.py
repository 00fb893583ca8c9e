"""The Python API and YAML accept and refuse the same things, with the same words."""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import pipeflow
from config_fns import async_double
from pipeflow import _stage
from test_cli import ROOT, child_env

TESTS = Path(__file__).parent


async def double_async(n: int) -> int:
    await asyncio.sleep(0)
    return n * 2


def double(n: int) -> int:
    return n * 2


def refusal(**kwargs: object) -> str:
    with pytest.raises(pipeflow.ConfigError) as caught:
        pipeflow.Stage(**kwargs)  # type: ignore[arg-type]
    (problem,) = caught.value.problems
    return problem


def config_refusal(tmp_path: Path, stage: str, executors: str = "") -> str:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"source: {{items: [1, 2]}}\n{executors}stages:\n  - {stage}\nsink: {{null: {{}}}}\n"
    )
    with pytest.raises(pipeflow.ConfigError) as caught:
        pipeflow.load(path, app_dir=TESTS)
    (problem,) = caught.value.problems
    return problem


@pytest.mark.anyio
async def test_an_async_def_stage_is_async_without_saying_so() -> None:
    stage = pipeflow.Stage(double_async)
    assert stage.kind == "async"
    assert await pipeflow.Pipeline([stage]).collect(range(4)) == [0, 2, 4, 6]
    assert pipeflow.Stage(double).kind == "thread"


def test_an_async_def_in_a_pool_is_refused_in_python_and_yaml(tmp_path: Path) -> None:
    problem = refusal(fn=async_double, kind="thread")
    assert problem.startswith("stage 'async_double': async_double is a coroutine function")
    in_yaml = config_refusal(tmp_path, "{fn: 'config_fns:async_double', kind: thread}")
    assert in_yaml.endswith(": stages.async_double.kind: " + problem.partition(": ")[2])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert "is a coroutine function" in refusal(fn=double_async, executor=pool)


@pytest.mark.parametrize("kind", ["process", "thread", "async"])
def test_kind_and_executor_together_are_refused_in_python_and_yaml(
    kind: str, tmp_path: Path
) -> None:
    fn, ref = (double_async, "async_double") if kind == "async" else (double, "square")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        problem = refusal(fn=fn, name="double", kind=kind, executor=pool)
    assert problem.startswith("stage 'double': give kind or executor, not both")
    assert refusal(fn=fn, name="double", kind=kind, executor="io") == problem
    in_yaml = config_refusal(
        tmp_path,
        f"{{fn: 'config_fns:{ref}', name: double, kind: {kind}, executor: io}}",
        "executors: {io: {kind: thread}}\n",
    )
    assert in_yaml.endswith(": stages.double: " + problem.partition(": ")[2])


@pytest.mark.anyio
async def test_a_lent_executor_alone_runs_the_stage() -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stage = pipeflow.Stage(double, executor=pool)
        assert await pipeflow.Pipeline([stage]).collect(range(3)) == [0, 2, 4]


def test_the_vocabulary_is_declared_once() -> None:
    assert _stage.KINDS == typing.get_args(_stage.Kind) == ("async", *_stage.POOL_KINDS, "auto")
    stage_schema = pipeflow.schema()["$defs"]["StageSpec"]["properties"]
    choices = {key: stage_schema[key]["anyOf"][0]["enum"] for key in ("op", "on_error")}
    assert choices == {"op": list(_stage.OPS), "on_error": list(_stage.ON_ERROR)}


@pytest.mark.parametrize(
    ("key", "value"), [("kind", "thred"), ("op", "mapp"), ("on_error", "skipp")]
)
def test_an_unknown_choice_is_refused_in_python_and_yaml(
    key: str, value: str, tmp_path: Path
) -> None:
    problem = refusal(fn=double, **{key: value})
    in_yaml = config_refusal(tmp_path, f"{{fn: 'config_fns:square', {key}: {value}}}")
    for choice in typing.get_args(
        {"kind": _stage.Kind, "op": _stage.Op, "on_error": _stage.OnError}[key]
    ):
        assert repr(choice) in in_yaml or choice in in_yaml
        assert choice in problem


# --- a missing extra ---

# Runs the command as if the dask extra were not installed.
WITHOUT_DASK = (
    "import sys; sys.modules['distributed'] = None; "
    "from pipeflow._cli import main; sys.argv[0] = 'pipeflow'; main()"
)
INSTALL = "pip install 'pipeflow[dask]'"


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_dask_config_without_the_extra_exits_2_saying_what_to_install(command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_DASK, command, "configs/squares_dask.yaml"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("configs/squares_dask.yaml:15:11: stages.square.kind: ")
    assert line.endswith(INSTALL)
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_dask_pool_without_the_extra_is_refused_in_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(pipeflow.ConfigError, match=r"pip install 'pipeflow\[dask\]'"):
        pipeflow.Pool(kind="dask")
    assert refusal(fn=double, kind="dask").endswith(INSTALL)
