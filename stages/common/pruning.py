"""Magnitude pruning: masks that zero the smallest weights of each matrix, and the gradual
schedule of Zhu & Gupta (2017, "To prune, or not to prune") that raises the sparsity during
training so the model can recover between prunings.

Which weights: every matrix of the blocks (attention and MLP projections, LSTM gates); not
the embeddings, the output head or position tables, whose rows are looked up rather than
multiplied and whose zeros would erase whole words. Each matrix loses the same fraction
(its own smallest magnitudes, ties broken by position so the result is repeatable).

During training the masks exist from the start (one byte per prunable weight, counted as
parameters by the meter) and are applied after every optimizer step, so a pruned weight
stays exactly zero; the optimizer's state for it is kept but never takes effect.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import Field, model_validator
from torch import nn

from stages.common.models import output_head
from stages.common.params import Section


class PruneParams(Section):
    final_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    start_step: int = Field(0, ge=0)
    end_step: int = Field(0, ge=0)
    every: int = Field(10, ge=1)
    power: float = Field(3.0, gt=0.0)

    @model_validator(mode="after")
    def _schedule(self) -> PruneParams:
        if self.final_sparsity and self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity ({self.initial_sparsity}) is above final_sparsity "
                             f"({self.final_sparsity}): the schedule only raises sparsity")
        if self.final_sparsity and self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must come after start_step ({self.start_step})")
        return self

    @property
    def enabled(self) -> bool:
        return self.final_sparsity > 0.0

    def sparsity_at(self, step: int) -> float | None:
        """The sparsity to prune to at `step`, or None when `step` is not a pruning step:
        start_step, every `every` steps after it, and end_step. In between the cubic schedule
        s_f + (s_i - s_f)(1 - progress)^power prunes fast early and gently near the end."""
        if not self.enabled or step < self.start_step or step > self.end_step:
            return None
        if (step - self.start_step) % self.every and step != self.end_step:
            return None
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1 - progress) ** self.power


def prunable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The matrices pruning acts on: ≥ 2-D parameters that are not an embedding table, an
    output head (tied or not) or a position table."""
    skip = {id(model.get_input_embeddings().weight)}
    head = output_head(model)
    if head is not None:
        skip.add(id(head.weight))
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


class Pruner:
    """Gradual magnitude pruning of a model during training (see the module's docstring)."""

    def __init__(self, params: PruneParams, model: nn.Module) -> None:
        self.params = params
        self.targets = dict(prunable(model))
        self.masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in self.targets.items()}
        self.sparsity = 0.0  # of the masks in force

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Call after each optimizer step: prune further when the schedule says so, then zero
        the pruned weights (the optimizer has just moved them)."""
        target = self.params.sparsity_at(step)
        if target is not None and target > self.sparsity:
            for name, weight in self.targets.items():
                self.masks[name].copy_(magnitude_mask(weight, target))
            self.sparsity = target
        if self.sparsity:
            for name, weight in self.targets.items():
                weight.mul_(self.masks[name])

    def restore(self, masks: dict[str, torch.Tensor], sparsity: float) -> None:
        """Masks and sparsity from a checkpoint."""
        for name, mask in masks.items():
            self.masks[name].copy_(mask)
        self.sparsity = sparsity
