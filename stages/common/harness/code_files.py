"""Which source files a piece of lmmem runs: the files of a module or package and, followed
through their `import stages...` statements (those inside functions too), every lmmem module
they reach. It is read from the code, not from what a process happened to import, so the
answer is the same in every process.

Used for the training checkpoint's fingerprint (a checkpoint made by other code is not
resumed) and by the test that holds dvc.yaml's deps to what each stage imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the repository: stages/ and flows/ live here


def module_files(name: str) -> list[Path]:
    """The files of module `name` (dotted): a module's file, or every file of a package."""
    base = ROOT / name.replace(".", "/")
    if base.is_dir():
        return sorted(base.rglob("*.py"))
    file = base.with_suffix(".py")
    return [file] if file.is_file() else []


def init_of(name: str) -> str:
    """What importing `name` itself runs: a package's __init__ (not its every module), a module."""
    return f"{name}.__init__" if (ROOT / name.replace(".", "/")).is_dir() else name


def imported_modules(path: Path) -> set[str]:
    """The lmmem modules a file imports (stages.* and flows.*), by dotted name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node,
                      ast.ImportFrom) and node.module and node.module.split(".")[0] in ("stages", "flows"):
            package = ROOT / node.module.replace(".", "/")
            for alias in node.names:  # `from stages.common.weights import quant` names a module
                sub = f"{node.module}.{alias.name}"
                named = (package / f"{alias.name}.py").is_file() or (package / alias.name).is_dir()
                # `from stages import WATCHER`: its __init__
                found.add(sub if named else init_of(node.module))
        elif isinstance(node, ast.Import):
            found |= {init_of(a.name) for a in node.names if a.name.split(".")[0] in ("stages", "flows")}
    return {m for m in found if module_files(m)}


def closure(*names: str) -> list[Path]:
    """Every source file the named modules (or packages, whole) run, theirs included."""
    files: set[Path] = set()
    todo = [f for name in names for f in module_files(name)]
    while todo:
        file = todo.pop()
        if file in files:
            continue
        files.add(file)
        for module in imported_modules(file):
            todo.extend(f for f in module_files(module) if f not in files)
    return sorted(files)
