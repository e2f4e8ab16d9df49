"""The layers: flows -> pipelines -> blip_core, each an import DAG, and importing them changes nothing.

The graph is read from the source with ``ast``: every ``import`` of the project's own modules, at module level or
inside a function (a lazy import still makes a cycle, only a later one), except those under ``if TYPE_CHECKING:``,
which never run. ``from package import name`` counts as importing ``package.name`` when that is a module.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("blip_core", "pipelines", "flows")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {_module_name(f): f for pkg in PACKAGES for f in sorted((REPO / pkg).rglob("*.py"))}


def _own(name: str) -> str | None:
    """The project module ``name`` refers to (``pipelines.storage.join`` -> ``pipelines.storage``), or None."""
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """(node, in a function?) for every import statement that runs, skipping ``if TYPE_CHECKING:`` blocks."""

    def walk(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    yield from walk_stmt(stmt, in_function)
                continue
            yield from walk_stmt(child, in_function)

    def walk_stmt(node: ast.AST, in_function: bool):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        yield from walk(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from walk(tree, False)


@cache
def import_edges() -> dict[str, dict[str, bool]]:
    """module -> {imported project module: imported only inside functions?}."""
    mods = modules()
    graph: dict[str, dict[str, bool]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out: dict[str, bool] = {}
        for node, lazy in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_own(a.name) for a in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for a in node.names:
                    full = f"{source}.{a.name}"
                    targets.append(full if full in mods else _own(source))
            for t in targets:
                if t is not None and t != name:
                    out[t] = out.get(t, True) and lazy
        graph[name] = out
    return graph


def _cycles(nodes: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module among ``nodes`` (Tarjan), each sorted."""
    graph = import_edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in nodes:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def _in(package: str) -> set[str]:
    return {m for m in modules() if m == package or m.startswith(package + ".")}


def _describe(cycle: list[str]) -> str:
    graph = import_edges()
    return "; ".join(f"{m} -> {', '.join(sorted(t for t in graph[m] if t in cycle))}" for m in cycle)


def test_the_graph_sees_every_module():
    expected = {"blip_core.model", "blip_core.checkpoint", "pipelines.storage", "flows.cli", "flows.bootstrap"}
    assert expected <= set(modules())
    assert "blip_core.config" in import_edges()["pipelines.config"]  # a lazy import is an edge too


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    cycles = _cycles(_in(package))
    assert not cycles, f"import cycles in {package}: " + " | ".join(_describe(c) for c in cycles)


def test_no_import_cycle_across_packages():
    cycles = _cycles(set(modules()))
    assert not cycles, "import cycles: " + " | ".join(_describe(c) for c in cycles)


@pytest.mark.parametrize("lower, upper", [("blip_core", "pipelines"), ("blip_core", "flows"), ("pipelines", "flows")])
def test_lower_layers_never_import_upper_ones(lower, upper):
    graph = import_edges()
    bad = sorted(f"{m} -> {t}" for m in _in(lower) for t in graph[m] if t in _in(upper))
    assert not bad, f"{lower} must not import {upper}: {bad}"


def test_blip_core_imports_its_own_modules_at_module_level_only():
    """A function-level import of a sibling is how a cycle hides; blip_core has none (its DAG is explicit)."""
    graph = import_edges()
    lazy = sorted(
        f"{m} -> {t}"
        for m in _in("blip_core")
        for t, only_lazy in graph[m].items()
        if only_lazy and t in _in("blip_core")
    )
    assert not lazy, f"function-level imports of blip_core modules: {lazy}"


def test_importing_the_packages_leaves_the_environment_alone():
    """Ray's and Prefect's settings are set where they start (``flows.runtime``, ``ensure_ray``), not on import."""
    probe = "\n".join(
        [
            "import os",
            "before = dict(os.environ)",
            "import pipelines, pipelines.config, pipelines.ray_runtime, pipelines.storage",
            "import flows, flows.runtime, flows.cli, flows.bootstrap, flows.deploy",
            "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))",
            "assert not changed, changed",
        ]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_"))}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
