"""Do two machines (or two CPU capabilities on one) give the same bytes? `run` clones this
repository (its committed HEAD) fresh, runs `dvc repro` of the tiny profile there and writes
the md5 of every file of every DVC output, stage by stage in the order DVC ran them, with
the machine and the environment it ran under; `compare` reads two such files and names the
first stage whose outputs differ (and every file that does).

    python -m bench.portability run --out here.json
    python -m bench.portability run --out other.json \\
        --env ATEN_CPU_CAPABILITY=default OPENBLAS_CORETYPE=Prescott
    python -m bench.portability compare here.json other.json
    python -m bench.portability run train --params params.yaml --out train.json \\
        --env ATEN_CPU_CAPABILITY=default
    python -m bench.portability lock train.json     # against the committed dvc.lock

Why it is built this way: docs/design-notes.md, `bench.portability`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, machine
from stages.common.harness.portable import cpu_model

RAN = re.compile(r"Running stage '([\w@-]+)'")


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def uncached(clone: Path, stages: list[str]) -> dict[str, set[str]]:
    """{stage: the outputs dvc.yaml declares `cache: false`}: metrics, plots and the report,
    which record each run's times (git keeps them; they are not the computation's bytes)."""
    declared = yaml.safe_load((clone / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    found: dict[str, set[str]] = {}
    for stage in stages:
        name, _, key = stage.partition("@")
        spec = declared[name].get("do", declared[name])
        paths = set()
        for kind in ("outs", "metrics", "plots"):
            for entry in spec.get(kind, []):
                if isinstance(entry, dict):
                    path, options = next(iter(entry.items()))
                    if isinstance(options, dict) and options.get("cache") is False:
                        paths.add(path.replace("${key}", key))
        found[stage] = paths
    return found


def lock_hashes(clone: Path) -> dict[str, dict[str, str]]:
    """{stage: {cached output path: DVC's md5}} of a checkout's dvc.lock."""
    stages = yaml.safe_load((clone / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    skip = uncached(clone, list(stages))
    return {stage: {o["path"]: o["md5"] for o in spec.get("outs", []) if o["path"] not in skip[stage]}
            for stage, spec in stages.items()}


def file_digests(clone: Path, paths: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for relative in paths:
        path = clone / relative
        if not path.exists():  # dvc.lock names it, the run left none: differs from any run that has it
            found[relative] = "missing"
            continue
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found.update({f.relative_to(clone).as_posix(): md5(f) for f in files})
    return found


def run(params: Path, env_extra: dict[str, str], work: Path, portable: bool,
        targets: list[str]) -> dict[str, Any]:
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    given = yaml.safe_load(params.read_text(encoding="utf-8"))
    given.setdefault("base", {})["portable"] = portable
    (clone / "params.yaml").write_text(yaml.safe_dump(given, allow_unicode=True, sort_keys=False),
                                       encoding="utf-8")
    env_bin = str(ROOT / ".venv" / "bin")
    (work / "warm").mkdir(exist_ok=True)
    started = time.perf_counter()
    env = {"PATH": f"{env_bin}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1", "HOME": str(work), **env_extra,
           "LMMEM_WARM_DIR": str(work / "warm")}  # a server of its own: the environment is the experiment
    done = subprocess.run([f"{env_bin}/dvc", "repro", *targets], cwd=clone, env=env, capture_output=True,
                          text=True,
                          check=False)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
        raise SystemExit("dvc repro failed")
    order = RAN.findall(done.stdout + done.stderr)
    outs = lock_hashes(clone)
    train = json.loads((clone / "data" / "metrics" / "train.json").read_text(encoding="utf-8"))
    return {"machine": machine(), "cpu": cpu_model(), "cpu_capability": train.get("machine_capability"),
            "blas": train.get("machine_blas"), "threads": train.get("machine_threads"), "portable": portable,
            "env": env_extra, "seconds": round(time.perf_counter() - started, 1),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                                     text=True, check=True).stdout.strip(),
            "stages": {stage: file_digests(clone, list(outs[stage])) for stage in order if stage in outs},
            "lock": {stage: outs[stage] for stage in order if stage in outs}}


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[str | None, dict[str, list[str]]]:
    """(the first stage, in a's order, whose output files differ; {stage: the files that differ})."""
    differ: dict[str, list[str]] = {}
    for stage, files in a["stages"].items():
        other = b["stages"].get(stage, {})
        changed = sorted(f for f in set(files) | set(other) if files.get(f) != other.get(f))
        if changed:
            differ[stage] = changed
    return next(iter(differ), None), differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the tiny pipeline in a fresh clone and write the md5 of its outputs")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--params", type=Path, default=ROOT / "tests" / "params.tiny.yaml")
    r.add_argument("--env", nargs="*", default=[], help="KEY=VALUE set for dvc repro (and so every stage)")
    r.add_argument("--portable", choices=("on", "off"), default="on", help="base.portable of the run")
    r.add_argument("targets", nargs="*", help="dvc repro's targets (default: the whole pipeline)")
    c = sub.add_parser("compare", help="name the first stage whose outputs differ between two runs")
    c.add_argument("first", type=Path)
    c.add_argument("second", type=Path)
    k = sub.add_parser("lock",
                       help="a run's outputs against the committed dvc.lock (run with --params params.yaml)")
    k.add_argument("run", type=Path)
    args = parser.parse_args()
    if args.command == "lock":
        ran = json.loads(args.run.read_text(encoding="utf-8"))
        committed = lock_hashes(ROOT)
        for stage, hashes in ran["lock"].items():
            same = committed.get(stage) == hashes
            print(f"{stage}: "
                  f"{'the committed bytes' if same else f'differs: {hashes} against {committed.get(stage)}'}")
        return 0 if all(committed.get(s) == h for s, h in ran["lock"].items()) else 1
    if args.command == "run":
        env_extra = dict(item.split("=", 1) for item in args.env)
        work = Path(tempfile.mkdtemp(prefix="lmmem-portability-"))
        try:
            result = run(args.params.resolve(), env_extra, work, args.portable == "on", args.targets)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        args.out.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        files = sum(len(f) for f in result["stages"].values())
        print(f"{len(result['stages'])} stages, {files} files: {args.out} "
              f"({result['cpu']}, capability {result['cpu_capability']}, portable {args.portable}, "
              f"env {env_extra or 'as is'}, {result['seconds']} s)")
        return 0
    a, b = (json.loads(p.read_text(encoding="utf-8")) for p in (args.first, args.second))
    first, differ = compare(a, b)
    for side, data in (("first", a), ("second", b)):
        print(f"{side}: {data['cpu']}, capability {data['cpu_capability']}, {data.get('blas')}, "
              f"{data.get('threads')} threads, portable {data.get('portable')}, env "
              f"{data['env'] or 'as is'}, "
              f"commit {data['commit']}")
    if first is None:
        print(f"the same bytes: every file of {len(a['stages'])} stages")
        return 0
    print(f"first stage whose outputs differ: {first}")
    for stage, files in differ.items():
        print(f"  {stage}: {', '.join(files[:6])}{' ...' if len(files) > 6 else ''}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
