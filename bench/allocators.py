"""The process's allocator: the same training and evaluation under glibc's malloc (default and
tuned), jemalloc and tcmalloc, side by side in one run, each in fresh processes.

    python -m bench.allocators [--steps 60] [--variants int8 prune50] [--out /tmp/lmmem-alloc]

Why it is built this way: docs/design-notes.md, `bench.allocators`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from bench.common import ROOT, machine, params_file, run_stage
from stages.common.harness.malloc import NAMES, missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", nargs="*", default=["int8", "prune50"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lmmem-alloc"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["train"]
    print(f"machine: {machine()}; train {args.steps} steps, evaluate model + {', '.join(args.variants)}\n")
    print("| allocator | train peak RSS MiB | × glibc | train s | evaluate peak RSS MiB (largest model) | × "
          "glibc | evaluate s |")
    print("|---|---|---|---|---|---|---|")
    base: tuple[float, float] | None = None
    for name in NAMES:
        if problem := missing(name):
            print(f"| {name} | {problem} | | | | | |")
            continue
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        params = params_file(out, base={"allocator": name},
                             train={"steps": args.steps, "warmup_steps": min(10, args.steps - 1),
                                    "eval_every": args.steps, "checkpoint_every": args.steps,
                                    "prune": {**train["prune"], "start_step": 0, "end_step": args.steps - 1}},
                             evaluate={"variants": args.variants, "classify": False, "kv_cache_bits": []})
        started = time.perf_counter()
        trained = run_stage("train", params, out, tokens=ROOT / "data/tokens", embed=ROOT / "data/warmstart",
                            out=out / "model", plots=out / "plots", checkpoints=out / "ckpt")
        train_s, started = time.perf_counter() - started, time.perf_counter()
        evaluated = run_stage("evaluate", params, out, model=out / "model",
                              compressed=ROOT / "data/compressed",
                              tokens=ROOT / "data/tokens", embed=ROOT / "data/embed", out=out / "eval")
        eval_s = time.perf_counter() - started
        assert trained["allocator"] == evaluated["allocator"] == name, (trained["machine_allocator"], name)
        train_rss = trained["peak_rss_mib"]
        eval_rss = max(v for k, v in evaluated.items() if k.endswith("_rss_peak_mib"))
        base = base or (train_rss, eval_rss)
        print(f"| {name} | {train_rss:.1f} | {train_rss / base[0]:.3f} | {train_s:.1f} | {eval_rss:.1f} | "
              f"{eval_rss / base[1]:.3f} | {eval_s:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
