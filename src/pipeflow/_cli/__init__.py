"""The command line: `commands` (typer), `console` (what stderr shows), `graph`."""

from .commands import app, main

__all__ = ["app", "main"]
