"""The project's import graph: no cycles (function-level imports included), and the dependency rules
between the parts, one line per package (../shared/ARCHITECTURE.md): the bottom package `maskrcnn` imports
nothing else of the project; `training` (what a remote Ray cluster receives, with `maskrcnn`) imports only
it; `serving` (what the serving image holds, with `maskrcnn`) only it too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("maskrcnn", "training", "release", "pipelines", "serving", "batch", "devstack")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body (top level or inside functions)."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports the module pkg.mod when there is one
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is how packages work, not a cycle
            if nxt in graph and node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT, PACKAGES)


def test_no_import_cycles(graph):
    assert len(graph) > 40
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_sees_a_function_level_cycle(tmp_path):
    """The check can fail: a cycle hidden in a function body (as ray_main <-> tune once was) is found."""
    pkg = tmp_path / "demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("import demo.lib\n\ndef main():\n    pass\n")
    (pkg / "lib.py").write_text("def run():\n    from demo.cli import main\n    return main\n")
    assert find_cycle(import_graph(tmp_path, ("demo",))) == ["demo.cli", "demo.lib", "demo.cli"]


def _imports_of(graph, package: str) -> set[str]:
    return {dep for mod, deps in graph.items() if mod.split(".")[0] == package for dep in deps}


# package -> the packages it may import (itself included)
MAY_IMPORT = {
    "maskrcnn": {"maskrcnn"},
    "training": {"maskrcnn", "training"},
    "release": {"maskrcnn", "training", "release"},
    "serving": {"maskrcnn", "serving"},
    "batch": {"maskrcnn", "training", "batch"},
    "pipelines": {"maskrcnn", "training", "release", "batch", "pipelines"},
}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_what_the_architecture_allows(graph, package):
    """Fails on any import, at the top or inside a function, of a package outside the rule's line."""
    used = {d.split(".")[0] for d in _imports_of(graph, package)}
    assert package in used or package == "maskrcnn" and used <= {"maskrcnn"}, (package, used)
    assert used <= MAY_IMPORT[package], f"{package} imports {sorted(used - MAY_IMPORT[package])}"


def test_nothing_imports_pipelines_or_devstack(graph):
    importers = {mod for mod, deps in graph.items() for d in deps
                 if d.split(".")[0] in ("pipelines", "devstack") and mod.split(".")[0] != d.split(".")[0]}
    assert importers <= {m for m in graph if m.startswith("devstack")}, sorted(importers)


TORCH_AT_THE_TOP = {"maskrcnn.model", "maskrcnn.eager"}


def test_only_the_architecture_and_the_eager_runner_import_torch_at_the_top():
    """The bottom package's other modules import torch (if at all) inside functions: the serving image has
    no torch, and the predictor with a graph never reaches it."""
    at_top = set()
    for path in (ROOT / "maskrcnn").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:  # module level only (TYPE_CHECKING blocks are `if` statements: not counted)
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("torch", "torchvision") for n in names):
                at_top.add(module_name(path, ROOT))
    assert at_top == TORCH_AT_THE_TOP


def test_nothing_imports_the_cli():
    """The library is imported by the CLI, Tune, the pipeline, and the benchmarks; never the other way."""
    graph = import_graph(ROOT, (*PACKAGES, "benchmarks"))
    importers = sorted(mod for mod, deps in graph.items() if "training.ray_main" in deps)
    assert importers == []
