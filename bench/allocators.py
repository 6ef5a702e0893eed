"""The process's allocator: the same training and evaluation under glibc's malloc (default and
tuned), jemalloc and tcmalloc, side by side in one run, each in fresh processes.

    python -m bench.allocators [--steps 60] [--variants int8 prune50] [--out /tmp/lmmem-alloc]

Each setting runs `python -m stages train` (params.yaml's model and batch, `steps` steps, on
data/tokens) and `python -m stages evaluate` (the trained model and `variants` of
data/compressed), with the library loaded through LD_PRELOAD or glibc's tunables set in the
environment the stages start with (their workers inherit it):
- glibc: as it comes;
- glibc tuned: MALLOC_ARENA_MAX=2 (one arena per core instead of 8 per core), trim and mmap
  thresholds at 128 KiB fixed (freed memory goes back to the OS; large blocks are mapped);
- jemalloc: Debian's libjemalloc2;
- tcmalloc: Debian's libtcmalloc-minimal4.
Per setting: the training's peak RSS (the stage's metrics: the largest rank's, reset after
imports) and its wall time; evaluate's per-model peak RSS (each model's process, reset after
imports) and its wall time. A missing library is named and its rows skipped. A check that
each library is loaded (its path in /proc/self/maps) runs first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.common import ROOT, machine, params_file, run_stage

LIBS = Path("/usr/lib/x86_64-linux-gnu")
SETTINGS: dict[str, dict[str, str]] = {
    "glibc": {},
    "glibc tuned": {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": "131072"},
    "jemalloc": {"LD_PRELOAD": str(LIBS / "libjemalloc.so.2")},
    "tcmalloc": {"LD_PRELOAD": str(LIBS / "libtcmalloc_minimal.so.4")},
}


def loaded(env: dict[str, str]) -> bool:
    """The preloaded library is in a fresh interpreter's memory map."""
    lib = env.get("LD_PRELOAD")
    if lib is None:
        return True
    check = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"],
                           env={**os.environ, **env}, capture_output=True, text=True, check=False)
    return Path(lib).name in check.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", nargs="*", default=["int8", "prune50"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lmmem-alloc"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["train"]
    params = params_file(args.out, train={"steps": args.steps, "warmup_steps": min(10, args.steps - 1),
                                          "eval_every": args.steps, "checkpoint_every": args.steps,
                                          "prune": {**train["prune"], "start_step": 0, "end_step": args.steps - 1}},
                         evaluate={"variants": args.variants, "classify": False, "kv_cache_bits": []})
    print(f"machine: {machine()}; train {args.steps} steps, evaluate model + {', '.join(args.variants)}\n")
    print("| allocator | train peak RSS MiB | × glibc | train s | evaluate peak RSS MiB (largest model) | × glibc | "
          "evaluate s |")
    print("|---|---|---|---|---|---|---|")
    base: tuple[float, float] | None = None
    for name, env in SETTINGS.items():
        lib = env.get("LD_PRELOAD")
        if lib and not Path(lib).is_file():
            print(f"| {name} | not installed: {lib} | | | | | |")
            continue
        if not loaded(env):
            print(f"| {name} | {lib} did not load | | | | | |")
            continue
        out = args.out / name.replace(" ", "-")
        started = time.perf_counter()
        trained = run_stage("train", params, out, env, tokens=ROOT / "data/tokens", embed=ROOT / "data/warmstart",
                            out=out / "model", plots=out / "plots", checkpoints=out / "ckpt")
        train_s, started = time.perf_counter() - started, time.perf_counter()
        evaluated = run_stage("evaluate", params, out, env, model=out / "model", compressed=ROOT / "data/compressed",
                              tokens=ROOT / "data/tokens", embed=ROOT / "data/embed", out=out / "eval")
        eval_s = time.perf_counter() - started
        train_rss = trained["peak_rss_mib"]
        eval_rss = max(v for k, v in evaluated.items() if k.endswith("_rss_peak_mib"))
        base = base or (train_rss, eval_rss)
        print(f"| {name} | {train_rss:.1f} | {train_rss / base[0]:.3f} | {train_s:.1f} | {eval_rss:.1f} | "
              f"{eval_rss / base[1]:.3f} | {eval_s:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
