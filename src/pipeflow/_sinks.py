"""Where results go. A sink receives whole batches, never single items.

File sinks write each batch as complete lines with one write and a flush, from a worker
thread, so the event loop never blocks on disk and an interrupted run never leaves half a
line behind.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import anyio.to_thread

__all__ = [
    "CallableSink",
    "CsvSink",
    "JsonlSink",
    "ListSink",
    "NullSink",
    "Sink",
    "StdoutSink",
    "to_json_line",
]


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


def to_json_line(value: Any) -> str:
    """`value` as one line of JSON; what JSON cannot hold is written as its repr."""
    return json.dumps(value, default=_json_default, ensure_ascii=False) + "\n"


class Sink:
    """The base of every sink: `open`, then `write` per batch, then `close` on every path."""

    async def open(self) -> None:
        """Prepare to receive batches (open files, connections)."""

    async def write(self, values: list[Any]) -> None:
        """Take one batch of results, in order."""
        raise NotImplementedError

    async def close(self) -> None:
        """Flush and release; called once, whether the run succeeded or not."""


class NullSink(Sink):
    """Discards results (they are still counted in the report)."""

    async def write(self, values: list[Any]) -> None:
        """Drop the batch."""


class ListSink(Sink):
    """Keeps every result in `items`, for tests and small runs."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    async def write(self, values: list[Any]) -> None:
        """Append the batch to `items`."""
        self.items.extend(values)


class CallableSink(Sink):
    """Calls `fn(value)` for every result: awaited if async, else in a worker thread.

    Args:
        fn: The callable; `async def` callables run on the loop.
    """

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        import inspect

        self.fn = fn
        self._is_async = inspect.iscoroutinefunction(fn)

    async def write(self, values: list[Any]) -> None:
        """Call fn on each value of the batch, in order."""
        if self._is_async:
            for value in values:
                await self.fn(value)
        else:
            await anyio.to_thread.run_sync(self._write_sync, values)

    def _write_sync(self, values: list[Any]) -> None:
        for value in values:
            self.fn(value)


class _TextSink(Sink):
    """A sink that renders each batch to text and writes it with one call."""

    def __init__(self, path: str | Path | None, *, append: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.append = append
        self._file: IO[str] | None = None

    async def open(self) -> None:
        """Open the file (or take stdout)."""
        if self.path is None:
            self._file = sys.stdout
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = await anyio.to_thread.run_sync(
                lambda: open(self.path, "a" if self.append else "w", encoding="utf-8")  # type: ignore[arg-type]  # noqa: SIM115
            )

    def render(self, values: list[Any]) -> str:
        """The text for one batch: whole lines only."""
        raise NotImplementedError

    async def write(self, values: list[Any]) -> None:
        """Write the batch's lines with one write and a flush."""
        text = self.render(values)
        file = self._file
        assert file is not None, "write() before open()"
        if file is sys.stdout:
            # a pipe closed early (`| head`) ends the output, not the run with a traceback
            try:
                file.write(text)
                file.flush()
            except BrokenPipeError:
                self._file = None
                raise
            return

        def write_all() -> None:
            file.write(text)
            file.flush()

        await anyio.to_thread.run_sync(write_all)

    async def close(self) -> None:
        """Flush and close the file (stdout is only flushed)."""
        file, self._file = self._file, None
        if file is None:
            return
        if file is sys.stdout:
            file.flush()
        else:
            await anyio.to_thread.run_sync(file.close)


class StdoutSink(_TextSink):
    """Writes one result per line to stdout: JSON by default, or `str(value)` with `format='text'`.

    Args:
        format: `json` (default) or `text`.
    """

    def __init__(self, format: str = "json") -> None:
        super().__init__(None)
        self.format = format

    def render(self, values: list[Any]) -> str:
        """JSON or text lines."""
        if self.format == "text":
            return "".join(f"{value}\n" for value in values)
        return "".join(map(to_json_line, values))


class JsonlSink(_TextSink):
    """Writes one JSON object per line to a file.

    Args:
        path: The file; its folder is created if missing.
        append: Add to the file instead of replacing it.
    """

    def render(self, values: list[Any]) -> str:
        """JSON lines."""
        return "".join(map(to_json_line, values))


class CsvSink(_TextSink):
    """Writes results as CSV rows: dicts by their keys (a header row first), else sequences.

    Args:
        path: The file; its folder is created if missing.
        fields: Column names; by default the keys of the first dict result.
    """

    def __init__(self, path: str | Path, fields: Sequence[str] | None = None) -> None:
        super().__init__(path)
        self.fields = list(fields) if fields else None
        self._header_done = False

    async def open(self) -> None:
        """Open the file; a new run writes its header again."""
        self._header_done = False
        await super().open()

    def render(self, values: list[Any]) -> str:
        """CSV rows (and the header before the first)."""
        buffer = io.StringIO()
        if values and isinstance(values[0], dict):
            if self.fields is None:
                self.fields = list(values[0])
            writer: Any = csv.DictWriter(buffer, fieldnames=self.fields, extrasaction="ignore")
            if not self._header_done:
                writer.writeheader()
            writer.writerows(values)
        else:
            writer = csv.writer(buffer)
            if self.fields and not self._header_done:
                writer.writerow(self.fields)
            writer.writerows(v if isinstance(v, (list, tuple)) else [v] for v in values)
        self._header_done = True
        return buffer.getvalue()
