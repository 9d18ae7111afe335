"""The product's import graph, per package: lines, share of the product, modules, imports inside the package,
and levels (the longest chain of imports inside it, function-level imports included), with the graph
`tests/test_boundaries.py` checks. `--tree PATH` measures another checkout (e.g. a `git worktree` of the
commit before a restructuring), for a before/after table.

    uv run python benchmarks/import_graph.py [--tree PATH]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_boundaries import import_graph  # noqa: E402  (the tests' own graph: one implementation)

PRODUCT = ("maskrcnn", "training", "release", "serving", "batch", "pipelines")


def levels(graph: dict[str, set[str]], package: str) -> int:
    """The longest chain of imports between the package's own modules (a module alone: 1)."""
    inside = {m: {d for d in deps if d.split(".")[0] == package and d != m and not m.startswith(d + ".")}
              for m, deps in graph.items() if m.split(".")[0] == package}

    @functools.cache
    def depth(module: str) -> int:
        return 1 + max((depth(d) for d in inside.get(module, ()) if d in inside), default=0)

    return max((depth(m) for m in inside), default=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", default=str(ROOT), help="the checkout to measure (default: this one)")
    root = Path(p.parse_args().tree).resolve()
    packages = tuple(name for name in PRODUCT if (root / name).is_dir())
    graph = import_graph(root, packages)
    lines = {pkg: sum(len([x for x in f.read_text().splitlines() if x.strip()]) for f in (root / pkg).rglob("*.py"))
             for pkg in packages}
    total = sum(lines.values())
    print(f"{root}: {total} lines of Python in {len(packages)} packages")
    print("| package | lines | share | modules | imports inside | levels | imports of other packages |")
    print("|---|---|---|---|---|---|---|")
    for pkg in sorted(packages, key=lambda k: -lines[k]):
        modules = [m for m in graph if m.split(".")[0] == pkg]
        inside = sum(1 for m in modules for d in graph[m] if d.split(".")[0] == pkg)
        outside = sorted({d.split(".")[0] for m in modules for d in graph[m]} - {pkg})
        print(f"| {pkg} | {lines[pkg]} | {lines[pkg] / total:.0%} | {len(modules)} | {inside} | {levels(graph, pkg)} | "
              f"{', '.join(outside) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
