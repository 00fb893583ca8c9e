"""A real-world pipeline: statistics of every Python file of the standard library.

The source walks `sysconfig.get_path("stdlib")`, a thread stage reads each file (I/O), a
process stage parses it with `ast` (CPU), and the sink writes one JSON line per file:
`{"path", "lines", "functions", "classes"}`. Files that do not parse (the stdlib's tests
keep a few on purpose) raise SyntaxError and go where the config's `on_error` sends them.

`python -m pipelines.stdlib_stats OUT.jsonl [SUBDIR]` writes the same lines serially, the
reference the pipeline's output is checked against.
"""

import ast
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """The folder of the standard library's source files."""
    return Path(sysconfig.get_path("stdlib"))


def python_files(subdir: str | None = None, limit: int | None = None) -> Iterator[str]:
    """Paths of the stdlib's `.py` files, relative to its root, in a stable (sorted) order.

    Args:
        subdir: Only walk this folder of the stdlib (`json`, `asyncio`, ...).
        limit: Stop after this many files.
    """
    root = stdlib_root()
    start = root / subdir if subdir else root
    found = 0
    for folder, dirs, files in os.walk(start):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            if limit is not None and found >= limit:
                return
            found += 1
            yield (Path(folder) / name).relative_to(root).as_posix()


def read_source(path: str) -> dict[str, Any]:
    """The file's bytes (the parser honours its coding cookie), with its path."""
    return {"path": path, "source": (stdlib_root() / path).read_bytes()}


def file_stats(document: dict[str, Any]) -> dict[str, Any]:
    """Lines, function definitions (async ones included) and classes of one file.

    Raises:
        SyntaxError: The file is not valid Python 3.
    """
    source = document["source"]
    tree = ast.parse(source, filename=document["path"])
    functions = classes = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            functions += 1
        elif isinstance(node, ast.ClassDef):
            classes += 1
    return {
        "path": document["path"],
        "lines": len(source.splitlines()),
        "functions": functions,
        "classes": classes,
    }


def serial_stats(subdir: str | None = None, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The same statistics with a plain loop, leaving out the files that do not parse."""
    for path in python_files(subdir, limit):
        try:
            yield file_stats(read_source(path))
        except SyntaxError:
            continue


def main() -> None:
    """Write the serial reference: `python -m pipelines.stdlib_stats OUT.jsonl [SUBDIR]`."""
    out = Path(sys.argv[1])
    subdir = sys.argv[2] if len(sys.argv) > 2 else None
    with out.open("w", encoding="utf-8") as file:
        for record in serial_stats(subdir):
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
