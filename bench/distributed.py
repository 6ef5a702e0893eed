"""Sharding across processes: the train stage on the default corpus and model as one process,
then as 2 ranks with ddp, zero1 and fsdp (gloo on CPU), each rank's tensor memory by
category measured by the meter beside the estimator's prediction, in one run.

    python -m bench.distributed [--steps 20] [--nproc 2] [--tokens data/tokens]

Every configuration trains the same effective batch (16 windows: 2 micro-batches of 8 in one
process, one micro-batch of 8 per rank) for `steps` optimizer steps, the first two metered.
Reported: per rank the parameters, gradients and optimizer state and the total tensor peak,
measured / estimated; the saving of each rank's peak against ddp's measured peak; the
largest rank's peak RSS; the last training loss against the one-process run; tokens/s.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from bench.common import machine, params_file, require_tokens, run_stage, training_parser

log = logging.getLogger("bench.distributed")

SHARDED = ("parameters", "gradients", "optimizer")  # the categories a strategy shards


def main() -> int:
    parser = training_parser(__doc__, steps=20)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    require_tokens(args.tokens)
    micro = 16 // args.nproc
    configs: dict[str, dict[str, Any]] = {"one process": {}}
    for strategy in ("ddp", "zero1", "fsdp"):
        configs[strategy] = {"distributed": {"nproc": args.nproc, "strategy": strategy}}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(configs.items()):
            work = Path(tmp) / f"c{i}"
            work.mkdir()
            train = {"steps": args.steps, "warmup_steps": args.steps // 10, "meter_steps": 2,
                     "checkpoint_every": 0,
                     "eval_every": args.steps,
                     "batch_size": 16, "micro_batch_size": micro, **overrides}
            params = params_file(work, train=train)
            log.info("%s ...", name)
            results[name] = run_stage("train", params, work, tokens=args.tokens,
                                      embed=args.tokens.parent / "embed",
                                      out=work / "model", plots=work / "plots", checkpoints=work / "ckpt")
    single, ddp = results["one process"], results["ddp"]
    print(f"\nmachine: {machine()}; {args.steps} optimizer steps of 16 windows; {args.nproc} ranks (gloo)")
    print("\nPer rank, measured / estimated MiB:\n")
    print("| configuration | rank | " + " | ".join(SHARDED) + " | tensor peak | estimate error | "
          "× ddp's rank | peak RSS MiB |")
    print("|---|---|" + "---|" * (len(SHARDED) + 4))
    for name, m in results.items():
        ranks = range(args.nproc) if name != "one process" else [None]
        for rank in ranks:
            p = f"rank{rank}_" if rank is not None else ""
            cells = " | ".join(f"{m[f'{p}mem_{c}_peak_mib']:.2f} / {m[f'{p}est_{c}_peak_mib']:.2f}"
                               for c in SHARDED)
            total, est = m[f"{p}mem_total_peak_mib"], m[f"{p}est_total_peak_mib"]
            ratio = f"{total / ddp[f'rank{rank}_mem_total_peak_mib']:.3f}" if rank is not None else "-"
            rss = m[f"{p}peak_rss_mib"]
            print(f"| {name} | {'-' if rank is None else rank} | {cells} | {total:.1f} / {est:.1f} | "
                  f"{(est - total) / total:+.2%} | {ratio} | {rss:.0f} |")
    print("\nThe runs themselves:\n")
    print("| configuration | largest rank's tensor peak MiB | × one process | train loss (last 10) | "
          "Δ vs one process | val loss | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name, m in results.items():
        print(f"| {name} | {m['mem_total_peak_mib']:.1f} | "
              f"{m['mem_total_peak_mib'] / single['mem_total_peak_mib']:.3f} | "
              f"{m['train_loss']:.5f} | {m['train_loss'] - single['train_loss']:+.1e} | {m['val_loss']:.5f} "
              f"| {m.get('tokens_per_sec', math.nan):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
