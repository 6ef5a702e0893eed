"""The shape of the code: no import circles between lmmem's modules (imports inside
functions included), read from the source by the same walker that sets the checkpoint
fingerprint and dvc.yaml's deps; and no module so long that a newcomer cannot find a
stage's logic in it."""

from __future__ import annotations

import re
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


def test_the_fault_catalog_names_a_test_that_exists_for_every_class() -> None:
    """docs/FAULTS.md: at least 60 classes of bad input and fault, each row naming the test
    that holds it; a renamed or deleted test fails here instead of leaving the row stale."""
    rows = re.findall(r"^\| \d+ \|.*$", (ROOT / "docs" / "FAULTS.md").read_text(encoding="utf-8"), re.M)
    assert len(rows) >= 60
    for row in rows:
        named = re.findall(r"(test_[a-z0-9_]+\.py)::(test_[a-z0-9_]+)", row)
        assert named, row
        for file, test in named:
            assert f"def {test}(" in (ROOT / "tests" / file).read_text(encoding="utf-8"), f"{file}::{test}"
