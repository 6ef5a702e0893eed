"""Where a pipeline's time outside its stages goes: `dvc repro` of a profile in a fresh clone
of this repository's HEAD, under Python's profiler, its wall time split into DVC's parts
and the stages' commands, beside the stages' own seconds (their metrics files).

    python -m bench.orchestration [--params tests/params.tiny.yaml] [--keep]

Why it is built this way: docs/design-notes.md, `bench.orchestration`.
"""

from __future__ import annotations

import argparse
import json
import pstats
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, machine

PARTS = {  # label -> (file suffix, function) in DVC's code
    "the commands (shell, process, stage)": ("dvc/stage/run.py", "_run"),
    "checking what changed (hashes before)": ("dvc/stage/__init__.py", "changed"),
    "saving (hashes after, run cache)": ("dvc/stage/__init__.py", "save"),
    "committing outputs to the cache": ("dvc/stage/__init__.py", "commit"),
    "writing dvc.lock": ("dvc/stage/__init__.py", "dump"),
}


def cumulative(stats: pstats.Stats, suffix: str, function: str) -> tuple[float, int]:
    """Cumulative seconds and primitive calls of `function` in a file ending with `suffix`."""
    seconds, calls = 0.0, 0
    for (path, _line, name), (primitive, _total, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if name == function and path.endswith(suffix):
            seconds, calls = seconds + ct, calls + primitive
    return seconds, calls


def own_seconds(clone: Path) -> tuple[float, int]:
    """The stages' own seconds (every metrics file's `seconds`) and how many stages wrote one."""
    files = [f for f in (clone / "data" / "metrics").rglob("*.json")
             if "seconds" in json.loads(f.read_text())]
    return sum(json.loads(f.read_text())["seconds"] for f in files), len(files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("tests/params.tiny.yaml"))
    parser.add_argument("--keep", action="store_true",
                        help="keep the clone and the profile (their folder is printed)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmmem-orchestration-"))
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    shutil.copyfile(ROOT / args.params, clone / "params.yaml")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                          check=True).stdout.strip()
    venv = ROOT / ".venv" / "bin"
    env = {"PATH": f"{venv}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1", "HOME": str(work)}
    profile = work / "dvc-repro.prof"
    started = time.perf_counter()
    with (work / "dvc-repro.log").open("w") as log:
        code = subprocess.run([str(venv / "python"), "-m", "cProfile", "-o", str(profile), str(venv / "dvc"),
                               "repro"],
                              cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                              check=False).returncode
    wall = time.perf_counter() - started
    if code != 0:
        print((work / "dvc-repro.log").read_text()[-3000:])
        raise SystemExit(f"dvc repro failed ({code}); logs in {work}")
    stats = pstats.Stats(str(profile))
    own, stages = own_seconds(clone)
    print(f"machine: {machine()}; commit {head}; params {args.params}; {stages} stages; "
          f"{'kept in ' + str(work) if args.keep else 'clone removed'}\n")
    print("| part | seconds | per stage | share of the wall time |\n|---|---|---|---|")
    accounted = 0.0
    for label, (suffix, function) in PARTS.items():
        seconds, _calls = cumulative(stats, suffix, function)
        accounted += seconds
        print(f"| {label} | {seconds:,.1f} | {seconds / stages:,.2f} | {seconds / wall:.1%} |")
    print(f"| the rest of DVC (start, dvc.yaml, params, graph) | {wall - accounted:,.1f} | "
          f"{(wall - accounted) / stages:,.2f} | {(wall - accounted) / wall:.1%} |")
    commands, _ = cumulative(stats, *PARTS["the commands (shell, process, stage)"])
    print(f"| **dvc repro, wall** | **{wall:,.1f}** | {wall / stages:,.2f} | 100 % |")
    print(f"\nthe stages' own seconds: {own:,.1f}; inside the commands but outside them (shell, "
          f"interpreter, warm fork, harness): {commands - own:,.1f} s ({(commands - own) / stages:.2f} a "
          f"stage); wall / own: {wall / own:.2f} x (under the profiler: DVC's parts are slower than without "
          "it)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
