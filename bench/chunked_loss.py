"""The chunked loss (train.loss_chunk_tokens) against the standard cross-entropy on the default
model, side by side in one process.

    python -m bench.chunked_loss [--steps 12] [--repeats 3] [--chunks 128 256 512] [--tokens data/tokens]

1. The loss side alone, on the default batch (batch_size x context positions of the freshly
   initialised model's hidden states through its head): the tensor meter's peak of the bytes the loss makes
   from the hidden states to their gradient and the head weight's (the logits and their
   gradient, standard), the loss and the gradients' largest difference. Target: 90 % less.
2. Whole training steps (fp32 AdamW, params.yaml's train section): the meter's peak by
   category over the stage's metered steps, beside the dry run's estimate, for the standard
   loss and each chunk size.
3. Throughput: `steps` steps of the standard loss and of each chunk size, from the same
   initialisation on the same batches, alternating `repeats` times (drift of a shared machine
   hits all alike); the median step time of each, and the largest difference between their
   per-step losses. Target: 0.9 x the standard throughput or more.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import ROOT, machine, require_tokens, training_parser
from bench.step_speed import alternate
from stages import train as stage
from stages.common.core.params import load_params
from stages.common.core.schema import CATEGORIES, TokensMeta, mem_key, read_typed
from stages.common.memory.tensor_meter import TensorMeter
from stages.common.modelling.loss import chunked_cross_entropy, hidden_and_head
from stages.common.modelling.windows import Windows
from stages.train.build import build
from stages.train.estimate import predict_memory
from stages.train.step import train_step

log = logging.getLogger("bench.chunked_loss")
MIB = 2**20


def loss_side(model: torch.nn.Module, rows: torch.Tensor,
              chunk: int) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(peak MiB the loss side makes, loss, gradients of the hidden states and of the head weight)."""
    with torch.no_grad():
        hidden, head = hidden_and_head(model, rows[:, :-1])
    hidden = hidden.reshape(-1, hidden.size(-1)).clone().requires_grad_(True)
    weight = head.weight.detach().clone().requires_grad_(True)
    targets = rows[:, 1:].reshape(-1).clone()
    meter = TensorMeter()
    meter.track([hidden, targets], "activations")
    meter.track(weight, "parameters")
    inputs = sum(meter.current.values())
    with meter.phase(0, "forward"):
        loss = chunked_cross_entropy(hidden, weight, None, targets, chunk) if chunk else \
            F.cross_entropy(hidden @ weight.T, targets)
    with meter.phase(0, "backward"):
        loss.backward()
    return (meter.peak.total - inputs) / MIB, loss.item(), {"hidden": hidden.grad, "weight": weight.grad}


def metered_peak(p: Any, meta: TokensMeta, rows: torch.Tensor, seed: int) -> dict[str, float]:
    """The meter over the stage's metered steps (the dry run's: the second has the optimizer's state)."""
    parts = build(p, meta, torch.device("cpu"), seed)
    meter = TensorMeter()
    parts.track(meter)
    for step in range(max(2, p.meter_steps)):
        train_step(parts, rows.clone(), p, torch.device("cpu"), step, meter)
    meter.close()
    return meter.summary()


def main() -> int:
    parser = training_parser(__doc__, steps=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    tokens = require_tokens(args.tokens)
    base, params = load_params(ROOT / "params.yaml", "train", stage.Params)
    params = params.model_copy(update={"loss_chunk_tokens": 0})
    meta = read_typed(tokens / "meta.json", TokensMeta)
    windows = Windows(tokens / "train.bin", meta.dtype, params.model.context)
    rows = windows.batch(windows.random_starts(np.random.default_rng(base.seed), params.batch_size))
    configs = {0: params, **{c: params.model_copy(update={"loss_chunk_tokens": c}) for c in args.chunks}}
    name = {c: "standard" if c == 0 else f"chunk {c}" for c in configs}
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; model {params.model.family} "
          f"{params.model.layers} x {params.model.width}, vocabulary {meta.vocab_size:,}, batch "
          f"{params.batch_size} x {params.model.context} = {params.batch_size * params.model.context:,} "
          "positions\n")

    # 1. the loss side alone
    torch.manual_seed(base.seed)
    model = build(params, meta, torch.device("cpu"), base.seed).model
    side = {c: loss_side(model, rows, c) for c in configs}
    ref_mib, _, ref_grads = side[0]
    print("| loss side | peak MiB | x standard | loss | max abs. gradient difference (hidden, weight) |")
    print("|---|---|---|---|---|")
    for c, (mib, loss, g) in side.items():
        diff = ", ".join(f"{(g[k] - ref_grads[k]).abs().max().item():.1e}" for k in ("hidden", "weight"))
        print(f"| {name[c]} | {mib:,.1f} | {mib / ref_mib:.3f} | {loss:.6f} | {diff if c else '-'} |")

    # 2. a whole step's peak by category, measured and estimated
    print("\n| metered steps | " + " | ".join(f"{cat} (est.)" for cat in CATEGORIES) + " | total (est.) | "
          "largest estimate error |")
    print("|---|" + "---|" * (len(CATEGORIES) + 2))
    for c, p in configs.items():
        measured = metered_peak(p, meta, rows, base.seed)
        estimated = predict_memory(p, meta, torch.device("cpu"), base.seed)
        cells, worst = [], 0.0
        for cat in (*CATEGORIES, "total"):
            m, e = measured[mem_key(cat)], estimated[mem_key(cat, "est_")]
            worst = max(worst, abs(e - m) / m) if m else worst
            cells.append(f"{m:,.1f} ({e:,.1f})")
        print(f"| {name[c]} | " + " | ".join(cells) + f" | {worst:.2%} |")

    # 3. throughput, alternating, from the same initialisation on the same batches
    seconds, losses = alternate(configs, meta, windows, base.seed, args.steps, args.repeats)
    positions = params.batch_size * params.model.context
    ref_ms = statistics.median(seconds[0]) * 1000
    print(f"\n| {args.repeats} x {args.steps} steps | median ms/step | tokens/s | x standard | "
          "largest per-step loss difference |")
    print("|---|---|---|---|---|")
    for c in configs:
        ms = statistics.median(seconds[c]) * 1000
        diff = max(abs(a - b) for a, b in zip(losses[c], losses[0], strict=True))
        print(f"| {name[c]} | {ms:,.0f} | {positions / ms * 1000:,.0f} | {ref_ms / ms:.3f} | "
              f"{diff:.1e} |" if c
              else f"| standard | {ms:,.0f} | {positions / ms * 1000:,.0f} | 1.000 | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
