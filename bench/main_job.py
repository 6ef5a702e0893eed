"""The main job's time: a fresh clone of this repository (its committed HEAD), `dvc repro` of
the whole pipeline in it, and per stage its wall time (from DVC's "Running stage" line to the
next: Python start-up, imports and DVC's hashing included) and its own seconds (from its
metrics file), with the total wall time. The foreach stages' items (compare@<name>, one per
configuration; finetune@<name> and adapt@<name>, one per method) are summed as one row each.

    python -m bench.main_job                                  # the default pipeline (make repro)
    python -m bench.main_job --params tests/params.tiny.yaml  # the tiny profile
    python -m bench.main_job --params tests/params.tiny.yaml --run-before 6503b04

`--params` copies a params file over the clone's params.yaml. `--run-before REF` also clones
REF and runs the same there, one after the other (never at once: they share the cores), and
prints both side by side; without it, the before column is REF's committed metrics seconds
(`--before`, default 6503b04: the pipeline before the train package and the faster compress
and evaluate). The clones use this checkout's .venv (the venv's creation is not the main
job's time) and DVC's cache in the clone only (nothing is fetched, so every stage runs).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ROOT, machine

STAGES = ["ingest", "clean", "tokenize", "embed", "warmstart", "train", "compare", "finetune", "domain",
          "adapt",
          "compress", "evaluate", "plan", "report"]
PER_ITEM = ("compare", "finetune", "adapt")  # foreach stages: one metrics file per item, summed as one row
STARTED = re.compile(r"Running stage '([\w@-]+)'")  # compare@<name>: one per configuration, summed as compare


@dataclass
class Run:
    wall: float = 0.0
    stage_wall: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def run_pipeline(work: Path, ref: str, params: Path | None) -> Run:
    """Clone `ref` into `work`, put `params` over its params.yaml, time `dvc repro`."""
    clone = work / f"lmmem-{ref}"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", ref], cwd=clone, check=True)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    if params is not None:
        shutil.copyfile(params, clone / "params.yaml")
    env_bin = str(ROOT / ".venv" / "bin")
    env = {"PATH": f"{env_bin}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1", "HOME": str(work)}
    run, marks, tail = Run(), [], []
    started = time.perf_counter()
    with subprocess.Popen([f"{env_bin}/dvc", "repro"], cwd=clone, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT,
                          text=True, env=env) as proc, (work / f"dvc-repro-{ref}.log").open("w") as log:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail = [*tail, line][-60:]
            if (found := STARTED.search(line)):
                marks.append((found.group(1), time.perf_counter()))
                print(f"  {time.perf_counter() - started:7.1f} s  {found.group(1)}", file=sys.stderr,
                      flush=True)
    run.wall = time.perf_counter() - started
    if proc.returncode != 0:
        print("".join(tail), file=sys.stderr)
        raise SystemExit(f"dvc repro of {ref} failed")
    ends = [t for _, t in marks[1:]] + [started + run.wall]
    for (name, begin), end in zip(marks, ends, strict=False):
        stage = name.split("@")[0]
        run.stage_wall[stage] = run.stage_wall.get(stage, 0.0) + end - begin
    for stage in STAGES:
        folder = clone / "data" / "metrics"
        files = sorted((folder / stage).glob("*.json")) if stage in PER_ITEM else [folder / f"{stage}.json"]
        found = [json.loads(f.read_text())["seconds"] for f in files if f.exists()]
        if found:
            run.stage_seconds[stage] = sum(found)
    return run


def committed_seconds(ref: str, stage: str) -> float | None:
    shown = subprocess.run(["git", "show", f"{ref}:data/metrics/{stage}.json"], cwd=ROOT, capture_output=True,
                           text=True, check=False)
    return json.loads(shown.stdout)["seconds"] if shown.returncode == 0 else None


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path,
                        help="a params file copied over params.yaml (e.g. tests/params.tiny.yaml)")
    parser.add_argument("--before", default="6503b04",
                        help="commit whose committed metrics are the before column")
    parser.add_argument("--run-before", metavar="REF", help="also clone and run REF, after this commit's run")
    parser.add_argument("--keep", action="store_true",
                        help="keep the clones and dvc repro's log (their folder is printed)")
    args = parser.parse_args()
    params = args.params.resolve() if args.params else None
    work = Path(tempfile.mkdtemp(prefix="lmmem-main-job-"))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    now = run_pipeline(work, head, params)
    before = run_pipeline(work, args.run_before, params) if args.run_before else None
    print(f"machine: {machine()}; params: {args.params or 'params.yaml'}; "
          f"clones: {work if args.keep else '(removed)'}\n")
    if before is not None:
        print(f"| stage | wall s ({head}) | own s ({head}) | wall s ({args.run_before}) | own s "
              f"({args.run_before}) |")
        print("|---|---|---|---|---|")
        for stage in STAGES:
            print(f"| {stage} | {cell(now.stage_wall.get(stage))} | {cell(now.stage_seconds.get(stage))} | "
                  f"{cell(before.stage_wall.get(stage))} | {cell(before.stage_seconds.get(stage))} |")
        print(f"| **dvc repro** | **{now.wall:.1f}** ({now.wall / 60:.1f} min) | | "
              f"**{before.wall:.1f}** ({before.wall / 60:.1f} min) | |")
    elif params is not None:  # the committed metrics are the default pipeline's: no before column
        print("| stage | wall s | own s |\n|---|---|---|")
        for stage in STAGES:
            print(f"| {stage} | {cell(now.stage_wall.get(stage))} | {cell(now.stage_seconds.get(stage))} |")
        print(f"| **dvc repro** | **{now.wall:.1f}** ({now.wall / 60:.1f} min) | |")
    else:
        print(f"| stage | wall s | own s | own s ({args.before}, committed) |")
        print("|---|---|---|---|")
        total_before = 0.0
        for stage in STAGES:
            was = committed_seconds(args.before, stage)
            total_before += was or 0.0
            print(f"| {stage} | {cell(now.stage_wall.get(stage))} | {cell(now.stage_seconds.get(stage))} | "
                  f"{cell(was)} |")
        print(
            f"| **dvc repro** | **{now.wall:.1f}** ({now.wall / 60:.1f} min) | | {total_before:.1f} (sum) |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
