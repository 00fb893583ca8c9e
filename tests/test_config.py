"""Loading configs in-process: what `pipeflow.load()` builds, and how it reports problems."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import config_fns
import pipeflow
from pipeflow._config.spec import parse_duration
from pipeflow._stage import max_processes

TESTS = Path(__file__).parent
ROOT = TESTS.parent
BROKEN = TESTS / "broken_configs"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """load() puts its app dir first on sys.path; keep that from leaking between tests."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(TESTS)
    yield


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path | str, **kwargs: Any) -> list[str]:
    with pytest.raises(pipeflow.ConfigError) as caught:
        pipeflow.load(path, app_dir=TESTS, **kwargs)
    return caught.value.problems


MINIMAL = """\
source:
  range: {{start: 1, stop: 5}}
stages:
  - name: square
    fn: config_fns:square
{extra}sink:
  stdout: {{}}
"""


def minimal(tmp_path: Path, extra: str = "") -> Path:
    return write(tmp_path, MINIMAL.format(extra=extra))


# --- the example and the basics ---


@pytest.mark.anyio
async def test_squares_example_builds_a_process_pipeline_that_squares() -> None:
    pipeline = pipeflow.load(ROOT / "configs" / "squares.yaml", app_dir=ROOT)
    [row] = pipeline.describe()
    assert (row["name"], row["kind"], row["workers"]) == ("square", "process", 4)
    assert isinstance(pipeline.sink, pipeflow.StdoutSink)
    assert await pipeline.collect() == [n * n for n in range(1, 11)]


def test_the_pipeline_is_named_after_the_file_unless_named(tmp_path: Path) -> None:
    assert pipeflow.load(minimal(tmp_path), app_dir=TESTS).name == "config"
    named = write(tmp_path, "name: mine\n" + MINIMAL.format(extra=""), "other.yaml")
    assert pipeflow.load(named, app_dir=TESTS).name == "mine"


def test_kind_defaults_to_async_for_a_coroutine_function_else_thread(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "source: {items: [1]}\nstages:\n  - fn: config_fns:async_double\n"
        "  - fn: config_fns:double\nsink: {null: {}}\n",
    )
    rows = pipeflow.load(path, app_dir=TESTS).describe()
    kinds = [(r["name"], r["kind"]) for r in rows]
    assert kinds == [("async_double", "async"), ("double", "thread")]


def test_stage_keys_reach_the_stage(tmp_path: Path) -> None:
    extra = (
        "    kind: thread\n    workers: 3\n    op: map\n    ordered: false\n    batch: 16\n"
        "    queue_size: 2\n    timeout: 250ms\n    on_error: skip\n"
        "    retries: {attempts: 4, backoff: 1m, jitter: false, retry_on: [ValueError, "
        "builtins:KeyError]}\n"
    )
    [stage] = pipeflow.load(minimal(tmp_path, extra), app_dir=TESTS).stages
    assert (stage.workers, stage.ordered, stage.batch, stage.queue_size) == (3, False, 16, 2)
    assert stage.timeout == 0.25
    assert stage.on_error == "skip"
    assert stage.retry == pipeflow.Retry(
        attempts=4, backoff=60.0, jitter=False, retry_on=(ValueError, KeyError)
    )


def test_named_executors_are_shared_pools(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "executors:\n  cpu: {kind: process, workers: 3}\nsource: {items: [1]}\nstages:\n"
        "  - {name: a, fn: config_fns:square, executor: cpu}\n"
        "  - {name: b, fn: config_fns:double, executor: cpu}\nsink: {null: {}}\n",
    )
    pipeline = pipeflow.load(path, app_dir=TESTS)
    assert pipeline.executors == {"cpu": pipeflow.Pool("process", 3)}
    assert [(r["kind"], r["workers"], r["executor"]) for r in pipeline.describe()] == [
        ("process", 3, "cpu"),
        ("process", 3, "cpu"),
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("1m", 60.0), (2, 2.0), (0.5, 0.5), ("1.5s", 1.5), ("3", 3.0)],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5 seconds", "fast", "1h", "", "-1s", True])
def test_bad_durations_are_refused(text: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# --- interpolation ---


def test_environment_variables_are_interpolated_with_their_yaml_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PF_WORKERS", "6")
    monkeypatch.delenv("PF_UNSET", raising=False)
    path = write(
        tmp_path,
        'name: "${PF_UNSET:-007}"\nsource: {range: {stop: "${PF_UNSET:-3}"}}\nstages:\n'
        "  - fn: config_fns:square\n    workers: ${PF_WORKERS}\n    queue_size: ${PF_UNSET:-5}\n"
        "sink: {jsonl: '$${literal}.jsonl'}\n",
    )
    pipeline = pipeflow.load(path, app_dir=TESTS)
    assert pipeline.name == "007"  # quoted: stays a string
    [stage] = pipeline.stages
    assert (stage.workers, stage.queue_size) == (6, 5)
    assert pipeline.source == range(0, 3)
    assert isinstance(pipeline.sink, pipeflow.JsonlSink)
    assert pipeline.sink.path == TESTS / "${literal}.jsonl"


def test_a_missing_variable_is_named_with_its_position(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PF_UNSET", raising=False)
    path = minimal(tmp_path, "    workers: ${PF_UNSET}\n")
    assert problems_of(path) == [
        f"{path}:6:14: stages.square.workers: environment variable 'PF_UNSET' is not set "
        "(write ${PF_UNSET:-default} to give a default)"
    ]


# --- overrides ---


def test_overrides_address_stages_by_name_and_parse_values_as_yaml(tmp_path: Path) -> None:
    pipeline = pipeflow.load(
        minimal(tmp_path),
        overrides={
            "stages.square.workers": "8",
            "stages.square.timeout": "5s",
            "source.range.stop": 3,
            "stages.square.retries": "{attempts: 2}",
        },
        app_dir=TESTS,
    )
    [stage] = pipeline.stages
    assert (stage.workers, stage.timeout) == (8, 5.0)
    assert stage.retry is not None and stage.retry.attempts == 2
    assert pipeline.source == range(1, 3)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "stages.sqare.workers",
            "2",
            "stages.sqare: no stage named 'sqare' (stages: square), did you mean 'square'?",
        ),
        (
            "stages.square.wrokers",
            "2",
            "stages.square.wrokers: unknown key 'wrokers', did you mean 'workers'?",
        ),
        (
            "stages.square.workers",
            "many",
            "stages.square.workers: expected an int, auto or {min: 1, max: 64}, got 'many'",
        ),
        ("source.items.x", "1", "source.items: no such key in the config"),
        ("source.range.stop.x", "1", "source.range.stop: is an int, not a mapping"),
        ("stages..workers", "1", "not a path"),
    ],
)
def test_override_problems_name_the_override(
    tmp_path: Path, key: str, value: str, message: str
) -> None:
    [problem] = problems_of(minimal(tmp_path), overrides={key: value})
    assert problem.startswith(f"--set {key}={value}: ")
    assert message in problem


# --- problems ---

LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<where>[^:]+): (?P<what>.+)$")

BROKEN_EXPECTED = {
    "yaml_syntax.yaml": [(3, 7, "yaml", "expected ',' or '}'")],
    "unknown_key.yaml": [(7, 5, "stages.square.wrokers", "did you mean 'workers'?")],
    "wrong_type.yaml": [
        (2, 27, "source.range.stop", "expected an int, got 'ten'"),
        (7, 14, "stages.square.workers", "expected an int, auto or {min: 1, max: 64}, got 'many'"),
        (8, 14, "stages.square.ordered", "expected true or false, got a list"),
    ],
    "missing_fn.yaml": [
        (5, 9, "stages.square.fn", "has no attribute 'sqaure', did you mean 'square'?"),
        (8, 9, "stages.cube.fn", "no module named 'no_such_module'"),
    ],
    "bad_duration.yaml": [
        (7, 14, "stages.square.timeout", "bad duration '5 seconds'"),
        (8, 37, "stages.square.retries.backoff", "bad duration 'fast'"),
    ],
    "missing_env.yaml": [
        (2, 27, "source.range.stop", "'PIPEFLOW_TEST_UNSET_STOP' is not set"),
        (7, 14, "stages.square.workers", "'PIPEFLOW_TEST_UNSET_WORKERS' is not set"),
    ],
    "unknown_executor.yaml": [
        (
            8,
            15,
            "stages.square.executor",
            "unknown executor 'cpus' (executors: cpu), did you mean 'cpu'?",
        ),
    ],
    "duplicate_stage.yaml": [(7, 11, "stages.step.name", "duplicate stage name 'step'")],
    "dead_letter_without_sink.yaml": [
        (7, 15, "stages.square.on_error", "no dead_letter sink"),
    ],
    "unpicklable_process_fn.yaml": [
        (
            5,
            9,
            "stages.locked.fn",
            "must pickle, and config_fns:unpicklable does not "
            "(TypeError: cannot pickle '_thread.lock' object)",
        ),
    ],
}


BROKEN_EXPECTED.update(
    {
        "alias_bomb.yaml": [(10, 12, "yaml", "aliases expand to more than 10000 values")],
        "deep_nesting.yaml": [(2, 108, "yaml", "nested more than 100 levels deep")],
        "range_step_zero.yaml": [(2, 37, "source.range.step", "step must not be 0")],
        "too_many_workers.yaml": [
            (2, 33, "executors.cpu.workers", f"workers must be at most {max_processes()} for"),
            (7, 14, "stages.square.workers", f"workers must be at most {max_processes()} for"),
            (8, 17, "stages.square.queue_size", "queue_size must be an int from 1 to 1024"),
            (9, 12, "stages.square.batch", "batch must be 'auto' or an int from 1 to 100000"),
        ],
        "unwritable_sinks.yaml": [
            (6, 10, "sink.jsonl", "broken_configs' is a directory; give a file path"),
            (8, 17, "dead_letter.jsonl.path", "no file can be made in '/proc'"),
        ],
    }
)


def test_every_broken_config_has_its_expectations() -> None:
    assert sorted(p.name for p in BROKEN.glob("*.yaml")) == sorted(BROKEN_EXPECTED)


@pytest.mark.parametrize("name", sorted(BROKEN_EXPECTED))
def test_broken_configs_report_each_problem_at_its_line_and_column(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PIPEFLOW_TEST_UNSET_STOP", raising=False)
    monkeypatch.delenv("PIPEFLOW_TEST_UNSET_WORKERS", raising=False)
    problems = problems_of(f"broken_configs/{name}")
    expected = BROKEN_EXPECTED[name]
    assert len(problems) == len(expected), problems
    for problem, (line, col, where, what) in zip(problems, expected, strict=True):
        match = LINE.match(problem)
        assert match, problem
        assert match["file"] == f"broken_configs/{name}"
        assert (int(match["line"]), int(match["col"]), match["where"]) == (line, col, where)
        assert what in match["what"]


MANY_PROBLEMS = (
    "nme: x\nsource: {range: {stop: 3}, items: [1]}\nstages:\n"
    "  - {name: a, fn: config_fns:nope, kind: process, executor: cpu}\n"
    "  - {name: b, fn: config_fns:square, worker: 2, timeout: soon}\n"
    "  - {name: c, fn: config_fns:not_callable}\n"
    "  - {name: d, fn: config_fns:square, kind: thred, retries: {retry_on: [NoSuchError]}}\n"
    "sink: {stdout: {format: html}}\n"
)


def test_all_problems_are_reported_at_once_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, MANY_PROBLEMS)
    problems = problems_of(path)
    assert [p.split(": ", 2)[1] for p in problems] == [
        "nme",
        "source",
        "stages.a",
        "stages.a.fn",
        "stages.a.executor",
        "stages.b.worker",
        "stages.b.timeout",
        "stages.c.fn",
        "stages.d.kind",
        "stages.d.retries.retry_on[0]",
        "sink.stdout.format",
    ]
    assert "did you mean 'name'?" in problems[0]
    assert "exactly one source" in problems[1] and "got items, range" in problems[1]
    assert "give kind or executor, not both" in problems[2]
    assert "has no attribute 'nope'" in problems[3]
    assert "is int, not a callable" in problems[7]
    assert "did you mean 'thread'?" in problems[8]
    assert "no built-in exception 'NoSuchError'" in problems[9]
    assert "expected 'json' or 'text', got 'html'" in problems[10]


OTHER_PROBLEMS = [
    ("", "the file is empty"),
    ("- 1\n- 2\n", "a config is a mapping"),
    ("source: !!python/object:os.system {}\n", "unsupported YAML tag"),
    ("a: 1\na: 2\n", "duplicate key 'a'"),
    ("source: {range: {stop: 3}}\nstages: []\nsink: {null: {}}\n", "at least 1 item"),
    (
        "source: {lines: no_such.txt}\nstages: [{fn: config_fns:square}]\nsink: {null:}\n",
        "no such file",
    ),
    (
        "version: 2\nsource: {items: []}\nstages: [{fn: config_fns:square}]\nsink: {null:}\n",
        "expected 1, got 2",
    ),
    ("source: {items: []}\nstages: [{fn: square}]\nsink: {null:}\n", "should match pattern"),
    ("source: {items: [1]}\nstages: [{fn: config_fns:square}]\nsink: {}\n", "exactly one sink"),
    (
        "source: {range: null}\nstages: [{fn: config_fns:square}]\nsink: {null:}\n",
        "source.range: give a value, or leave the key out",
    ),
]


@pytest.mark.parametrize(("text", "message"), OTHER_PROBLEMS)
def test_other_problems(tmp_path: Path, text: str, message: str) -> None:
    problems = problems_of(write(tmp_path, text))
    assert any(message in p for p in problems), problems


def test_a_missing_file_is_a_config_error() -> None:
    [problem] = problems_of("no/such/config.yaml")
    assert problem.startswith("no/such/config.yaml: cannot read the config")


# --- sources and sinks ---


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{items: [a, 1, {k: v}]}", ["a", 1, {"k": "v"}]),
        ("{range: {start: 2, stop: 9, step: 3}}", [2, 5, 8]),
        ("{lines: data/words.txt}", ["alpha", "beta"]),
        ("{lines: {path: data/words.txt}}", ["alpha", "beta"]),
        ("{jsonl: data/records.jsonl}", [{"n": 1}, {"n": 2}]),
        ("{csv: data/table.csv}", [{"a": "1", "b": "2"}]),
        ("{csv: {path: data/table.csv, header: false}}", [["a", "b"], ["1", "2"]]),
        ("{fn: {fn: 'config_fns:count_up', args: [6], kwargs: {step: 2}}}", [0, 2, 4]),
        ("{fn: {fn: 'config_fns:count_up_async', args: [3]}}", [0, 1, 2]),
    ],
)
async def test_sources(tmp_path: Path, source: str, expected: list[Any]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "words.txt").write_text("alpha\n\nbeta\n")
    (data / "records.jsonl").write_text('{"n": 1}\n{"n": 2}\n')
    (data / "table.csv").write_text("a,b\n1,2\n")
    path = write(
        tmp_path,
        f"source: {source}\nstages: [{{fn: 'config_fns:identity'}}]\nsink: {{null: {{}}}}\n",
    )
    pipeline = pipeflow.load(path, app_dir=tmp_path)
    assert await pipeline.collect() == expected
    assert await pipeline.collect() == expected, "a config's source can be run again"


@pytest.mark.anyio
async def test_file_sinks_and_dead_letters_are_written_relative_to_the_app_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUT_DIR", "out")
    pipeline = pipeflow.load(TESTS / "cli_configs" / "dead_letters.yaml", app_dir=tmp_path)
    report = await pipeline.run()
    assert report.status == "ok"
    out = tmp_path / "out"
    assert [json.loads(x) for x in (out / "out.jsonl").read_text().splitlines()] == [
        2,
        4,
        8,
        10,
        12,
    ]
    [record] = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert {k: record[k] for k in ("stage", "index", "item", "error")} == {
        "stage": "picky",
        "index": 2,
        "item": 3,
        "error": "ValueError",
    }


@pytest.mark.anyio
async def test_csv_null_and_fn_sinks(tmp_path: Path) -> None:
    config_fns.collected.clear()
    cases: list[tuple[str, type[pipeflow.Sink], Callable[[], object], object]] = [
        (
            "{csv: {path: t.csv, fields: [n]}}",
            pipeflow.CsvSink,
            lambda: (tmp_path / "t.csv").read_text().split(),
            ["n", "1", "4"],
        ),
        (
            "{null: }",
            pipeflow.NullSink,
            lambda: sorted(tmp_path.iterdir()),
            [tmp_path / "config.yaml"],
        ),
        ("{fn: 'config_fns:collect'}", pipeflow.CallableSink, config_fns.collected.copy, [1, 4]),
    ]
    for sink, sink_type, written, expected in cases:
        path = write(
            tmp_path,
            f"source: {{items: [1, 2]}}\nstages: [{{fn: 'config_fns:square'}}]\nsink: {sink}\n",
        )
        (tmp_path / "t.csv").unlink(missing_ok=True)
        pipeline = pipeflow.load(path, app_dir=tmp_path)
        assert type(pipeline.sink) is sink_type, sink
        report = await pipeline.run()
        assert report.items_written == 2
        assert written() == expected, sink


def test_schema_describes_the_config_for_editors() -> None:
    schema = pipeflow.schema()
    assert schema["additionalProperties"] is False
    assert {"source", "stages", "sink"} <= set(schema["required"])
    stage = schema["$defs"]["StageSpec"]
    assert stage["additionalProperties"] is False
    assert {"fn", "kind", "workers", "executor", "timeout", "retries"} <= set(stage["properties"])
    assert stage["properties"]["workers"]["default"] == 1
    json.dumps(schema)


def test_stages_of_the_wrong_shape_are_not_taken_for_duplicates(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, "source: {items: [1]}\nstages: [1, 2]\nsink: {null:}\n"))
    assert [p.split(": ", 2)[1] for p in problems] == ["stages[0]", "stages[1]"], problems


# --- bounds: what a config may ask for ---


def test_a_config_larger_than_1_mib_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = minimal(tmp_path)
    with path.open("a") as file:
        file.write("# padding\n" * 200_000)  # 2 MB of comments: valid YAML, too big a config
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:1:1: yaml: the config is larger than 1 MiB")


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path: Path) -> None:
    path = minimal(tmp_path, "    loop: &me [1, *me]\n")
    [problem] = problems_of(path)
    assert problem == f"{path}:6:19: yaml: alias *me is inside its own anchor"


def test_aliases_that_stay_small_still_expand(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "defaults: &defaults {fn: config_fns:square, kind: thread, workers: 2}\n"
        "source: {range: {stop: 4}}\nstages:\n"
        "  - {<<: *defaults, name: a}\n  - {<<: *defaults, name: b}\nsink: {null: {}}\n",
    )
    problems = problems_of(path)  # the anchor's own key is unknown, and only that
    assert len(problems) == 1 and "unknown key 'defaults'" in problems[0]


def test_a_process_stage_may_have_a_few_workers_per_core_not_a_billion() -> None:
    limit = max_processes()
    assert pipeflow.Stage(config_fns.square, kind="process", workers=limit).workers == limit
    with pytest.raises(pipeflow.ConfigError, match=f"workers must be at most {limit} for kind"):
        pipeflow.Stage(config_fns.square, kind="process", workers=1_000_000_000)
    with pytest.raises(pipeflow.ConfigError, match="workers must be at most 1024 for kind thread"):
        pipeflow.Pool(kind="thread", workers=1025)
    with pytest.raises(pipeflow.ConfigError, match="queue_size must be an int from 1 to 1024"):
        pipeflow.Stage(config_fns.square, queue_size=10**6)
    with pytest.raises(pipeflow.ConfigError, match="max_tasks_per_child must be a positive int"):
        pipeflow.Pool(kind="process", max_tasks_per_child=0)
    with pytest.raises(pipeflow.ConfigError, match="max_tasks_per_child applies to kind: process"):
        pipeflow.Pool(kind="process", start_method="fork", max_tasks_per_child=10)
    # a stage on a pool it is given starts no workers of its own: its workers is not bounded
    lent = pipeflow.Stage(config_fns.square, workers=10**6, executor="cpu")
    assert lent.workers == 10**6


def test_a_sink_under_a_file_is_reported_at_load_and_nothing_is_written(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("kept")
    text = minimal(tmp_path).read_text().replace("stdout: {}", f"jsonl: {tmp_path}/taken/o.jsonl")
    [problem] = problems_of(write(tmp_path, text, "sinks.yaml"))
    assert "sink.jsonl: cannot create" in problem and "taken' is not a directory" in problem
    assert (tmp_path / "taken").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "sinks.yaml", "taken"]
