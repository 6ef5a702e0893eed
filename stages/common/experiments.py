"""DVC experiments of the current commit, read from git (DVC keeps each experiment as a commit
under refs/exps/<baseline[:2]>/<baseline[2:]>/<name>), without taking DVC's repo lock: a
stage that runs inside `dvc repro` cannot open the repo through DVC."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml


def _git(root: Path, *args: str) -> str | None:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    return result.stdout if result.returncode == 0 else None


def head_revision(root: Path) -> str | None:
    out = _git(root, "rev-parse", "HEAD")
    return out.strip() if out else None


def experiment_records(root: Path, metric_files: list[str]) -> list[dict[str, Any]]:
    """This commit's experiments, sorted by name: {name, rev, params (params.yaml), metrics
    {file: figures}} (a file the experiment lacks is left out)."""
    head = head_revision(root)
    refs = _git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/") if head else None
    records = []
    for line in (refs or "").splitlines():
        refname, rev = line.split()
        parts = refname.split("/")  # refs, exps, ab, cdef..., name
        if len(parts) != 5 or parts[2] + parts[3] != head:
            continue
        text = _git(root, "show", f"{rev}:params.yaml")
        metrics = {}
        for file in metric_files:
            shown = _git(root, "show", f"{rev}:{file}")
            if shown:
                metrics[file] = json.loads(shown)
        records.append({"name": parts[4], "rev": rev, "params": yaml.safe_load(text) if text else {},
                        "metrics": metrics})
    return sorted(records, key=lambda r: r["name"])
