"""The shape of the code: no import circles between lmmem's modules (imports inside
functions included), read from the source by the same walker that sets the checkpoint
fingerprint and dvc.yaml's deps."""

from __future__ import annotations

import networkx as nx

from stages.common.sources import ROOT, imported_modules


def module_name(path: str) -> str:
    name = path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for folder in ("stages", "flows"):
        for file in (ROOT / folder).rglob("*.py"):
            source = module_name(file.relative_to(ROOT).as_posix())
            graph.add_node(source)
            for target in imported_modules(file):
                if target != source:
                    graph.add_edge(source, target)
    return graph


def test_no_import_circles() -> None:
    graph = import_graph()
    assert graph.number_of_nodes() > 40
    assert graph.has_edge("stages.compress", "stages.common.windows")  # the walker sees real imports
    assert list(nx.simple_cycles(graph)) == []


def test_the_circle_check_can_fail() -> None:
    graph = import_graph()
    graph.add_edge("stages.common.windows", "stages.compress")
    assert list(nx.simple_cycles(graph))
