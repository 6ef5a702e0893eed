"""The shape of the code: no import circles between lmmem's modules (imports inside
functions included), read from the source by the same walker that sets the checkpoint
fingerprint and dvc.yaml's deps; and no module so long that a newcomer cannot find a
stage's logic in it."""

from __future__ import annotations

import sys

import networkx as nx
import pytest

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
    assert graph.has_edge("stages.common.distill", "stages.common.windows")  # the walker sees real imports
    assert list(nx.simple_cycles(graph)) == []


def test_the_circle_check_can_fail() -> None:
    graph = import_graph()
    graph.add_edge("stages.common.windows", "stages.common.distill")
    assert list(nx.simple_cycles(graph))


MAX_LINES = 400


def long_modules() -> dict[str, int]:
    files = [f for folder in ("stages", "flows", "bench") for f in (ROOT / folder).rglob("*.py")]
    lines = {f.relative_to(ROOT).as_posix(): len(f.read_text(encoding="utf-8").splitlines()) for f in files}
    return {name: n for name, n in lines.items() if n > MAX_LINES}


def test_no_module_over_400_lines() -> None:
    assert long_modules() == {}


def test_the_length_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "MAX_LINES", 300)
    assert {"stages/compress.py", "stages/ingest.py", "stages/report.py"} <= set(long_modules())
