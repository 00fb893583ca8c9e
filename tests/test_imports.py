"""The house's one rule of imports: arrows point one way.

The modules of `src/pipeflow` are read with `ast` (nothing is imported). Every import
counts, wherever it stands: at the top, inside a function (a lazy import is still a
dependency, only a later one), and under `if TYPE_CHECKING:` (a type the engine names
is a type the engine depends on). Relative imports are resolved against the module's
package. The implicit arrow from a module to its package's `__init__` (which runs first)
is left out, as it is from every import graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pipeflow"

# The wings, each a folder: the config layer, the command line and bench. Every module at
# the package root but `__init__` and `__main__` is the engine or a public type.
WINGS = {"config": ("_config",), "cli": ("_cli",), "bench": ("_bench",)}
FACADES = ("pipeflow", "pipeflow.__main__")


def module_name(path: Path) -> str:
    parts = ["pipeflow", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The pipeflow modules `name` imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from . import _worker` imports a module; `from ._x import y`, a name of one
            targets = [
                f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem
                for alias in node.names
            ]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("pipeflow"):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def wing_of(name: str) -> str | None:
    root = name.split(".")[1] if name.count(".") else ""
    for wing, roots in WINGS.items():
        if root in roots:
            return wing
    return None


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_is_read_whole() -> None:
    edges = graph()
    # a few arrows known to exist: if the walker lost them, the tests below prove nothing
    assert "pipeflow._runner" in edges["pipeflow._pipeline"]
    assert "pipeflow._worker" in edges["pipeflow._runner"]  # `from . import _worker`
    assert "pipeflow._cli.commands" in edges["pipeflow.__main__"]  # inside a function
    assert "pipeflow._report" in edges["pipeflow._errors"]  # under TYPE_CHECKING
    assert {wing_of(name) for name in edges} >= {"config", "cli", "bench", None}


def test_no_module_imports_one_that_imports_it_back() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = graph()
    edges["pipeflow._runner"] = edges["pipeflow._runner"] | {"pipeflow._pipeline"}
    cycle = find_cycle(edges) or []
    assert cycle[0] == cycle[-1] and {"pipeflow._pipeline", "pipeflow._runner"} <= set(cycle)


@pytest.mark.parametrize(
    "module", sorted(n for n in modules() if wing_of(n) is None and n not in FACADES)
)
def test_the_engine_never_imports_a_wing(module: str) -> None:
    wrong = sorted(target for target in graph()[module] if wing_of(target) is not None)
    assert not wrong, f"{module} imports the wing module(s) {wrong}"


def test_a_wing_does_not_import_another_but_the_cli_driving_them() -> None:
    for module, targets in graph().items():
        wing = wing_of(module)
        for target in targets:
            other = wing_of(target)
            if wing in ("config", "bench") and other not in (None, wing):
                assert (wing, other) == ("bench", "config"), f"{module} imports {target}"
