"""The README tells the truth: its commands, configs, keys and code all exist and work."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

import pipeflow
from pipeflow._cli import app
from pipeflow._config.spec import SinkSpec, SourceSpec
from test_examples import CHECKED

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
FIRST_RUN = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
    "pipeflow run configs/squares.yaml"
)
FIRST_TEST = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && pytest"
# the `bench:` section of a config belongs to `pipeflow bench`, documented with it
DOCUMENTED_ELSEWHERE = {"bench"}


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)


def inline_code() -> list[str]:
    prose = re.sub(r"^```.*?^```", "", README, flags=re.DOTALL | re.MULTILINE)
    return re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", prose)


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.DOTALL | re.M)
    assert match, f"the README has no section {title!r}"
    return match.group(1)


def schema_keys(node: Any, defs: dict[str, Any], skip: set[str]) -> set[str]:
    """Every property name in the schema under `node`."""
    if isinstance(node, dict):
        if "$ref" in node:
            return schema_keys(defs[node["$ref"].rpartition("/")[2]], defs, skip)
        found: set[str] = set()
        for name, sub in node.get("properties", {}).items():
            if name not in skip:
                found |= {name} | schema_keys(sub, defs, skip)
        for key in ("anyOf", "oneOf", "allOf", "items", "additionalProperties"):
            value = node.get(key)
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, dict):
                    found |= schema_keys(sub, defs, skip)
        return found
    return set()


SCHEMA = pipeflow.schema()
KEYS = schema_keys(SCHEMA, SCHEMA["$defs"], skip=set())


def commands() -> dict[str, Any]:
    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def pipeflow_lines() -> list[list[str]]:
    """Each `pipeflow ...` command of the README's shell blocks, as arguments."""
    found = []
    for block in code_blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while "pipeflow" in words:
                words = words[words.index("pipeflow") :]
                end = next((i for i, w in enumerate(words) if w in ("|", "&&", ";")), None)
                found.append(words[1:end] if end else words[1:])
                words = words[end:] if end else []
    return found


# --- the first two commands ---


def test_the_two_fresh_machine_commands_come_first_verbatim() -> None:
    top = "\n".join(README.splitlines()[:15])
    assert FIRST_RUN in top
    assert FIRST_TEST in top
    assert top.index(FIRST_RUN) < top.index(FIRST_TEST)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert steps[-1] == "pytest"
    assert re.search(r"pip install -e '\.\[test(,[\w,]+)?\]'", ci)
    assert "python3 -m venv .venv" in ci and ". .venv/bin/activate" in ci


# --- configs, commands, options ---


def test_every_config_the_readme_names_exists() -> None:
    named = set(re.findall(r"configs/[\w.-]+\.yaml", README))
    assert len(named) >= 15
    missing = sorted(name for name in named if not (ROOT / name).is_file())
    assert not missing


def test_the_example_table_lists_every_example_config() -> None:
    table = set(re.findall(r"^\| `configs/([\w.-]+\.yaml)` \|", README, re.M))
    assert table >= CHECKED, sorted(CHECKED - table)


def test_every_pipeflow_subcommand_the_readme_names_exists() -> None:
    known = set(commands())
    named = {words[0] for words in pipeflow_lines() if words}
    named |= {m.group(1) for code in inline_code() if (m := re.match(r"pipeflow\s+(\w+)", code))}
    assert {"run", "validate", "graph", "schema"} <= named
    assert named <= known, f"not commands: {sorted(named - known)}"


def test_every_command_line_of_the_readme_parses_and_loads(tmp_path: Path) -> None:
    lines = pipeflow_lines()
    assert len(lines) >= 10
    for words in lines:
        command = commands()[words[0]]
        options = {opt for param in command.params for opt in param.opts}
        flags = [w for w in words[1:] if w.startswith("-")]
        assert set(flags) <= options, (words, options)
        configs = [w for w in words[1:] if w.endswith(".yaml")]
        if not configs:
            continue
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        overrides = dict(s.replace("$n", "2").split("=", 1) for s in sets)
        pipeflow.load(ROOT / configs[0], overrides=overrides, app_dir=ROOT)


# --- config keys ---


def test_every_key_in_the_config_reference_exists() -> None:
    reference = section("Config reference")
    rows = re.findall(r"^\| `(\w+)` \|", reference, re.M)
    assert len(rows) >= 40
    unknown = sorted(set(rows) - KEYS)
    assert not unknown, f"the README documents keys the schema does not have: {unknown}"


def test_every_config_key_is_documented() -> None:
    documented = set(re.findall(r"`(\w+)`", section("Config reference")))
    expected = schema_keys(SCHEMA, SCHEMA["$defs"], skip=DOCUMENTED_ELSEWHERE)
    missing = sorted(expected - documented)
    assert not missing, f"config keys missing from the README's reference: {missing}"


def test_documented_defaults_match_the_schema() -> None:
    stage = SCHEMA["$defs"]["StageSpec"]["properties"]
    reference = section("Config reference")
    for key in ("workers", "op", "ordered", "batch", "queue_size", "on_error"):
        row = re.search(rf"^\| `{key}` \| `([^`]+)` \|", reference, re.M)
        assert row, key
        assert yaml.safe_load(row.group(1)) == stage[key]["default"], key


def test_source_and_sink_examples_fit_the_schema() -> None:
    reference = section("Config reference")
    for heading, spec in (("source:", SourceSpec), ("sink:", SinkSpec)):
        part = reference.split(f"### `{heading}`", 1)[1].split("###", 1)[0]
        examples = re.findall(r"^\| `\w+` \| (.*?) \|", part, re.M)
        assert len(examples) >= 5
        for cell in examples:
            for example in re.findall(r"`([^`]+)`", cell):
                if ":" in example and not example.startswith("pipelines."):
                    data = yaml.safe_load(example)
                    if None in data:  # pipeflow's reader keeps a `null:` key as the string
                        data["null"] = data.pop(None)
                    spec.model_validate(data)


def test_yaml_examples_are_valid_configs_and_the_reference_runs(tmp_path: Path) -> None:
    blocks = code_blocks("yaml")
    assert blocks
    for number, block in enumerate(blocks):
        data = yaml.safe_load(block)
        config = tmp_path / f"example{number}.yaml"
        config.write_text(block)
        if {"source", "stages", "sink"} <= set(data):
            pipeflow.load(config, app_dir=ROOT)
        else:  # a fragment: its keys must be keys of a config
            assert set(data) <= KEYS, sorted(set(data) - KEYS)
    reference = tmp_path / "example0.yaml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeflow",
            "run",
            reference,
            "--quiet",
            "--set",
            f"dead_letter.jsonl.path={tmp_path / 'dead.jsonl'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "Factorial of 10 is 3628800"


# --- Python examples ---

PYTHON_BLOCKS = code_blocks("python")


def test_there_are_python_examples() -> None:
    assert len(PYTHON_BLOCKS) >= 4


@pytest.mark.parametrize("number", range(len(PYTHON_BLOCKS)))
def test_python_example_runs_and_prints_what_its_comments_say(number: int, tmp_path: Path) -> None:
    script = tmp_path / f"example{number}.py"
    script.write_text(PYTHON_BLOCKS[number])
    done = subprocess.run(
        [sys.executable, script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    for expected in re.findall(r"^\s*print\(.*\)\s+# (.+)$", PYTHON_BLOCKS[number], re.M):
        assert expected in done.stdout, (expected, done.stdout)
