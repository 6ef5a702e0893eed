"""How long a training run will take, said in its first log line: the model's floating-point
operations per step (6 per matrix weight per token: 2 forward, 4 backward; the attention
scores besides; the forward again under activation checkpointing; the validation passes),
over this machine's matmul speed measured for a fraction of a second, at the efficiency a
real training step reaches (measured on this repository's profiles, docs/BENCHMARKS.md).
Within a factor of two or so: enough to tell minutes from hours before they are spent."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from stages.train.techniques import flops_factor

log = logging.getLogger("lmmem.train")

EFFICIENCY = 0.5  # a training step's FLOP/s over a bare matmul's: 0.54 on the default model (BENCHMARKS.md)
HOURS = 3600.0


def matmul_flops(device: torch.device, seconds: float = 0.2) -> float:
    """This device's fp32 matmul speed in FLOP/s: 512 x 512 products for about `seconds`."""
    n = 512
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm
    count, started = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return 2 * n**3 * count / elapsed


def matmul_weights(model: torch.nn.Module) -> int:
    """Weights used in a matrix product per token: every matrix but the embedding table's
    lookup (a tied output head is a product: counted through the head)."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        total += sum(q.numel() for q in module.parameters(recurse=False) if q.dim() >= 2)
    return total


def step_flops(p: Any, model: torch.nn.Module, sequence: int = 0) -> float:
    """FLOPs of one optimizer step (all ranks together) on rows of `sequence` positions
    (default the model's context)."""
    m, sequence = p.model, sequence or p.model.context
    per_token = 6.0 * matmul_weights(model)
    if m.family != "lstm":
        per_token += 12.0 * m.layers * sequence * m.width  # scores and their weighted sum, forward and back
    per_token *= flops_factor(p)  # activation checkpointing: the forward once more in the backward
    return per_token * p.batch_size * sequence


def expected_seconds(p: Any, model: torch.nn.Module, device: torch.device,
                     sequence: int = 0) -> tuple[float, float]:
    """(seconds, measured matmul FLOP/s) of the whole run: its steps, and its validation
    passes (forward only: a third of a step's work per token)."""
    flops = matmul_flops(device)
    evaluations = p.steps // p.eval_every + 1
    one = step_flops(p, model, sequence)
    work = p.steps * one + evaluations * p.eval_batches * one / 3
    ranks = p.distributed.world_size if device.type == "cuda" else 1  # CPU ranks share this machine's cores
    return work / (flops * EFFICIENCY * ranks), flops


def say_duration(p: Any, model: torch.nn.Module, device: torch.device, sequence: int = 0,
                 stage: str = "train") -> float:
    """Log the expected duration (a warning when it is hours); returns the seconds."""
    seconds, flops = expected_seconds(p, model, device, sequence)
    text = f"{seconds / HOURS:.1f} hours" if seconds >= HOURS else f"{seconds / 60:.1f} min"
    line = (f"{stage}: {p.steps:,} steps of {p.batch_size} x {sequence or p.model.context} tokens: expected "
            f"to take about {text} here ({step_flops(p, model, sequence) / 1e9:,.1f} GFLOP a step, matmuls "
            f"measured at {flops / 1e9:,.0f} GFLOP/s)")
    if seconds >= HOURS:
        log.warning("%s", line)
    else:
        log.info("%s", line)
    return seconds
