"""YAML read with a safe loader, keeping where every value came from.

A config problem is reported as `FILE:LINE:COL: where: what`, so reading a config keeps,
for each path into the data (`("stages", 0, "workers")`), the position of its key and of its
value. `${VAR}` and `${VAR:-default}` are replaced in scalars while the node tree is walked,
before a plain scalar's type is decided, so `workers: ${WORKERS:-4}` is the int 4.

A config is small, and reading one must stay cheap whatever the file holds: the file's size,
its nesting depth and the nodes its aliases expand to are bounded while the node tree is
composed, before anything is expanded (an alias is one node there; the walk that builds the
data is what would copy it, 9 levels of 9 aliases into 9**9 values).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "MAX_ALIAS_NODES",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "ConfigTooLarge",
    "Document",
    "Origin",
    "DataPath",
    "read_yaml",
]

DataPath = tuple[str | int, ...]

MAX_CONFIG_BYTES = 1 << 20
"""A config is at most 1 MiB; data belongs in a `lines`, `jsonl` or `csv` source."""
MAX_ALIAS_NODES = 10_000
"""The nodes that all of a config's aliases (`*name`, `<<: *name`) may copy, together."""
MAX_DEPTH = 100
"""How deep mappings and lists may nest."""

_VARIABLE = re.compile(r"\$(\$)?\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_STANDARD_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap")


@dataclass(frozen=True)
class Origin:
    """Where a value came from: a file position (1-based), or a `--set` override."""

    file: str
    line: int | None = None
    column: int | None = None

    @classmethod
    def of(cls, file: str, mark: yaml.Mark) -> Origin:
        """The origin at a YAML mark (0-based), shown 1-based like compilers do."""
        return cls(file, mark.line + 1, mark.column + 1)

    def sort_key(self) -> tuple[bool, int, int]:
        """File positions in reading order, then overrides."""
        return (self.line is None, self.line or 0, self.column or 0)

    def __str__(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"


@dataclass
class Document:
    """A config's data with the origin of each path: its key's and its value's.

    Attributes:
        file: The file name as given, used in messages.
        data: The plain data (dicts, lists, scalars); mapping keys are always strings.
        keys: The origin of each path's key.
        values: The origin of each path's value.
        problems: Problems found while reading (missing variables, duplicate keys).
    """

    file: str
    data: Any
    keys: dict[DataPath, Origin] = field(default_factory=dict)
    values: dict[DataPath, Origin] = field(default_factory=dict)
    problems: list[tuple[DataPath, str]] = field(default_factory=list)

    def origin(self, path: DataPath, *, key: bool = False) -> Origin:
        """The origin of `path`'s key (or value), or of its nearest known ancestor."""
        table = self.keys if key and path in self.keys else self.values
        for end in range(len(path), -1, -1):
            found = table.get(path[:end])
            if found is not None:
                return found
        return Origin(self.file)

    def forget(self, path: DataPath) -> None:
        """Drop the origins of `path` and everything under it (before replacing it)."""
        for table in (self.keys, self.values):
            for known in [p for p in table if p[: len(path)] == path]:
                del table[known]


def read_yaml(path: str | Path, environ: Mapping[str, str] | None = None) -> Document:
    """Read one YAML document with positions, `${VAR}` interpolated.

    Raises:
        yaml.MarkedYAMLError: The text is not YAML (the error carries its position).
        OSError: The file cannot be read.
    """
    file = str(path)
    with open(path, "rb") as stream:
        raw = stream.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigTooLarge(
            f"the config is larger than {MAX_CONFIG_BYTES >> 20} MiB; "
            "read data from a lines, jsonl or csv source instead"
        )
    text = raw.decode("utf-8")
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    document = Document(file, None)
    if root is None:
        document.problems.append(((), "the file is empty; a config needs source, stages, sink"))
        return document
    walker = _Walker(document, loader, os.environ if environ is None else environ)
    document.data = walker.build(root, ())
    return document


class ConfigTooLarge(yaml.MarkedYAMLError):
    """The config, or what its aliases expand to, is larger than a config may be."""

    def __init__(self, problem: str, mark: yaml.Mark | None = None) -> None:
        super().__init__(problem=problem, problem_mark=mark or yaml.Mark("", 0, 0, 0, "", 0))


class _BoundedLoader(yaml.SafeLoader):
    """A safe loader that counts, while composing, the nodes its aliases stand for."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0  # nodes composed so far, an alias counting every node it copies
        self._alias_nodes = 0
        self._sizes: dict[int, int] = {}  # id(node) -> the nodes it expands to

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        mark = event.start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                raise ConfigTooLarge(f"alias *{event.anchor} is inside its own anchor", mark)
            self._nodes += size
            self._alias_nodes += size
            if self._alias_nodes > MAX_ALIAS_NODES:
                raise ConfigTooLarge(
                    f"aliases expand to more than {MAX_ALIAS_NODES} values; "
                    "a config is small, write it out or read data from a file",
                    mark,
                )
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ConfigTooLarge(f"nested more than {MAX_DEPTH} levels deep", mark)
        before = self._nodes
        self._nodes += 1
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._sizes[id(node)] = self._nodes - before
        return node


class _Walker:
    """Builds plain data from the node tree, noting origins and interpolating scalars."""

    def __init__(
        self, document: Document, loader: _BoundedLoader, environ: Mapping[str, str]
    ) -> None:
        self.document = document
        self.loader = loader
        self.environ = environ

    def build(self, node: yaml.Node, path: DataPath) -> Any:
        document = self.document
        document.values[path] = Origin.of(document.file, node.start_mark)
        if isinstance(node, yaml.MappingNode):
            self._check_tag(node, path)
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            self._check_tag(node, path)
            return [self.build(child, (*path, i)) for i, child in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        return self._scalar(node, path)

    def _check_tag(self, node: yaml.Node, path: DataPath) -> None:
        if node.tag not in _STANDARD_TAGS:
            self.document.problems.append((path, f"unsupported YAML tag {node.tag!r}"))

    def _mapping(self, node: yaml.MappingNode, path: DataPath) -> dict[str, Any]:
        self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                origin = Origin.of(self.document.file, key_node.start_mark)
                self.document.keys[(*path, "?")] = origin
                self.document.problems.append(((*path, "?"), "a key must be a plain string"))
                continue
            # the key's text, not its YAML type: `null: {}` names the null sink
            key = str(key_node.value)
            child = (*path, key)
            if key in result:
                self.document.problems.append((child, f"duplicate key {key!r}"))
            self.document.keys[child] = Origin.of(self.document.file, key_node.start_mark)
            result[key] = self.build(value_node, child)
        return result

    def _scalar(self, node: yaml.ScalarNode, path: DataPath) -> Any:
        value = str(node.value)
        if "${" in value:
            value = self._interpolate(value, path)
            if node.style is None:
                # a plain scalar gets its type from its text after interpolation
                tag = self.loader.resolve(yaml.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
                node = yaml.ScalarNode(tag, value, node.start_mark, node.end_mark, None)
            else:
                return value
        try:
            return self.loader.construct_object(node)
        except yaml.YAMLError as exc:
            self.document.problems.append((path, str(getattr(exc, "problem", exc))))
            return value

    def _interpolate(self, text: str, path: DataPath) -> str:
        def replace(match: re.Match[str]) -> str:
            escaped, name, default = match.groups()
            if escaped:
                return match.group(0)[1:]
            if name in self.environ:
                return self.environ[name]
            if default is not None:
                return default
            self.document.problems.append(
                (
                    path,
                    f"environment variable {name!r} is not set "
                    f"(write ${{{name}:-default}} to give a default)",
                )
            )
            return ""

        return _VARIABLE.sub(replace, text)
