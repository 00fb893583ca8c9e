"""Process stages run from wherever Python users run code: scripts with or without a main
guard, stdin, `-c`, the interactive interpreter and a notebook kernel; a failed run shows in
a notebook as an error; another event loop than asyncio gets a clear error."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pipeflow
from pipeflow import Pipeline, Stage

# A pipeline of two process stages: a function and a lambda defined where the code runs.
# Its top-level code appends one line to runs.txt each time it runs, so a worker that ran
# the caller's code again would show as a second line.
PROGRAM = textwrap.dedent(
    """\
    import pipeflow
    with open("runs.txt", "a") as runs:
        print("ran", file=runs)
    def square(n):
        return n * n
    stages = [pipeflow.Stage(square, kind="process", workers=2),
              pipeflow.Stage(lambda n: n + 1, kind="process")]
    print(pipeflow.Pipeline(stages).run_sync(range(6)).items_written)
    """
)


def _python(
    tmp_path: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
    )


def _check_ran_once(done: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6"], done.stderr
    assert (tmp_path / "runs.txt").read_text() == "ran\n", "a worker ran the caller's code"
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(120)
def test_a_process_stage_runs_from_a_script_without_a_main_guard(tmp_path: Path) -> None:
    (tmp_path / "no_guard.py").write_text(PROGRAM)
    _check_ran_once(_python(tmp_path, "no_guard.py"), tmp_path)


@pytest.mark.timeout(120)
def test_a_process_stage_runs_from_stdin(tmp_path: Path) -> None:
    _check_ran_once(_python(tmp_path, "-", stdin=PROGRAM), tmp_path)


@pytest.mark.timeout(120)
def test_a_process_stage_runs_from_dash_c(tmp_path: Path) -> None:
    _check_ran_once(_python(tmp_path, "-c", PROGRAM), tmp_path)


@pytest.mark.timeout(120)
def test_a_process_stage_runs_from_the_interactive_interpreter(tmp_path: Path) -> None:
    # typed line by line: a blank line ends the function's block, as at the prompt
    session = PROGRAM.replace("    return n * n\n", "    return n * n\n\n")
    session = session.replace('print("ran", file=runs)\n', 'print("ran", file=runs)\n\n')
    assert session.count("\n\n") == 2
    done = _python(tmp_path, "-i", stdin=session)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6"], done.stderr
    assert (tmp_path / "runs.txt").read_text() == "ran\n"
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.timeout(120)
def test_a_guarded_script_sends_items_of_its_own_classes_to_process_workers(
    tmp_path: Path,
) -> None:
    # what multiprocessing gives a guarded script, kept: its workers import it (under
    # another name) and find the classes it defines
    (tmp_path / "guarded.py").write_text(
        textwrap.dedent(
            """\
            import sys
            from dataclasses import dataclass
            import pipeflow

            @dataclass
            class Point:
                x: int

            def norm(point):
                return abs(point.x)

            if __name__ == "__main__":
                with open("runs.txt", "a") as runs:
                    runs.write("ran\\n")
                points = [Point(-n) for n in range(5)]
                stage = pipeflow.Stage(norm, kind="process", workers=2,
                                       start_method=sys.argv[1])
                pipeline = pipeflow.Pipeline([stage], sink=pipeflow.ListSink())
                pipeline.run_sync(points)
                print(pipeline.sink.items)
            """
        )
    )
    for method in ("forkserver", "spawn"):
        done = _python(tmp_path, "guarded.py", method)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[0, 1, 2, 3, 4]", done.stderr
    assert (tmp_path / "runs.txt").read_text() == "ran\n" * 2


@pytest.mark.timeout(120)
def test_a_guarded_script_that_fails_to_import_in_workers_gets_a_clear_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "only_main.py").write_text(
        textwrap.dedent(
            """\
            import pipeflow
            if __name__ != "__main__":
                raise RuntimeError("this module only runs as a script")
            def square(n):
                return n * n
            if __name__ == "__main__":
                pipeflow.Pipeline([pipeflow.Stage(square, kind="process")]).run_sync(range(3))
            """
        )
    )
    done = _python(tmp_path, "only_main.py")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeflow.PoolStartError: pool 'square'"), done.stderr
    assert f"imports the main module {tmp_path / 'only_main.py'}" in last
    assert "this module only runs as a script" in done.stderr  # the worker's own error


# --- notebooks ---

NOTEBOOK_CELLS = [
    "from pipeflow import Pipeline, Stage\ndef square(n):\n    return n * n",
    "pipeline = Pipeline([Stage(square, kind='process', workers=2),\n"
    "                     Stage(lambda n: n + 1, kind='process')])\n"
    "await pipeline.collect(range(6))",
    "def boom(n):\n    raise ValueError(f'bad item {n}')\n"
    "await Pipeline([Stage(boom, kind='process')]).run(range(3))",
    "[value for value in pipeline.iter(range(4))]",
]


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jupyter's own, on import
def test_a_notebook_runs_process_stages_iterates_and_shows_a_failed_run_as_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient")
    nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat")
    pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel")
    # a kernel of this very interpreter, whatever kernels the machine has
    kernel_dir = tmp_path / "jupyter" / "kernels" / "pipeflow-test"
    kernel_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "pipeflow test", "language": "python"}
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(source) for source in NOTEBOOK_CELLS]
    )
    client = nbclient.NotebookClient(
        notebook,
        timeout=120,
        kernel_name="pipeflow-test",
        allow_errors=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    defined, collected, failed, iterated = (cell.outputs for cell in notebook.cells)

    assert not [o for o in defined if o.output_type == "error"]
    assert [o.data["text/plain"] for o in collected if o.output_type == "execute_result"] == [
        "[1, 2, 5, 10, 17, 26]"
    ]
    errors = [o for o in failed if o.output_type == "error"]
    assert len(errors) == 1, failed
    error = errors[0]
    assert error.ename == "PipelineError"
    assert error.evalue == "stage 'boom', item 0 (0) failed: ValueError: bad item 0"
    shown = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error.traceback))  # no colours
    assert "bad item 0" in shown  # the cause chain, down to the worker's traceback
    assert "raise ValueError" in shown
    assert "ExceptionGroup" not in shown
    printed = "".join(o.get("text", "") for o in failed if o.output_type == "stream")
    assert "Traceback" not in printed, "the failure was printed as plain text"
    # iter() in a cell, on the kernel's own running event loop
    assert [o.data["text/plain"] for o in iterated if o.output_type == "execute_result"] == [
        "[1, 2, 5, 10]"
    ], iterated


def _contexts(error: BaseException) -> list[BaseException]:
    chain = []
    context = error.__context__
    while context is not None:
        chain.append(context)
        context = context.__context__
    return chain


def _boom(n: int) -> int:
    raise ValueError(f"bad item {n}")


@pytest.mark.anyio
async def test_a_failed_run_has_no_exception_group_in_its_context() -> None:
    # what IPython checks before it shows an error as a notebook error
    with pytest.raises(pipeflow.PipelineError) as raised:
        await Pipeline([Stage(_boom, kind="thread")]).run(range(3))
    assert isinstance(raised.value.__cause__, ValueError)
    assert not any(isinstance(c, BaseExceptionGroup) for c in _contexts(raised.value))

    with pytest.raises(pipeflow.PipelineError) as raised:
        async with Pipeline([Stage(_boom, kind="thread")]).stream(range(3)) as results:
            async for _ in results:
                pass
    assert isinstance(raised.value.__cause__, ValueError)
    assert not any(isinstance(c, BaseExceptionGroup) for c in _contexts(raised.value))


# --- event loops ---


_NO_TRIO = importlib.util.find_spec("trio") is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    "anyio_backend", [pytest.param("trio", marks=pytest.mark.skipif(_NO_TRIO, reason="no trio"))]
)
async def test_under_trio_a_run_says_pipeflow_runs_on_asyncio(anyio_backend: str) -> None:
    pipeline = Pipeline([Stage(abs, kind="thread")])
    with pytest.raises(pipeflow.PipeflowError, match="pipeflow runs on asyncio only"):
        await pipeline.run(range(3))
    with pytest.raises(pipeflow.PipeflowError, match="pipeflow runs on asyncio only"):
        await pipeline.collect(range(3))
    with pytest.raises(pipeflow.PipeflowError, match="pipeflow runs on asyncio only"):
        async with pipeline.stream(range(3)):
            pass
