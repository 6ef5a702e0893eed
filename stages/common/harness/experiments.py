"""DVC experiments of the current commit, read from git (DVC keeps each experiment as a commit
under refs/exps/<baseline[:2]>/<baseline[2:]>/<name>), without taking DVC's repo lock: the
report stage runs inside `dvc repro`, and the flows read the same records."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def yaml_load(text: str) -> Any:
    """YAML as DVC reads it (ruamel, YAML 1.2: `5e-3` is a float), so that params compared
    with an experiment's compare like DVC's own."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def _git(root: Path, *args: str) -> str | None:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    return result.stdout if result.returncode == 0 else None


def head_revision(root: Path) -> str | None:
    out = _git(root, "rev-parse", "HEAD")
    return out.strip() if out else None


def experiment_records(root: Path, metrics_dir: str = "data/metrics") -> list[dict[str, Any]]:
    """This commit's experiments, sorted by name: {name, rev, params (params.yaml), metrics
    {path: figures} for every .json under metrics_dir, its folders included (a path relative
    to root)}."""
    head = head_revision(root)
    refs = _git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/") if head else None
    records = []
    for line in (refs or "").splitlines():
        refname, rev = line.split()
        parts = refname.split("/")  # refs, exps, ab, cdef..., name
        if len(parts) != 5 or parts[2] + parts[3] != head:
            continue
        text = _git(root, "show", f"{rev}:params.yaml")
        # -r: the foreach stages' metrics are in folders (data/metrics/finetune/<name>.json)
        listed = _git(root, "ls-tree", "-r", "--name-only", f"{rev}", f"{metrics_dir.rstrip('/')}/") or ""
        metrics = {}
        for file in sorted(f for f in listed.splitlines() if f.endswith(".json")):
            shown = _git(root, "show", f"{rev}:{file}")
            if shown:
                metrics[file] = json.loads(shown)
        records.append({"name": parts[4], "rev": rev, "params": yaml_load(text) if text else {},
                        "metrics": metrics})
    return sorted(records, key=lambda r: r["name"])
