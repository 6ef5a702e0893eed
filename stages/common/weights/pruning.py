"""Magnitude pruning: masks that zero the smallest weights of each matrix (the compress
stage's pruned variants, and the train stage's gradual pruning: stages.train.techniques.pruning).

Which weights: every matrix of the blocks (attention and MLP projections, LSTM gates); not
the embeddings, the output head or position tables, whose rows are looked up rather than
multiplied and whose zeros would erase whole words. Each matrix loses the same fraction
(its own smallest magnitudes, ties broken by position so the result is repeatable).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from stages.common.modelling.models import output_head


def prunable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The matrices pruning acts on: ≥ 2-D parameters that are not an embedding table, an
    output head (tied or not) or a position table. (A table held quantized and frozen has no
    weight parameter at all.)"""
    skip = {id(getattr(model.get_input_embeddings(), "weight", None))}
    head = output_head(model)
    if head is not None:
        skip.add(id(getattr(head, "weight", None)))
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            skip.add(id(module.weight))
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.dim() >= 2 and id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            yield name, p


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A boolean mask keeping all but the round(sparsity × n) smallest |weight| entries
    (ties: the earlier position is pruned first)."""
    n = weight.numel()
    k = round(sparsity * n)
    mask = torch.ones(n, dtype=torch.bool, device=weight.device)
    if k:
        order = torch.argsort(weight.detach().abs().flatten(), stable=True)
        mask[order[:k]] = False
    return mask.view_as(weight)


def zero_fraction(model: nn.Module) -> float:
    """Share of exact zeros among the prunable weights (what pruning achieved)."""
    zeros = total = 0
    for _, p in prunable(model):
        zeros += int((p.detach() == 0).sum())
        total += p.numel()
    return zeros / total if total else 0.0
