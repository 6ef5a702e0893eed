"""The shape of the code: no import circles between lmmem's modules (imports inside
functions included), read from the source by the same walker that sets the checkpoint
fingerprint and dvc.yaml's deps; and no module so long that a newcomer cannot find a
stage's logic in it."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import networkx as nx
import pytest

from stages.common.harness.code_files import ROOT, imported_modules


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
    # the walker sees real imports
    assert graph.has_edge("stages.compress.distill", "stages.common.modelling.windows")
    assert list(nx.simple_cycles(graph)) == []


def test_the_circle_check_can_fail() -> None:
    graph = import_graph()
    graph.add_edge("stages.common.modelling.windows", "stages.compress.distill")
    assert list(nx.simple_cycles(graph))


# stages/common's packages, bottom up: a package imports only from its own and lower layers
# (stages/common/__init__.py says what each holds), and nothing of stages/common imports a stage.
LAYERS = {"core": 0, "memory": 1, "text": 1, "modelling": 2, "weights": 3, "harness": 4}


def layer_violations(graph: nx.DiGraph) -> list[str]:
    found = []
    for source, target in graph.edges:
        if not source.startswith("stages.common.") or not target.startswith("stages."):
            continue
        low = source.split(".")[2]
        if target == "stages.__init__":  # the watcher every stage's process starts (stages/__init__.py)
            continue
        if not target.startswith("stages.common."):
            found.append(f"{source} imports the stage module {target}")
        elif (high := target.split(".")[2]) != low and LAYERS.get(high, 99) >= LAYERS.get(low, -1):
            found.append(f"{source} ({low}) imports {target} ({high})")
    return found


def test_each_common_package_imports_only_lower_layers() -> None:
    graph = import_graph()
    packages = {p.name for p in (ROOT / "stages" / "common").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS)  # a new package gets its layer here
    assert not [f for f in (ROOT / "stages" / "common").glob("*.py") if f.name != "__init__.py"]  # none loose
    assert graph.has_edge("stages.common.harness.stage", "stages.common.memory.rss_meter")
    assert layer_violations(graph) == []


def test_the_layer_check_can_fail() -> None:
    graph = import_graph()
    graph.add_edge("stages.common.core.params", "stages.common.modelling.models")
    graph.add_edge("stages.common.memory.timeline", "stages.common.text.records")
    graph.add_edge("stages.common.weights.quant", "stages.compress")
    assert len(layer_violations(graph)) == 3


MAX_FUNCTION_LINES = 60
DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def definitions(folders: tuple[str, ...]) -> Iterator[tuple[str, ast.AST]]:
    """Every module, class and function of `folders`, as ("path:name", node)."""
    for file in [f for folder in folders for f in (ROOT / folder).rglob("*.py")]:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, DEFINITIONS):
                yield f"{file.relative_to(ROOT).as_posix()}:{getattr(node, 'name', '<module>')}", node


def long_functions() -> dict[str, int]:
    """Functions (methods included) of stages/ and flows/ over MAX_FUNCTION_LINES, their
    decorators and docstrings counted."""
    found = {}
    for name, node in definitions(("stages", "flows")):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - min([node.lineno, *(d.lineno for d in node.decorator_list)]) + 1
            if lines > MAX_FUNCTION_LINES:
                found[name] = lines
    return found


def test_no_function_over_60_lines() -> None:
    assert long_functions() == {}


def test_the_function_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "MAX_FUNCTION_LINES", 50)
    assert "flows/sweep.py:sweep" in long_functions()


MAX_DOCSTRING_LINES = 17  # a docstring says what and why in a few lines; the reasons: docs/design-notes.md


def long_docstrings() -> dict[str, int]:
    """Docstrings (modules, classes, functions) of stages/, flows/ and bench/ over MAX_DOCSTRING_LINES."""
    found = {}
    for name, node in definitions(("stages", "flows", "bench")):
        doc = ast.get_docstring(node, clean=False)
        if doc and doc.count("\n") + 1 > MAX_DOCSTRING_LINES:
            found[name] = doc.count("\n") + 1
    return found


def test_no_docstring_over_17_lines() -> None:
    assert long_docstrings() == {}


def test_the_docstring_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "MAX_DOCSTRING_LINES", 10)
    assert "bench/portability.py:<module>" in long_docstrings()


MAX_LINES = 400


def long_modules() -> dict[str, int]:
    files = [f for folder in ("stages", "flows", "bench") for f in (ROOT / folder).rglob("*.py")]
    lines = {f.relative_to(ROOT).as_posix(): len(f.read_text(encoding="utf-8").splitlines()) for f in files}
    return {name: n for name, n in lines.items() if n > MAX_LINES}


def test_no_module_over_400_lines() -> None:
    assert long_modules() == {}


def test_the_length_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "MAX_LINES", 300)
    assert {"stages/compress/__init__.py", "stages/report/__init__.py"} <= set(long_modules())


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


IMPORT_CHECK = """
import importlib, json, os, sys
sys.orig_argv = json.loads(os.environ.pop("ORIG_ARGV", "null")) or sys.orig_argv
import torch
before, threads = dict(os.environ), torch.get_num_threads()
for name in ("stages.common.weights.loading", "stages.train", "stages.plan.dryrun", "stages.evaluate",
             "stages"):
    importlib.import_module(name)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"changed": changed, "threads": [threads, torch.get_num_threads()],
                  "watcher": sys.modules["stages"].WATCHER is not None}))
"""


def import_effects(tmp_path: Path, orig_argv: list[str] | None, allocator: str) -> dict:
    """Import lmmem's library modules in a fresh interpreter, in a folder whose params.yaml asks
    for pinned numerics and `allocator`, under DVC (DVC_STAGE set): what changed."""
    (tmp_path / "params.yaml").write_text(f"base:\n  portable: true\n  allocator: {allocator}\n",
                                          encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LMMEM_", "OMP_", "MKL_", "DNNL_", "ONEDNN_"))}
    env.update(PYTHONPATH=str(ROOT), DVC_STAGE="train", ORIG_ARGV=json.dumps(orig_argv))
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_lmmem_changes_no_variable_thread_count_or_allocator(tmp_path: Path) -> None:
    """A notebook's `from stages.common.weights.loading import load_model_folder` pins nothing,
    starts no watcher and executes nothing again; only a stage's own process does (below)."""
    found = import_effects(tmp_path, None, "jemalloc")  # a stage would execute itself again
    assert found == {"changed": [], "threads": [found["threads"][0]] * 2, "watcher": False}


def test_a_stage_process_is_pinned_on_the_same_import(tmp_path: Path) -> None:
    # as `python -m stages.train`
    found = import_effects(tmp_path, [sys.executable, "-m", "stages.train"], "glibc")
    assert {"LMMEM_PORTABLE", "OMP_NUM_THREADS",
            "LMMEM_WATCHED"} <= set(found["changed"]) and found["watcher"]
