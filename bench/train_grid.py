"""Training memory grid: each memory technique of the train stage on the default corpus and
model, trained for the same number of optimizer steps, measured by the tensor meter beside
the dry-run estimate, in one run.

    python -m bench.train_grid [--steps 200] [--only NAME ...] [--tokens data/tokens]

Each configuration trains `steps` optimizer steps (the first two metered) in a fresh process
from the same params.yaml with a few keys changed, so validation perplexities compare (the
default 500 steps is params.yaml's run; give fewer steps to look at memory only). tokens/s
is timed on the unmetered steps. Reported per configuration: the meter's tensor peak by
category against the estimate's, the total and its error, peak RSS, tokens/s and the
validation perplexity, each beside the fp32 AdamW baseline.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from bench.common import machine, params_file, parse_training, run_training, training_parser
from stages.common.core.schema import CATEGORIES
from stages.train.techniques import REGISTRY

log = logging.getLogger("bench.train_grid")

BASELINE = "fp32 adamw (baseline)"
STACKS: dict[str, dict[str, Any]] = {
    "checkpointing + micro-batch 4 + 8-bit adamw": {"activation_checkpointing": True, "micro_batch_size": 4,
                                                    "optimizer": "adamw8bit"},
    "checkpointing + micro-batch 1 + adafactor": {"activation_checkpointing": True, "micro_batch_size": 1,
                                                  "optimizer": "adafactor"},
    "chunked loss + checkpointing + 8-bit adamw + step in backward": {
        "loss_chunk_tokens": 256, "activation_checkpointing": True, "optimizer": "adamw8bit",
        "optimizer_in_backward": True, "grad_clip": 0.0},
    "chunked loss + checkpointing + mlp in 4 tiles + 8-bit adamw + step in backward": {
        "loss_chunk_tokens": 256, "activation_checkpointing": True, "mlp_tiles": 4, "optimizer": "adamw8bit",
        "optimizer_in_backward": True, "grad_clip": 0.0},
    "chunked loss + checkpointing + micro-batch 4 + 8-bit adamw": {
        "loss_chunk_tokens": 256, "activation_checkpointing": True, "micro_batch_size": 4,
        "optimizer": "adamw8bit"},
}
# the baseline, each technique's own configurations (from the registry), then the stacks
GRID: dict[str, dict[str, Any]] = {BASELINE: {}, **{name: overrides for t in REGISTRY
                                                    for name, overrides in t.grid.items()},
                                   **STACKS}


def main() -> int:
    args = parse_training(training_parser(__doc__, steps=500, only=True))
    chosen = {name: o for name, o in GRID.items() if args.only is None or name == BASELINE
              or name in args.only}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(chosen.items()):
            work = Path(tmp) / f"c{i}"
            work.mkdir()
            train: dict[str, Any] = {"steps": args.steps, "meter_steps": 2, "checkpoint_every": 0,
                                     **overrides}
            if "prune" in overrides:  # keep the schedule inside shorter runs
                train["prune"] = {**overrides["prune"], "start_step": args.steps // 10,
                                  "end_step": max(args.steps // 10 + 1, args.steps * 3 // 4)}
            params = params_file(work, train=train)
            log.info("%s ...", name)
            results[name] = run_training(params, work, args.tokens)
    base = results[BASELINE]
    print(f"\nmachine: {machine()}; {args.steps} optimizer steps of params.yaml's batch per configuration")
    print("\nTensor peak and what came with it:\n")
    print("| configuration | tensor peak MiB | × baseline | estimate MiB | estimate error | peak RSS MiB | "
          "tokens/s | val ppl | × baseline |")
    print("|---|" + "---|" * 8)
    worst = 0.0
    for name, m in results.items():
        error = m["est_error_total_peak_mib"]
        worst = max(worst, abs(error))
        print(f"| {name} | {m['mem_total_peak_mib']:.1f} | "
              f"{m['mem_total_peak_mib'] / base['mem_total_peak_mib']:.3f} | "
              f"{m['est_total_peak_mib']:.1f} | {error:+.2%} | {m['peak_rss_mib']:.0f} | "
              f"{m.get('tokens_per_sec', math.nan):.0f} | {m['val_ppl']:.1f} | "
              f"{m['val_ppl'] / base['val_ppl']:.3f} |")
    print("\nEach category's own peak, measured / estimated (MiB):\n")
    print("| configuration | " + " | ".join(CATEGORIES) + " | largest category error |")
    print("|---|" + "---|" * (len(CATEGORIES) + 1))
    for name, m in results.items():
        cells = " | ".join(f"{m[f'mem_{c}_peak_mib']:.1f} / {m[f'est_{c}_peak_mib']:.1f}" for c in CATEGORIES)
        errors = [abs(m[f"est_error_{c}_peak_mib"]) for c in CATEGORIES if f"est_error_{c}_peak_mib" in m]
        print(f"| {name} | {cells} | {max(errors):.2%} |")
    print(f"\nlargest error of the estimated total tensor peak: {worst:.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
