"""The modules of onceflow_dev.devstack import each other without a cycle.

Read from the source with ``ast`` (imports inside functions count too), so a
cycle fails here even where a deferred import would hide it at run time.
"""

from __future__ import annotations

import ast
import pathlib

import onceflow_dev.devstack

PACKAGE = "onceflow_dev.devstack"
FOLDER = pathlib.Path(onceflow_dev.devstack.__file__).parent
MODULES = sorted(path.stem for path in FOLDER.glob("*.py"))


def _imported(module: str) -> set[str]:
    """The modules of the package that ``module`` imports (``__init__`` for a name
    taken from the package itself)."""
    tree = ast.parse((FOLDER / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name.split(".")[2])
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from .x import y
                source = f"{PACKAGE}.{node.module}" if node.module else PACKAGE
            else:
                source = node.module or ""
            if source == PACKAGE:
                found.update(alias.name if alias.name in MODULES else "__init__" for alias in node.names)
            elif source.startswith(PACKAGE + "."):
                found.add(source.split(".")[2])
    found.discard(module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle in ``graph`` as a path (first module repeated last), or []."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported, path + [module])
            if cycle:
                return cycle
        done.add(module)
        return []

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return []


def test_the_import_graph_is_read():
    graph = {module: _imported(module) for module in MODULES}
    assert {"flink", "kafka_expansion", "service", "common"} <= set(MODULES)
    assert {"beam_java", "service", "common"} <= graph["flink"]
    assert {"beam_java", "service"} <= graph["kafka_expansion"]
    assert set(graph["__init__"]) >= {"kafka", "postgres", "prism", "flink", "flink_cluster", "kafka_expansion"}


def test_no_import_cycle_in_devstack():
    graph = {module: _imported(module) for module in MODULES}
    cycle = _cycle(graph)
    assert not cycle, "import cycle in onceflow_dev/devstack: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"flink": {"kafka_expansion"}, "kafka_expansion": {"beam_java", "flink"}}) == [
        "flink", "kafka_expansion", "flink"]
    assert _cycle({"flink": {"kafka_expansion", "beam_java"}, "kafka_expansion": {"beam_java"}}) == []
