"""Drawing a pipeline for `pipeflow graph`: text for a terminal, Mermaid and Graphviz dot."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from .._pipeline import Pipeline
from .._sources import FileSource

__all__ = ["FORMATS", "draw"]

FORMATS = ("text", "mermaid", "dot")


def draw(pipeline: Pipeline, fmt: str = "text") -> str:
    """The pipeline's stages, kinds, workers, ops, queue bounds, rates and groups, in `fmt`.

    Args:
        pipeline: What to draw.
        fmt: `text`, `mermaid` or `dot`.

    Returns:
        The drawing, ending with a newline.
    """
    nodes = [("source", "source", _source_label(pipeline.source))]
    edges: list[str] = []
    for index, row in enumerate(pipeline.describe()):
        nodes.append((f"s{index}", str(row["name"]), _stage_label(row)))
        edges.append(f"queue {row['queue_size']}")
    nodes.append(("sink", "sink", _sink_label(pipeline.sink)))
    edges.append(f"queue {pipeline.sink_queue_size}")
    if fmt == "mermaid":
        return _mermaid(nodes, edges)
    if fmt == "dot":
        return _dot(pipeline.name, nodes, edges)
    return _text(pipeline.name, nodes, edges)


def _stage_label(row: dict[str, Any]) -> str:
    workers = row["workers"]
    where = f"{row['kind']} " + (
        f"x{workers}" if isinstance(workers, int) else f"workers {workers}"
    )
    if row.get("executor"):
        where += f" (executor {row['executor']})"
    order = "ordered" if row["ordered"] else "unordered"
    label = f"{where}, {row['op']}, {order}, on_error {row['on_error']}"
    if row.get("rate"):
        label += f", rate {row['rate']}"
    if row.get("group"):
        label += f", group {row['group']}"
    return label


def _source_label(source: Any) -> str:
    if isinstance(source, functools.partial):
        args = [Path(a).name if isinstance(a, Path) else repr(a) for a in source.args]
        return f"{getattr(source.func, '__name__', 'fn')}({', '.join(args)})"
    if isinstance(source, list):
        return f"items ({len(source)})"
    return repr(source) if isinstance(source, range | FileSource) else type(source).__name__


def _sink_label(sink: Any) -> str:
    if sink is None:
        return "none (results are counted)"
    kind = type(sink).__name__.removesuffix("Sink").lower()
    path = getattr(sink, "path", None)
    return f"{kind} {Path(path).name}" if path else kind


def _text(name: str, nodes: list[tuple[str, str, str]], edges: list[str]) -> str:
    width = max(len(title) for _, title, _ in nodes)
    lines = [f"pipeline {name}"]
    for index, (_, title, label) in enumerate(nodes):
        lines.append(f"  {title.ljust(width)}  {label}")
        if index < len(edges):
            lines.append(f"  {'|'.rjust(min(width, 4))}  {edges[index]}")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return json.dumps(text)


def _mermaid(nodes: list[tuple[str, str, str]], edges: list[str]) -> str:
    lines = ["flowchart LR"]
    for key, title, label in nodes:
        text = f"{title}<br/>{label}".replace('"', "#quot;")
        shape = ('[/"', '"/]') if key in ("source", "sink") else ('["', '"]')
        lines.append(f"    {key}{shape[0]}{text}{shape[1]}")
    for (left, _, _), (right, _, _), edge in zip(nodes[:-1], nodes[1:], edges, strict=True):
        lines.append(f'    {left} -->|"{edge}"| {right}')
    return "\n".join(lines) + "\n"


def _dot(name: str, nodes: list[tuple[str, str, str]], edges: list[str]) -> str:
    lines = [f"digraph {_quoted(name)} {{", "    rankdir=LR;", "    node [shape=box];"]
    for key, title, label in nodes:
        shape = ", shape=cds" if key in ("source", "sink") else ""
        lines.append(f"    {key} [label={_quoted(title + chr(10) + label)}{shape}];")
    for (left, _, _), (right, _, _), edge in zip(nodes[:-1], nodes[1:], edges, strict=True):
        lines.append(f"    {left} -> {right} [label={_quoted(edge)}];")
    return "\n".join(lines) + "\n}\n"
