"""The optimizer pieces every training loop shares (training and distillation): parameter
groups with weight decay on matrices only, the learning-rate schedule, and gradient clipping
that also handles a sparse gradient."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch


def param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: matrices with `weight_decay`, vectors (norms, biases) without."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def lr_at(step: int, lr: float, steps: int, warmup_steps: int,
          decay: Literal["cosine", "linear", "none"] = "none", min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up, then cosine or linear decay to min_lr_ratio × lr at the last step
    (or a constant lr with decay "none")."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if decay == "none" or steps <= warmup_steps:
        return lr
    progress = (step - warmup_steps) / max(1, steps - 1 - warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * shape)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(model: torch.nn.Module, max_norm: float) -> None:
    """Scale all gradients so their global L2 norm is at most max_norm. torch's
    clip_grad_norm_ does it when every gradient is dense; a sparse one (sparse_adam's
    embedding) has its norm taken on a coalesced copy, so that repeated rows add up first."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norms = []
    for p in params:
        if p.grad.is_sparse:
            norms.append(torch.linalg.vector_norm(p.grad.coalesce()._values()))
        else:
            norms.append(torch.linalg.vector_norm(p.grad))
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(scale)
