"""The main job's time: a fresh clone of this repository (its committed HEAD), `dvc repro` of
the whole default pipeline in it, each stage's seconds (from its metrics file) and the total
wall time, beside the same figures of an earlier commit's metrics.

    python -m bench.main_job [--before REF] [--keep]

The clone uses this checkout's .venv (the venv's creation is not the main job's time) and
DVC's cache in the clone only (nothing is fetched from a remote, so every stage runs).
`--before` names the commit whose committed data/metrics/*.json give the "before" column
(default 6503b04: the pipeline before the train package and the faster compress and evaluate).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, machine

STAGES = ["ingest", "clean", "tokenize", "embed", "warmstart", "train", "compress", "evaluate", "report"]


def seconds_at(ref: str, stage: str) -> float | None:
    shown = subprocess.run(["git", "show", f"{ref}:data/metrics/{stage}.json"], cwd=ROOT, capture_output=True,
                           text=True, check=False)
    return json.loads(shown.stdout)["seconds"] if shown.returncode == 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="6503b04", help="commit whose committed metrics are the before column")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmmem-main-job-"))
    clone = work / "lmmem"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    env_bin = str(ROOT / ".venv" / "bin")
    started = time.perf_counter()
    result = subprocess.run([f"{env_bin}/dvc", "repro"], cwd=clone, capture_output=True, text=True, check=False,
                            env={"PATH": f"{env_bin}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1", "HOME": str(work)})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
        raise SystemExit("dvc repro failed")
    print(f"machine: {machine()}; clone {clone if args.keep else '(removed)'}\n")
    print(f"| stage | seconds | before ({args.before}) |")
    print("|---|---|---|")
    total_before = 0.0
    for stage in STAGES:
        now = json.loads((clone / "data" / "metrics" / f"{stage}.json").read_text())["seconds"]
        before = seconds_at(args.before, stage)
        total_before += before or 0.0
        print(f"| {stage} | {now:.1f} | {'-' if before is None else f'{before:.1f}'} |")
    print(f"| **dvc repro, wall** | **{wall:.1f}** ({wall / 60:.1f} min) | {total_before:.1f} (stages' sum) |")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
