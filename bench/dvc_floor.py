"""What a DVC stage costs before it does anything: `dvc repro` of a chain of N stages that
do nothing (`true`, or a Python interpreter that imports nothing), each with one dependency
and one output like lmmem's stages, in a fresh git + DVC repository, timed whole. The
per-stage figure is the floor under each stage of the pipeline, whatever the stage does.

    python -m bench.dvc_floor [--stages 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import ROOT, machine


def chain(repo: Path, n: int, command: str) -> None:
    """dvc.yaml of `n` stages s0..s{n-1}: s{i} reads s{i-1}'s output and writes its own."""
    stages = {}
    for i in range(n):
        source, file = (f"out/s{i - 1}", f"out/s{i - 1}/x") if i else ("seed.txt", "seed.txt")
        stages[f"s{i}"] = {"cmd": f"{command} && mkdir -p out/s{i} && cp {file} out/s{i}/x",
                           "deps": [source], "outs": [f"out/s{i}"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))


def timed_repro(n: int, command: str, work: Path) -> float:
    repo = work / f"repo-{len(list(work.iterdir()))}"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b.invalid",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b.invalid",
           "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(args, cwd=repo, env=env, check=True)
    (repo / "seed.txt").write_text("seed\n")
    chain(repo, n, command)
    started = time.perf_counter()
    subprocess.run(["dvc", "repro", "-q"], cwd=repo, env=env, check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmmem-dvc-floor-"))
    try:
        rows = []
        for label, command in (("true", "true"), ("python -c pass", f"{sys.executable} -c pass")):
            seconds = timed_repro(args.stages, command, work)
            rows.append((label, seconds, seconds / args.stages))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {machine()}; a chain of {args.stages} stages, `dvc repro` of a fresh repository\n")
    print("| each stage runs | dvc repro s | s per stage |\n|---|---|---|")
    for label, seconds, per in rows:
        print(f"| {label} | {seconds:.1f} | {per:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
