"""No import cycle among our modules: every module can be read, and imported, from the bottom up.

The graph is grimp's (what import-linter reads), built from the source as it is now.
Imports under `if TYPE_CHECKING:` are left out: they never run, and they are how a type
is named across a layer without an import at run time.
"""

from __future__ import annotations

import grimp
import pytest


def strongly_connected(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Tarjan's algorithm over `modules`: the groups that import each other in a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.find_modules_directly_imported_by(node) & modules):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return groups


@pytest.mark.parametrize("package", ["appliance", "tui"])
def test_no_import_cycles(package: str) -> None:
    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    modules = set(graph.modules)
    assert len(modules) > 5
    assert strongly_connected(graph, modules) == []


def test_the_check_finds_a_cycle() -> None:
    """The checker itself can fail: a graph with a circle is reported."""
    graph = grimp.ImportGraph()
    for name in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(name)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    graph.add_import(importer="a.z", imported="a.x")
    assert strongly_connected(graph, {"a.x", "a.y", "a.z"}) == [["a.x", "a.y", "a.z"]]
