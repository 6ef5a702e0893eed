"""What the OS counts for lmmem's multi-process stages: RSS, PSS and USS of every process, read
from /proc/<pid>/smaps_rollup while they run.

    python -m bench.process_memory [--steps 20] [--out /tmp/lmmem-procmem]

Two runs, each sampled every 0.2 s over the stage's whole process tree:
- tokenize with `tokenize.workers` 2 on data/clean (forked segmenting workers: jieba's
  dictionary and the interpreter are pages they share with the parent until written);
- train with `train.distributed.nproc` 2 (ddp, gloo, params.yaml's model for `steps` steps):
  the elastic launcher and two rank processes, each importing torch on its own.
Per process role: the largest RSS, PSS and USS seen; and at the sample where the tree's summed
RSS was largest, the summed RSS against the summed PSS (what the tree really takes: shared
pages counted once, split between their sharers) and the summed USS (what ending each process
alone would give back).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, machine, params_file
from stages.common.memory.mapped import smaps


def tree(root: int) -> list[int]:
    """`root` and every process below it (from each /proc/<pid>/stat's parent)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += [child for child, parent in parents.items() if parent == pid]
    return found


def role(pid: int, root: int, child: str) -> str:
    """The stage's own process, a helper multiprocessing starts, or one of its `child`ren
    (forked workers keep the stage's command line, so the tree tells them apart)."""
    if pid == root:
        return "stage"
    try:
        text = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0",
                                                                           b" ").decode(errors="replace")
    except OSError:
        return "gone"
    for helper in ("resource_tracker", "forkserver"):
        if helper in text:
            return helper.replace("_", " ")
    return child


def sampled(args: list[str], child: str, log: Path) -> dict[str, Any]:
    """Run a stage (its output to `log`), sampling its tree; the largest figures per role and
    at the summed peak."""
    with log.open("w") as out:
        stage = subprocess.Popen([sys.executable, "-m", f"stages.{args[0]}", *args[1:]], cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out,
                                 stderr=subprocess.STDOUT)
    return follow(stage, child, log)


def follow(stage: subprocess.Popen[bytes], child: str, log: Path) -> dict[str, Any]:
    roles: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    best: dict[str, float] = {"rss_mib": 0.0}
    while stage.poll() is None:
        sample = {"rss_mib": 0.0, "pss_mib": 0.0, "uss_mib": 0.0, "processes": 0}
        seen: dict[str, int] = {}
        for pid in tree(stage.pid):
            try:
                figures = smaps(pid)
            except (OSError, KeyError, ValueError):
                continue
            kind = role(pid, stage.pid, child)
            seen[kind] = seen.get(kind, 0) + 1
            mine = roles.setdefault(kind, {"rss_mib": 0.0, "pss_mib": 0.0, "uss_mib": 0.0})
            for key in mine:
                mine[key] = max(mine[key], figures[key])
                sample[key] += figures[key]
            sample["processes"] += 1
        for kind, n in seen.items():
            counts[kind] = max(counts.get(kind, 0), n)
        if sample["rss_mib"] > best["rss_mib"]:
            best = sample
        time.sleep(0.2)
    if stage.returncode != 0:
        raise SystemExit(f"{log.stem} failed: {log.read_text(errors='replace')[-2000:]}")
    return {"roles": roles, "counts": counts, "at_peak": best}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("/tmp/lmmem-procmem"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["train"]
    params = params_file(args.out, tokenize={"workers": 2},
                         train={"steps": args.steps, "warmup_steps": min(5, args.steps - 1),
                                "micro_batch_size": 4,
                                "eval_every": args.steps, "checkpoint_every": args.steps,
                                "prune": {**train["prune"], "start_step": 0, "end_step": args.steps - 1},
                                "distributed": {**train["distributed"], "nproc": 2}})
    runs = {
        ("tokenize, 2 workers",
         "worker"): ["tokenize", "--params", str(params), "--clean", "data/clean", "--out",
                     str(args.out / "tokens"), "--metrics", str(args.out / "tokenize.json")],
        ("train, 2 ranks (ddp)",
         "rank"): ["train", "--params", str(params), "--tokens", "data/tokens", "--embed",
                   "data/warmstart", "--out", str(args.out / "model"), "--plots",
                   str(args.out / "plots"), "--checkpoints", str(args.out / "ckpt"),
                   "--metrics", str(args.out / "train.json")],
    }
    print(f"machine: {machine()}; train {args.steps} steps\n")
    print("| run | process | count | largest RSS MiB | largest PSS MiB | largest USS MiB |")
    print("|---|---|---|---|---|---|")
    totals = []
    for (name, child), command in runs.items():
        found = sampled(command, child, args.out / f"{command[0]}.log")
        for kind, figures in sorted(found["roles"].items()):
            print(f"| {name} | {kind} | {found['counts'][kind]} | {figures['rss_mib']:.1f} | "
                  f"{figures['pss_mib']:.1f} | "
                  f"{figures['uss_mib']:.1f} |", flush=True)
        totals.append((name, found["at_peak"]))
    print("\nAt the sample where the tree's summed RSS was largest:\n")
    print("| run | processes | RSS summed | PSS summed | USS summed | PSS ÷ RSS |")
    print("|---|---|---|---|---|---|")
    for name, peak in totals:
        print(f"| {name} | {peak['processes']} | {peak['rss_mib']:.1f} | {peak['pss_mib']:.1f} | "
              f"{peak['uss_mib']:.1f} | "
              f"{peak['pss_mib'] / peak['rss_mib']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
