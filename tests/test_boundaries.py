"""The project's import graph: no cycles (function-level imports included), and the dependency rules
between the parts (`training` is what a remote Ray cluster receives, so it imports none of the others)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "release", "pipelines", "serving", "batch", "devstack")


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


def test_training_imports_none_of_the_other_parts(graph):
    assert {d.split(".")[0] for d in _imports_of(graph, "training")} == {"training"}


def test_release_uses_training_only(graph):
    assert {d.split(".")[0] for d in _imports_of(graph, "release")} <= {"release", "training"}


def test_pipelines_are_adapters_over_training_release_and_batch(graph):
    assert {d.split(".")[0] for d in _imports_of(graph, "pipelines")} <= {"pipelines", "training", "release", "batch"}


def test_batch_uses_training_only(graph):
    assert {d.split(".")[0] for d in _imports_of(graph, "batch")} == {"batch", "training"}


# The architecture's rule (../shared/ARCHITECTURE.md): serving uses from training only the package reader,
# inference, image decoding, masks, labels, visualisation and logging.
SERVING_MAY_USE = {
    "training.package", "training.signature", "training.graph", "training.onnx_detector",  # the package reader
    "training.transform",  # pre- and post-processing (NumPy), with the network's run
    "training.data.images",  # image decoding
    "training.data.masks",  # masks
    "training.data.labels",  # labels
    "training.reference",  # the package's reference statistics (and the predictor's defaults they assume)
    "training.visualize",  # visualisation
    "training.logs",  # logging
}


def test_serving_uses_from_training_only_what_the_architecture_allows(graph):
    """Fails on any import from training outside the rule's list (the dataset, the COCO loader, the training
    loop, the evaluator, tracking, ...) in any serving module, at the top or inside a function."""
    used = {d for d in _imports_of(graph, "serving") if not d.startswith("serving")}
    outside = {d for d in used if d.startswith("training") and d not in SERVING_MAY_USE}
    assert not outside, f"serving imports {sorted(outside)} from training; the rule allows {sorted(SERVING_MAY_USE)}"
    assert {d.split(".")[0] for d in used} <= {"training"}, used


def test_nothing_imports_the_cli():
    """The library is imported by the CLI, Tune, the pipeline, and the benchmarks; never the other way."""
    graph = import_graph(ROOT, (*PACKAGES, "benchmarks"))
    importers = sorted(mod for mod, deps in graph.items() if "training.ray_main" in deps)
    assert importers == []
