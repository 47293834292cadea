"""The package's modules import one another without a circle: every import counted, those inside functions too (a
function-level import hides a circle from the interpreter, not from a reader)."""

from __future__ import annotations

import ast
import graphlib

from doc_tables import REPO

PACKAGE = REPO / "flux2bench"


def modules() -> dict[str, tuple[ast.Module, str]]:
    """Each module's name: its syntax tree and the package that its relative imports start from."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        found[name] = ast.parse(path.read_text(), str(path)), package
    return found


def imported(name: str, tree: ast.Module, package: str, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (``from P import m`` imports module ``P.m`` where there is one)."""
    def module_of(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {module_of(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(stem + ([node.module] if node.module else []))
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else module_of(base)
                        for alias in node.names}
    return {target for target in targets if target and target.startswith("flux2bench") and target != name}


def test_the_import_graph_of_the_package_has_no_circle():
    trees = modules()
    graph = {name: imported(name, tree, package, set(trees)) for name, (tree, package) in trees.items()}
    assert sum(map(len, graph.values())) > 300  # the graph was read: the package's modules import one another
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        raise AssertionError(f"an import circle: {' -> '.join(error.args[1])}") from None
