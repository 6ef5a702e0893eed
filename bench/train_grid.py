"""Training memory grid: each memory technique of the train stage on the default corpus and
model, measured by the tensor meter beside the dry-run estimate, in one run.

    python -m bench.train_grid [--steps 4] [--tokens data/tokens]

Each configuration trains `steps` optimizer steps (the first two metered) in a fresh process
from the same params.yaml with a few keys changed; tokens/s is timed on the unmetered steps,
so give at least 4. Reported per configuration: the meter's tensor peak by category, the
estimate's total and its error, peak RSS, tokens/s. Short runs measure memory, not quality:
validation loss after a few steps says nothing yet.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine, params_file, run_stage

log = logging.getLogger("bench.train_grid")

GRID: dict[str, dict[str, Any]] = {
    "fp32 adamw (baseline)": {},
    "bf16 autocast": {"precision": "bf16"},
    "activation checkpointing": {"activation_checkpointing": True},
    "micro-batch 4 (x4 accumulation)": {"micro_batch_size": 4},
    "micro-batch 1 (x16 accumulation)": {"micro_batch_size": 1},
    "sgd (momentum)": {"optimizer": "sgd"},
    "adafactor": {"optimizer": "adafactor"},
    "checkpointing + micro-batch 4 + adafactor": {"activation_checkpointing": True, "micro_batch_size": 4,
                                                   "optimizer": "adafactor"},
    "checkpointing + micro-batch 1 + adafactor": {"activation_checkpointing": True, "micro_batch_size": 1,
                                                   "optimizer": "adafactor"},
}
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tokens", type=Path, default=ROOT / "data" / "tokens")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (args.tokens / "meta.json").is_file():
        raise SystemExit(f"{args.tokens} has no tokens: run `dvc repro tokenize` first")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(GRID.items()):
            work = Path(tmp) / f"c{i}"
            work.mkdir()
            train = {"steps": args.steps, "meter_steps": 2, "eval_every": 10**6, "eval_batches": 1,
                     "checkpoint_every": 0, **overrides}
            params = params_file(work, train=train)
            log.info("%s ...", name)
            results[name] = run_stage("train", params, work, tokens=args.tokens, out=work / "model",
                                      plots=work / "plots", checkpoints=work / "ckpt")
    base = results["fp32 adamw (baseline)"]
    print(f"\nmachine: {machine()}; {args.steps} steps per configuration")
    print("| configuration | params | grads | optimizer | activations | temporaries | tensor peak MiB | "
          "× baseline | estimate MiB | estimate error | peak RSS MiB | tokens/s |")
    print("|---|" + "---|" * 11)
    worst = 0.0
    for name, m in results.items():
        cats = " | ".join(f"{m[f'mem_at_peak_{c}_mib']:.1f}" for c in CATEGORIES)
        error = m["est_error_total_peak_mib"]
        worst = max(worst, abs(error))
        print(f"| {name} | {cats} | {m['mem_total_peak_mib']:.1f} | "
              f"{m['mem_total_peak_mib'] / base['mem_total_peak_mib']:.3f} | {m['est_total_peak_mib']:.1f} | "
              f"{error:+.2%} | {m['peak_rss_mib']:.0f} | {m.get('tokens_per_sec', float('nan')):.0f} |")
    print(f"\ncategories are those at the moment of the tensor peak; largest estimate error {worst:.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
