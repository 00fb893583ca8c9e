"""Where results go. A sink receives whole batches, never single items.

File sinks write each batch as complete lines with one write and a flush, from a worker
thread, so the event loop never blocks on disk and an interrupted run never leaves half a
line behind.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
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
    """The base of every sink: `open`, then `write` per batch, then `close` on every path.

    Attributes:
        delivered: How many values of the current (or last) `write` reached their
            destination. A run counts a batch whose `write` raised or was cancelled by
            this number; a sink that can't tell leaves it at 0.
    """

    delivered: int = 0

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
        self.delivered = len(values)


class ListSink(Sink):
    """Keeps every result in `items`, for tests and small runs."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    async def write(self, values: list[Any]) -> None:
        """Append the batch to `items`."""
        self.items.extend(values)
        self.delivered = len(values)


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
        self.delivered = 0
        if self._is_async:
            for value in values:
                await self.fn(value)
                self.delivered += 1
        else:
            await anyio.to_thread.run_sync(self._write_sync, values)

    def _write_sync(self, values: list[Any]) -> None:
        for value in values:
            self.fn(value)
            self.delivered += 1


class _TextSink(Sink):
    """A sink that renders each batch to text and writes it with one call.

    What a failed write left in a file is cut back to its last whole row, so the file
    holds whole rows only, and `delivered` counts them.
    """

    def __init__(self, path: str | Path | None, *, append: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.append = append
        self._file: IO[bytes] | None = None
        self._stdout = False

    async def open(self) -> None:
        """Open the file (or take stdout)."""
        if self.path is None:
            self._stdout = True
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        path, mode = self.path, "ab" if self.append else "wb"
        # unbuffered: each write reports the bytes that reached the file
        self._file = await anyio.to_thread.run_sync(lambda: open(path, mode, buffering=0))  # noqa: SIM115

    def render_rows(self, values: list[Any]) -> list[str]:
        """The text of each value of a batch (whole lines; a header joins the first)."""
        raise NotImplementedError

    def render(self, values: list[Any]) -> str:
        """The text for one batch: whole lines only."""
        return "".join(self.render_rows(values))

    async def write(self, values: list[Any]) -> None:
        """Write the batch's lines with one write and a flush."""
        self.delivered = 0
        rows = self.render_rows(values)
        data = "".join(rows).encode("utf-8")
        if self._stdout:
            # on the loop: a pipe closed early (`| head`) ends the output, not the run
            # with a traceback
            self._write_stdout(rows, data)
            return
        file = self._file
        assert file is not None, "write() before open()"
        await anyio.to_thread.run_sync(self._write_file, file, rows, data)

    def _write_stdout(self, rows: list[str], data: bytes) -> None:
        stdout = sys.stdout
        try:
            fd = stdout.fileno()
        except (AttributeError, OSError, ValueError):  # replaced by a test or a notebook
            stdout.write(data.decode("utf-8"))
            stdout.flush()
            self.delivered = len(rows)
            return
        stdout.flush()
        done, error = _write_all(lambda chunk: os.write(fd, chunk), data)
        # a pipe cannot be cut back: only the rows it took whole are counted
        self.delivered = _whole_rows(rows, done)
        if error is not None:
            raise error

    def _write_file(self, file: IO[bytes], rows: list[str], data: bytes) -> None:
        start = file.tell()
        done, error = _write_all(file.write, data)
        whole = _whole_rows(rows, done)
        if error is not None:
            cut = start + sum(len(row.encode("utf-8")) for row in rows[:whole])
            if cut < start + done:  # keep the file's rows whole
                with contextlib.suppress(OSError):
                    file.truncate(cut)
                    file.seek(cut)
        self.delivered = whole
        if error is not None:
            raise error

    async def close(self) -> None:
        """Flush and close the file (stdout is only flushed)."""
        file, self._file = self._file, None
        if self._stdout:
            self._stdout = False
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
        if file is not None:
            await anyio.to_thread.run_sync(file.close)


def _write_all(
    write: Callable[[memoryview], int | None], data: bytes
) -> tuple[int, OSError | None]:
    """Write all of `data`: the bytes written, and the error that stopped it early."""
    view = memoryview(data)
    done = 0
    try:
        while done < len(view):
            done += write(view[done:]) or 0
    except OSError as exc:
        return done, exc
    return done, None


def _whole_rows(rows: list[str], done: int) -> int:
    """How many of `rows` the first `done` bytes hold whole."""
    whole = 0
    for row in rows:
        done -= len(row.encode("utf-8"))
        if done < 0:
            break
        whole += 1
    return whole


class StdoutSink(_TextSink):
    """Writes one result per line to stdout: JSON by default, or `str(value)` with `format='text'`.

    Args:
        format: `json` (default) or `text`.
    """

    def __init__(self, format: str = "json") -> None:
        super().__init__(None)
        self.format = format

    def render_rows(self, values: list[Any]) -> list[str]:
        """JSON or text lines."""
        if self.format == "text":
            return [f"{value}\n" for value in values]
        return list(map(to_json_line, values))


class JsonlSink(_TextSink):
    """Writes one JSON object per line to a file.

    Args:
        path: The file; its folder is created if missing.
        append: Add to the file instead of replacing it.
    """

    def render_rows(self, values: list[Any]) -> list[str]:
        """JSON lines."""
        return list(map(to_json_line, values))


class CsvSink(_TextSink):
    """Writes results as CSV rows: dicts by their keys (a header row first), else sequences.

    The columns are `fields`, or else the keys of the first dict result; a later dict with
    a key that is not a column fails the run (naming the row and the key) rather than
    lose that value. With `fields` given, keys outside them are not written: the columns
    are the user's choice. A missing key leaves its cell empty.

    Args:
        path: The file; its folder is created if missing.
        fields: Column names; by default the keys of the first dict result.
    """

    def __init__(self, path: str | Path, fields: Sequence[str] | None = None) -> None:
        super().__init__(path)
        self.fields = list(fields) if fields else None
        self._chosen = self.fields is not None
        self._header_done = False
        self._rows = 0

    async def open(self) -> None:
        """Open the file; a new run writes its header again."""
        self._header_done = False
        self._rows = 0
        if not self._chosen:
            self.fields = None
        await super().open()

    def render_rows(self, values: list[Any]) -> list[str]:
        """CSV rows (the header joins the first).

        Raises:
            ValueError: A dict has a key that is not a column (and `fields` was not given).
        """
        buffer = io.StringIO()
        rows: list[str] = []
        if values and isinstance(values[0], dict):
            if self.fields is None:
                self.fields = list(values[0])
            columns = set(self.fields)
            if not self._chosen:
                for number, value in enumerate(values, self._rows + 1):
                    extra = [key for key in value if key not in columns]
                    if extra:
                        raise ValueError(
                            f"csv sink: row {number} has the key {extra[0]!r}, which is not "
                            f"a column (the columns are the first row's keys: "
                            f"{', '.join(map(str, self.fields))}); name every column with "
                            "`fields:`"
                        )
            writer: Any = csv.DictWriter(buffer, fieldnames=self.fields, extrasaction="ignore")
            if not self._header_done:
                writer.writeheader()
            write_row = writer.writerow
        else:
            writer = csv.writer(buffer)
            if self.fields and not self._header_done:
                writer.writerow(self.fields)
            values = [v if isinstance(v, (list, tuple)) else [v] for v in values]
            write_row = writer.writerow
        for value in values:
            write_row(value)
            rows.append(buffer.getvalue())
            buffer.seek(0)
            buffer.truncate()
        self._header_done = True
        self._rows += len(values)
        return rows
