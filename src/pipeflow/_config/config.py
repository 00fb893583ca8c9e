"""Loading a config file: YAML -> validated spec -> `Pipeline`, with every problem at once.

read (`_yaml`) -> `--set` overrides -> shape (pydantic models of `_spec`) -> references
(imports, pickling, names that parts share) -> build. Each problem is kept with the data
path it is about and rendered at the end as `FILE:LINE:COL: where: what`, sorted by position.
A part whose shape is wrong is not checked further, so one mistake gives one message.
"""

from __future__ import annotations

import re
import tempfile
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .._errors import ConfigError
from .._pipeline import Pipeline
from .._stage import PICKLING_KINDS
from .build import build_pipeline, stage_name
from .imports import (
    ImportProblem,
    did_you_mean,
    import_exception,
    import_ref,
    pickle_problem,
    put_first_on_sys_path,
)
from .spec import ConfigSpec, schema
from .yaml import DataPath, Document, Origin, read_yaml

__all__ = ["load", "schema", "stage_name"]

_CUSTOM_ERRORS = ("duration", "batch", "workers", "exactly_one", "null", "not_zero", "rate")
_EXPECTED = {
    "int_parsing": "an int",
    "int_type": "an int",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def load(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    app_dir: str | Path | None = None,
) -> Pipeline:
    """Read a YAML config and build its pipeline.

    Args:
        path: The config file.
        overrides: `{"stages.square.workers": 8}`: values by dotted path, stages named by
            their name; string values are read as YAML scalars (`"8"` is the int 8).
            The last key may be new (it is validated like the file); the rest must exist.
        app_dir: Where `fn` modules are imported from and relative paths of sources and
            sinks start; the current directory by default. It is put first on `sys.path`.

    Returns:
        The pipeline, ready to `run()`.

    Raises:
        ConfigError: Every problem found, one `FILE:LINE:COL: where: what` line each.
    """
    base = Path(app_dir) if app_dir is not None else Path.cwd()
    put_first_on_sys_path(base)
    loader = _Loader(_read(path), base.resolve())
    for key, value in (overrides or {}).items():
        loader.override(key, value)
    spec = loader.validate()
    loader.check_references()
    pipeline = None
    if isinstance(loader.doc.data, dict):
        pipeline = build_pipeline(
            spec, loader.doc.data, loader.resolved, loader.base, loader.file_name, loader.add
        )
    loader.raise_problems()
    assert pipeline is not None
    return pipeline


def _read(path: str | Path) -> Document:
    try:
        return read_yaml(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = str(Origin.of(str(path), mark)) if mark is not None else str(path)
        what = exc.problem or exc.context or "not valid YAML"
        if exc.problem and exc.context and exc.context_mark is not None:
            start = exc.context_mark
            what += f", {exc.context} at line {start.line + 1}, column {start.column + 1}"
        raise ConfigError(f"{where}: yaml: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: yaml: {exc}") from None


def _parse_value(text: str) -> Any:
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _yaml_type(value: Any) -> str:
    names = {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a bool",
        int: "an int",
        type(None): "null",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def _fields_at(path: DataPath) -> list[str]:
    """The keys the schema allows at `path` (for `did you mean` hints)."""
    annotation: Any = ConfigSpec
    for segment in path:
        annotation = _step(annotation, segment)
        if annotation is None:
            return []
    model = _model_in(annotation)
    return list(model.model_fields) if model is not None else []


def _options(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Annotated:
        return _options(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _options(arg)]
    return [annotation]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for option in _options(annotation):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option
    return None


def _step(annotation: Any, segment: str | int) -> Any:
    for option in _options(annotation):
        origin = typing.get_origin(option)
        if origin is list and isinstance(segment, int):
            return typing.get_args(option)[0]
        if origin is dict:
            return typing.get_args(option)[1]
        if isinstance(option, type) and issubclass(option, BaseModel):
            field = option.model_fields.get(str(segment))
            if field is not None:
                return field.annotation
    return None


class _Loader:
    """One config being loaded: its document, the problems found, the callables imported."""

    def __init__(self, document: Document, base: Path) -> None:
        self.doc = document
        self.base = base
        self.file_name = document.file
        self.problems: list[tuple[Origin, str]] = []
        self.invalid: list[DataPath] = []
        self.resolved: dict[str, Any] = {}
        # a value whose ${VAR} is missing gets that one message, not a type error as well
        self.unset: set[DataPath] = {path for path, _ in document.problems}
        for path, what in document.problems:
            self.add(path, what)

    # --- problems ---

    def add(self, path: DataPath, what: str, *, key: bool = False) -> None:
        """Note a problem about the value (or key) at `path`."""
        self.problems.append((self.doc.origin(path, key=key), f"{self.where(path)}: {what}"))

    def raise_problems(self) -> None:
        """Raise ConfigError with every problem so far, in file order, if there is any."""
        if self.problems:
            ordered = sorted(self.problems, key=lambda problem: problem[0].sort_key())
            raise ConfigError(list(dict.fromkeys(f"{o}: {what}" for o, what in ordered)))

    def where(self, path: DataPath) -> str:
        """`stages.square.workers` for `("stages", 0, "workers")`: stages by name."""
        parts: list[str] = []
        node = self.doc.data
        for segment in path:
            name = (
                stage_name(node[segment]) if parts == ["stages"] and _has(node, segment) else None
            )
            if name is not None:
                parts.append(name)
            elif isinstance(segment, int):
                parts.append(f"{parts.pop() if parts else ''}[{segment}]")
            else:
                parts.append(segment)
            node = node[segment] if _has(node, segment) else None
        return ".".join(parts) or "config"

    def _valid(self, path: DataPath) -> bool:
        """Whether the value at `path` has the right shape (no shape problem at or under it)."""
        return not any(bad[: len(path)] == path for bad in self.invalid)

    # --- overrides ---

    def override(self, key: str, value: Any) -> None:
        """Apply `--set key=value`: stages are addressed by name, the last key may be new."""
        origin = Origin(f"--set {key}={value}")
        value = _parse_value(value) if isinstance(value, str) else value
        segments = key.split(".")
        node = self.doc.data
        path: DataPath = ()

        def problem(depth: int, what: str) -> None:
            self.problems.append((origin, f"{'.'.join(segments[: depth + 1])}: {what}"))

        if not key or "" in segments:
            problem(len(segments), "not a path; write e.g. stages.NAME.workers=8")
            return
        for depth, segment in enumerate(segments):
            step: str | int
            last = depth == len(segments) - 1
            if isinstance(node, list):
                names = [stage_name(raw) for raw in node] if path == ("stages",) else []
                if segment in names:
                    step = names.index(segment)
                elif segment.isdigit() and int(segment) < len(node):
                    step = int(segment)
                else:
                    known = ", ".join(str(n) for n in names if n) or "none"
                    hint = did_you_mean(segment, [n for n in names if n])
                    problem(depth, f"no stage named {segment!r} (stages: {known}){hint}")
                    return
            elif isinstance(node, dict):
                if not last and segment not in node:
                    hint = did_you_mean(segment, list(node) + _fields_at(path))
                    problem(depth, f"no such key in the config{hint}")
                    return
                step = segment
            else:
                problem(depth - 1, f"is {_yaml_type(node)}, not a mapping")
                return
            path = (*path, step)
            if last:
                node[step] = value
            else:
                node = node[step]
        self.doc.forget(path)
        self.doc.keys[path] = self.doc.values[path] = origin

    # --- shape ---

    def validate(self) -> ConfigSpec | None:
        """Check the data against the schema; None if it does not fit."""
        data = self.doc.data
        if not isinstance(data, dict):
            if data is not None:
                self.add(
                    (),
                    f"a config is a mapping with source, stages and sink, not {_yaml_type(data)}",
                )
            self.invalid.append(())
            return None
        try:
            return ConfigSpec.model_validate(data)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                self._shape_problem(error)
            return None

    def _shape_problem(self, error: ErrorDetails) -> None:
        path: DataPath = tuple(error["loc"])
        self.invalid.append(path)
        if path in self.unset:
            return
        kind, given = error["type"], error.get("input")
        if kind == "extra_forbidden":
            key = str(path[-1])
            self.add(
                path, f"unknown key {key!r}{did_you_mean(key, _fields_at(path[:-1]))}", key=True
            )
        elif kind == "missing":
            self.add(path[:-1], f"missing required key {path[-1]!r}")
        elif kind == "literal_error":
            expected = error.get("ctx", {}).get("expected", "")
            hint = did_you_mean(str(given), re.findall(r"'([^']*)'", expected))
            self.add(path, f"expected {expected}, got {given!r}{hint}")
        elif kind in _CUSTOM_ERRORS:
            self.add(path, error["msg"])
        else:
            shown = _yaml_type(given) if isinstance(given, dict | list) else repr(given)
            expected = _EXPECTED.get(kind)
            message = f"expected {expected}" if expected else error["msg"].lower()
            self.add(path, f"{message}, got {shown}")

    # --- references ---

    def check_references(self) -> None:
        """Import every callable and check process callables pickle.

        How the parts fit together (names, executors, policies) is for the library's
        constructors to say, in `build_pipeline`.
        """
        data = self.doc.data
        if not isinstance(data, dict):
            return
        executors = data["executors"] if isinstance(data.get("executors"), dict) else {}
        stages = data["stages"] if isinstance(data.get("stages"), list) else []
        for index, raw in enumerate(stages):
            if isinstance(raw, dict):
                self._check_stage(("stages", index), raw, executors)
        for part in ("source", "sink", "dead_letter"):
            self._check_end(part, data.get(part))

    def _check_stage(self, path: DataPath, raw: dict[str, Any], executors: dict[str, Any]) -> None:
        executor = executors.get(raw.get("executor"))  # type: ignore[arg-type]
        in_process = raw.get("kind") in PICKLING_KINDS or (
            isinstance(executor, dict) and executor.get("kind") in PICKLING_KINDS
        )
        for key in ("fn", "setup", "teardown"):
            ref = raw.get(key)
            if not isinstance(ref, str) or not self._valid((*path, key)):
                continue
            found = self._resolve((*path, key), ref)
            if found is not None and in_process and (why := pickle_problem(found)):
                self.add(
                    (*path, key),
                    f"a process stage's {key} must pickle, and {ref} does not ({why}); define "
                    "it at module level and create locks, files or clients in setup:",
                )
        group = raw.get("group")
        by = group.get("by") if isinstance(group, dict) else None
        if isinstance(by, str) and self._valid((*path, "group", "by")):
            self._resolve((*path, "group", "by"), by)  # called on the event loop: no pickling
        retries = raw.get("retries")
        names = retries.get("retry_on") if isinstance(retries, dict) else None
        for position, name in enumerate(names if isinstance(names, list) else []):
            where = (*path, "retries", "retry_on", position)
            if not isinstance(name, str) or not self._valid(where):
                continue
            try:
                import_exception(name)
            except ImportProblem as exc:
                self.add(where, str(exc))

    def _check_end(self, part: str, raw: Any) -> None:
        if not isinstance(raw, dict):
            return
        for kind, value in raw.items():
            inner = "fn" if kind == "fn" else "path"
            path: DataPath = (part, kind) if isinstance(value, str) else (part, kind, inner)
            ref = value.get(inner) if isinstance(value, dict) else value
            if not isinstance(ref, str) or not self._valid(path):
                continue
            if kind == "fn":
                self._resolve(path, ref)
            elif part == "source" and kind in ("lines", "jsonl", "csv"):
                file = self.base / ref
                if not file.is_file():
                    self.add(path, f"no such file {str(file)!r}")
            elif kind in ("jsonl", "csv") and (why := _unwritable(self.base / ref)):
                self.add(path, why)

    def _resolve(self, path: DataPath, ref: str) -> Any:
        try:
            found = import_ref(ref)
        except ImportProblem as exc:
            self.add(path, f"cannot import {ref}: {exc}")
            return None
        if not callable(found):
            self.add(path, f"{ref} is {type(found).__name__}, not a callable")
            return None
        self.resolved[ref] = found
        return found


def _unwritable(file: Path) -> str | None:
    """Why a sink could not write `file`, found without changing what is on disk."""
    if file.is_dir():
        return f"{str(file)!r} is a directory; give a file path"
    folder = file.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the sink creates the missing folders
    try:
        if file.exists():
            with open(file, "a", encoding="utf-8"):
                pass
        elif not folder.is_dir():
            return f"cannot create {str(file)!r}: {str(folder)!r} is not a directory"
        else:
            try:
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as exc:
                why = exc.strerror or exc
                return (
                    f"cannot create {str(file)!r}: no file can be made in {str(folder)!r} ({why})"
                )
    except OSError as exc:
        return f"cannot write {str(file)!r}: {exc.strerror or exc}"
    return None


def _has(node: Any, segment: str | int) -> bool:
    if isinstance(node, dict):
        return segment in node
    return isinstance(node, list) and isinstance(segment, int) and 0 <= segment < len(node)
