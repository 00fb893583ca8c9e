"""Finding a config's callables by `module:attribute`, and checking they can cross processes."""

from __future__ import annotations

import builtins
import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Any

import cloudpickle

from .._errors import did_you_mean

__all__ = [
    "ImportProblem",
    "did_you_mean",
    "import_exception",
    "import_ref",
    "pickle_problem",
    "put_first_on_sys_path",
]


class ImportProblem(Exception):
    """A reference that does not resolve; the message is one line for the user."""


def put_first_on_sys_path(directory: Path) -> None:
    """Make `directory` the first place imports look (process workers inherit sys.path)."""
    entry = str(directory.resolve())
    if sys.path[:1] != [entry]:
        sys.path.insert(0, entry)
    importlib.invalidate_caches()


def _module_choices(name: str) -> list[str]:
    parent, _, _ = name.rpartition(".")
    if not parent:
        return [m.name for m in pkgutil.iter_modules(sys.path[:1])]
    try:
        package = importlib.import_module(parent)
    except Exception:
        return []
    return [f"{parent}.{m.name}" for m in pkgutil.iter_modules(getattr(package, "__path__", []))]


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or name
        if name == missing or name.startswith(missing + "."):
            hint = did_you_mean(missing, _module_choices(missing))
            where = sys.path[0] if sys.path else "."
            raise ImportProblem(
                f"no module named {missing!r}{hint or f' (searched from {where})'}"
            ) from None
        raise ImportProblem(f"importing {name!r} failed: {exc}") from None
    except Exception as exc:
        raise ImportProblem(f"importing {name!r} raised {type(exc).__name__}: {exc}") from None


def import_ref(ref: str) -> Any:
    """The object that `module:attribute` (attribute may be dotted) names.

    Raises:
        ImportProblem: The module does not import or lacks the attribute.
    """
    module_name, _, attribute = ref.partition(":")
    target = _import_module(module_name)
    where = module_name
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            names = [n for n in dir(target) if not n.startswith("_")]
            raise ImportProblem(
                f"{where!r} has no attribute {part!r}{did_you_mean(part, names)}"
            ) from None
        where = f"{where}:{part}" if where == module_name else f"{where}.{part}"
    return target


def import_exception(name: str) -> type[BaseException]:
    """An exception class from `ValueError` (a builtin) or `module:Name`.

    Raises:
        ImportProblem: No such class, or not an exception class.
    """
    if ":" in name:
        found = import_ref(name)
    else:
        found = getattr(builtins, name, None)
        if found is None:
            names = [n for n in dir(builtins) if n.endswith(("Error", "Exception"))]
            raise ImportProblem(
                f"no built-in exception {name!r}{did_you_mean(name, names)} "
                "(write module:Name for others)"
            )
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise ImportProblem(f"{name!r} is not an exception class")
    return found


def pickle_problem(obj: Any) -> str | None:
    """Why `obj` cannot be sent to a process worker, or None if it can."""
    try:
        cloudpickle.dumps(obj)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
