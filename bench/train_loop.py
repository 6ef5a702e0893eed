"""The train stage against a bare PyTorch loop: what does the stage's machinery (meter hooks
switched off after the metered steps, micro-batch bookkeeping, schedule, checkpoints,
records) cost in throughput?

    python -m bench.train_loop [--steps 40] [--repeats 3] [--tokens data/tokens]

Both train the model of params.yaml on the same batches (the same seeded sampler) with the
same initialisation, AdamW groups, learning-rate schedule and gradient clipping, in this one
process and with the same threads; the stage and the loop alternate `repeats` times so that
drift of a shared machine hits both alike. The stage's step time is the median over its
unmetered steps after the first, as it reports it (tokens_per_sec in its metrics); the loop's
the median over the same steps. Because the computation is the same, the two final losses
must agree exactly: the benchmark checks that too. Target: stage ≥ 0.95 × the loop.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import ROOT, machine, require_tokens, training_parser
from stages import train as stage
from stages.common.core.params import load_params
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.modelling.models import build_model, logits_of
from stages.common.modelling.optim import lr_at
from stages.common.modelling.windows import Windows

log = logging.getLogger("bench.train_loop")


def bare_loop(params: stage.Params, tokens: Path, seed: int) -> tuple[list[float], float]:
    """The same training written as the shortest loop: step seconds and the last step's loss."""
    meta = read_typed(tokens / "meta.json", TokensMeta)
    windows = Windows(tokens / "train.bin", meta.dtype, params.model.context)
    torch.manual_seed(seed)
    model = build_model(params.model, meta.vocab_size, meta.special_ids.model_dump())
    model.train()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": params.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=params.lr)
    rng = np.random.default_rng(seed)
    seconds, loss_value = [], math.nan
    for step in range(params.steps):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, params.lr, params.steps, params.warmup_steps, params.decay,
                                params.min_lr_ratio)
        rows = windows.batch(windows.random_starts(rng, params.batch_size))
        logits = logits_of(model, rows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        seconds.append(time.perf_counter() - started)
    return seconds, loss_value


def main() -> int:
    parser = training_parser(__doc__, steps=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    require_tokens(args.tokens)
    base, params = load_params(ROOT / "params.yaml", "train", stage.Params)
    if params.optimizer != "adamw" or params.micro_batch_size != params.batch_size \
            or params.precision != "fp32" or params.activation_checkpointing or params.prune.enabled \
            or not params.grad_clip:
        raise SystemExit("the bare loop is fp32 AdamW, no accumulation, checkpointing or pruning, with "
                         "clipping: params.yaml's train section must be that")
    params = params.model_copy(update={"steps": args.steps, "checkpoint_every": 0, "eval_every": 10**6,
                                       "eval_batches": 1, "memory_budget_mib": 0.0})
    timed = slice(params.meter_steps + 1, None)  # the stage's timed steps: unmetered, after the first
    stage_ms: list[float] = []
    loop_ms: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            work = Path(tmp) / f"r{repeat}"
            paths = stage.Paths(tokens=args.tokens, embed=args.tokens.parent / "embed", out=work / "model",
                                plots=work / "plots", checkpoints=work / "ckpt")
            metrics = stage.run(params, paths, base)
            stage_ms.append(metrics["step_ms_median"])
            stage_loss = float((work / "plots" / "steps.csv").read_text().splitlines()[-1].split(",")[1])
            seconds, loop_loss = bare_loop(params, args.tokens, base.seed)
            loop_ms.append(statistics.median(seconds[timed]) * 1000)
            log.warning("repeat %d: stage %.1f ms/step, loop %.1f ms/step; last loss %.6g vs %.6g", repeat,
                        stage_ms[-1], loop_ms[-1], stage_loss, loop_loss)
            if f"{stage_loss:.6g}" != f"{loop_loss:.6g}":
                raise SystemExit(f"the stage and the loop diverged: last loss {stage_loss} vs {loop_loss}")
    tokens_per_step = params.batch_size * params.model.context
    s, b = statistics.median(stage_ms), statistics.median(loop_ms)
    print(f"\nmachine: {machine()}; torch threads {torch.get_num_threads()}; {args.steps} steps × "
          f"{args.repeats}")
    print("| | median ms/step | tokens/s |")
    print("|---|---|---|")
    print(f"| train stage | {s:.1f} | {tokens_per_step / s * 1000:.0f} |")
    print(f"| bare PyTorch loop | {b:.1f} | {tokens_per_step / b * 1000:.0f} |")
    print(f"\nstage / loop throughput: {b / s:.3f} (target ≥ 0.95); per repeat: "
          + ", ".join(f"{lm / sm:.3f}" for sm, lm in zip(stage_ms, loop_ms, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
