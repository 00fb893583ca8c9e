"""`pipeflow schema` agrees with pipeflow: an editor accepts the configs pipeflow accepts and
flags the ones it refuses, except for what no schema can know (imports, the environment,
names that must match across parts)."""

from __future__ import annotations

import importlib.util
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import pipeflow
from test_config import BROKEN, MANY_PROBLEMS, OTHER_PROBLEMS

TESTS = Path(__file__).parent
ROOT = TESTS.parent
VALIDATOR = jsonschema.Draft202012Validator(pipeflow.schema())
DASK_INSTALLED = importlib.util.find_spec("distributed") is not None
DASK_MISSING = "pip install 'pipeflow[dask]'"
# broken configs whose problem a JSON Schema cannot see, and why
BEYOND_A_SCHEMA = {
    "missing_fn.yaml": "imports the fn",
    "unpicklable_process_fn.yaml": "imports and pickles the fn",
    "missing_env.yaml": "reads the environment",
    "unknown_executor.yaml": "matches names across parts",
    "duplicate_stage.yaml": "matches names across stages",
    "yaml_syntax.yaml": "is not YAML: an editor's YAML parser refuses it",
    "deep_nesting.yaml": "nests deeper than a YAML reader goes (a limit of the reader)",
    "unwritable_sinks.yaml": "looks at the file system",
}
INLINE_BEYOND_A_SCHEMA = {"no such file": "looks for the source's file"}
# what a fragment of the docs leaves out, to make it a config of its own
COMPLETION = {
    "source": {"items": [1, 2]},
    "stages": [{"fn": "pipelines.squares:square"}],
    "sink": {"null": {}},
}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("PIPEFLOW_TEST_UNSET_STOP", raising=False)
    monkeypatch.delenv("PIPEFLOW_TEST_UNSET_WORKERS", raising=False)
    monkeypatch.setenv("PIPEFLOW_TEST_OUT", str(tmp_path / "out.jsonl"))
    yield


class EditorLoader(yaml.SafeLoader):
    """YAML as an editor hands it to a JSON Schema: mapping keys are their text (`null:`
    names the null sink), as in JSON and in pipeflow's own reader."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        return {
            str(key.value): self.construct_object(value, deep=True) for key, value in node.value
        }


EditorLoader.add_constructor(
    "tag:yaml.org,2002:map",
    lambda loader, node: loader.construct_mapping(node),  # type: ignore[arg-type]
)


def editor_view(text: str) -> Any:
    return yaml.load(text, Loader=EditorLoader)


def editor_accepts(data: Any) -> bool:
    return VALIDATOR.is_valid(data)


def pipeflow_accepts(path: Path, app_dir: Path) -> bool:
    try:
        pipeflow.load(path, app_dir=app_dir)
    except pipeflow.ConfigError as exc:
        if not DASK_INSTALLED and all(DASK_MISSING in p for p in exc.problems):
            # a config that is right but for the missing extra: refused, and rightly so
            pytest.skip("the dask extra is not installed")
        return False
    return True


def yaml_blocks() -> list[tuple[str, str]]:
    """Each ```yaml block of the README and the docs, completed into a config if partial."""
    blocks = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        found = re.findall(r"^( *)```yaml\n(.*?)^ *```", text, flags=re.DOTALL | re.MULTILINE)
        for number, (indent, block) in enumerate(found, 1):
            blocks.append((f"{doc.name}#{number}", textwrap.dedent(block) if indent else block))
    return blocks


def completed(block: str) -> dict[str, Any]:
    data = editor_view(block)
    return {**{key: value for key, value in COMPLETION.items() if key not in data}, **data}


@pytest.mark.parametrize(
    "path",
    sorted([*(ROOT / "configs").glob("*.yaml"), *(TESTS / "cli_configs").glob("*.yaml")]),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_every_shipped_config_is_accepted_by_both(path: Path) -> None:
    app_dir = ROOT if path.parent.name == "configs" else TESTS
    assert pipeflow_accepts(path, app_dir)
    data = editor_view(path.read_text(encoding="utf-8"))
    assert editor_accepts(data), [e.message for e in VALIDATOR.iter_errors(data)]


def test_the_docs_have_yaml_blocks() -> None:
    names = [name.partition("#")[0] for name, _ in yaml_blocks()]
    assert {"README.md", "bench.md", "dask.md"} <= set(names)


@pytest.mark.parametrize(("name", "block"), yaml_blocks(), ids=lambda v: str(v)[:20])
def test_every_yaml_block_of_the_docs_is_accepted_by_both(
    name: str, block: str, tmp_path: Path
) -> None:
    data = completed(block)
    path = tmp_path / "block.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert pipeflow_accepts(path, ROOT), name
    assert editor_accepts(data), [e.message for e in VALIDATOR.iter_errors(data)]


@pytest.mark.parametrize("path", sorted(BROKEN.glob("*.yaml")), ids=lambda p: p.name)
def test_every_broken_config_is_refused_by_both(path: Path) -> None:
    assert not pipeflow_accepts(path, TESTS)
    if path.name in BEYOND_A_SCHEMA:
        return
    assert not editor_accepts(editor_view(path.read_text(encoding="utf-8")))


def test_the_configs_beyond_a_schema_exist() -> None:
    assert set(BEYOND_A_SCHEMA) <= {p.name for p in BROKEN.glob("*.yaml")}


@pytest.mark.parametrize(
    "text", [MANY_PROBLEMS, *(text for text, _ in OTHER_PROBLEMS)], ids=lambda t: t[:30]
)
def test_every_inline_broken_config_is_refused_by_both(text: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    assert not pipeflow_accepts(path, TESTS)
    problem = next(message for t, message in [*OTHER_PROBLEMS, (MANY_PROBLEMS, "")] if t == text)
    if problem in INLINE_BEYOND_A_SCHEMA:
        return
    try:
        data = editor_view(text)
    except yaml.YAMLError:
        return  # an editor's YAML parser refuses it too
    assert not editor_accepts(data)


STAGE = "{fn: config_fns:square"


@pytest.mark.parametrize(
    "text",
    [
        f"source: {{items: [1]}}\nstages: [{STAGE}, retries: 3}}]\nsink: {{jsonl: out.jsonl}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}, retries: 0}}]\nsink: {{null:}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}, workers: '${{W:-4}}'}}]\nsink: {{null:}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}, workers: 0}}]\nsink: {{null:}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}, timeout: '${{T:-5s}}'}}]\nsink: {{null:}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}, kind: '${{K:-process}}'}}]\nsink: {{null:}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}, kind: proces}}]\nsink: {{null:}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}, batch: 0}}]\nsink: {{null:}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}, ordered: '${{O:-false}}'}}]\nsink: {{null:}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}, kind: thread, executor: io}}]\n"
        "executors: {io: {kind: thread}}\nsink: {null:}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}, executor: io}}]\n"
        "executors: {io: {kind: thread}}\nsink: {null:}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}, on_error: dead_letter}}]\nsink: {{null:}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}, on_error: dead_letter}}]\nsink: {{null:}}\n"
        "dead_letter: {jsonl: errors.jsonl}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}}}]\nsink: {{}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}}}]\nsink: {{null:, stdout:}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}}}]\nsink: {{stdout:}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}}}]\nsink: {{jsonl:}}\n",
        f"source: {{range: null}}\nstages: [{STAGE}}}]\nsink: {{null:}}\n",
        f"source: {{lines: config_fns.py}}\nstages: [{STAGE}}}]\nsink: {{null:}}\n",
        f"source: {{items: [1]}}\nstages: [{STAGE}}}]\nsink: {{null:}}\nmax_errors: -1\n",
        "source: {items: [1]}\nstages:\n  - fn: config_fns:square\n    workers: ${W:-4}\n"
        "    retries: ${R:-2}\nsink: {null:}\n",
        "source:\n  range:\n    stop: ${STOP:-4}\n"
        "stages: [{fn: config_fns:square}]\nsink: {null:}\n",
    ],
)
def test_pipeflow_and_the_schema_agree(text: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    assert editor_accepts(editor_view(text)) == pipeflow_accepts(path, TESTS)
