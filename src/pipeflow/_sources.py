"""Built-in sources: files read lazily, one item at a time, so backpressure reaches the disk."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ._errors import SourceFormatError

__all__ = ["FileSource", "SourceFormatError", "csv_rows", "jsonl_records", "text_lines"]


def text_lines(path: str | Path, *, strip: bool = True, skip_blank: bool = True) -> Iterator[str]:
    """Yield the lines of a text file.

    Args:
        path: The file.
        strip: Remove the line ending and surrounding whitespace.
        skip_blank: Leave out empty lines.
    """
    with open(path, encoding="utf-8") as file:
        for line in file:
            text = line.strip() if strip else line.rstrip("\n")
            if skip_blank and not text:
                continue
            yield text


def jsonl_records(path: str | Path) -> Iterator[Any]:
    """Yield one decoded value per non-blank line of a JSON-lines file.

    Raises:
        SourceFormatError: A line is not valid JSON; the message names file and line.
    """
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceFormatError(f"{path}:{number}:{exc.colno}: {exc.msg}") from None


def csv_rows(path: str | Path, *, header: bool = True, delimiter: str = ",") -> Iterator[Any]:
    """Yield the rows of a CSV file: dicts keyed by the header row, or lists without one.

    Args:
        path: The file.
        header: Whether the first row names the columns.
        delimiter: The field separator.
    """
    with open(path, encoding="utf-8", newline="") as file:
        if header:
            yield from csv.DictReader(file, delimiter=delimiter)
        else:
            yield from csv.reader(file, delimiter=delimiter)


class FileSource:
    """A file source that every run reads afresh, and that knows about how long it is.

    Calling it opens the file (`read(path, **options)`); `operator.length_hint` counts its
    lines, less `header_lines`, without decoding them (blank lines included: an estimate,
    for a progress bar).

    Args:
        read: `text_lines`, `jsonl_records` or `csv_rows`.
        path: The file.
        header_lines: Lines at the top that are not items.
        **options: Passed on to `read`.
    """

    def __init__(
        self,
        read: Callable[..., Iterator[Any]],
        path: str | Path,
        *,
        header_lines: int = 0,
        **options: Any,
    ) -> None:
        self.read = read
        self.path = Path(path)
        self.header_lines = header_lines
        self.options = options

    def __call__(self) -> Iterator[Any]:
        return self.read(self.path, **self.options)

    def __repr__(self) -> str:
        return f"{getattr(self.read, '__name__', 'read')}({self.path.name})"

    def __length_hint__(self) -> int:
        lines, last = 0, b"\n"
        try:
            with open(self.path, "rb") as file:
                while chunk := file.read(1 << 20):
                    lines += chunk.count(b"\n")
                    last = chunk[-1:]
        except OSError:
            return 0
        return max(0, lines + (last != b"\n") - self.header_lines)
