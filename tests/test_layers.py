"""The package layout keeps its layers: no import cycles, a pure core, daemons apart.

Walks every module's imports with ``ast`` (no module is imported), so the rules of
docs/design.md ("Layers") hold for code that is never run in a test too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tlsmilter"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, *, top_level_only: bool) -> Iterator[str]:
    """What ``name`` imports, as module names (``from a import b`` is ``a.b`` if a module)."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield full if full in MODULES else node.module


def ours(names: Iterator[str]) -> set[str]:
    return {n for n in names if n == "tlsmilter" or n.startswith("tlsmilter.")}


def test_the_walker_sees_imports() -> None:
    # A rule checked over no edges would pass for nothing.
    edges = ours(imports("tlsmilter.daemons.milter", top_level_only=True))
    assert {"tlsmilter.core.verdict", "tlsmilter.store.base", "tlsmilter.config"} <= edges
    assert "Milter" in set(imports("tlsmilter.daemons.milter", top_level_only=True))


def test_no_import_cycles() -> None:
    graph = {m: ours(imports(m, top_level_only=True)) & set(MODULES) for m in MODULES}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = [*path[path.index(target):], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


FORBIDDEN = {
    # layer: what it must never import (anywhere in a module, lazy imports included)
    "tlsmilter.core": ("tlsmilter.daemons", "tlsmilter.store", "tlsmilter.commands",
                       "tlsmilter.metrics", "tlsmilter.labels", "tlsmilter.assess",
                       "tlsmilter.cli"),
    "tlsmilter.assess": ("tlsmilter.daemons", "tlsmilter.store", "tlsmilter.commands",
                         "tlsmilter.metrics", "tlsmilter.labels", "tlsmilter.cli"),
    "tlsmilter.store": ("tlsmilter.daemons", "tlsmilter.commands", "tlsmilter.cli"),
    "tlsmilter.commands": ("tlsmilter.daemons", "tlsmilter.cli"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_import_nothing_above_them(layer: str) -> None:
    found = []
    for module in MODULES:
        if module == layer or module.startswith(layer + "."):
            for target in ours(imports(module, top_level_only=False)):
                if target.startswith(FORBIDDEN[layer]):
                    found.append(f"{module} imports {target}")
    assert not found, found


@pytest.mark.parametrize("leaf", ["tlsmilter.metrics", "tlsmilter.labels",
                                  "tlsmilter.errors"])
def test_leaves_import_nothing_of_tlsmilter(leaf: str) -> None:
    assert not ours(imports(leaf, top_level_only=False))


def test_only_the_milter_daemons_load_pymilter() -> None:
    loaders = {m for m in MODULES if "Milter" in set(imports(m, top_level_only=False))}
    assert loaders == {"tlsmilter.daemons.milter", "tlsmilter.daemons.serve"}


def test_the_top_level_stays_small() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert len(modules) <= 8, modules
    assert packages == ["assess", "commands", "core", "daemons", "store"]


def test_nothing_cites_a_file_outside_the_repository() -> None:
    root = PACKAGE.parent
    tracked = [*root.glob("tlsmilter/**/*.py"), *root.glob("tests/**/*.py"),
               *root.glob("bench/*.py"), *root.glob("docs/*.md"), root / "README.md",
               *root.glob("contrib/**/*"), *root.glob("systemd/*")]
    citing = [str(p.relative_to(root)) for p in tracked
              if p.is_file() and p != Path(__file__) and "DESIGN.md" in p.read_text()]
    assert not citing, citing
