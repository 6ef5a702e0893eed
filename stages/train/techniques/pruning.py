"""Gradual magnitude pruning while training, on the schedule of Zhu & Gupta (2017, "To prune,
or not to prune"): the sparsity of every block matrix rises from start_step to end_step, so
the model can recover between prunings, and stays at the final sparsity after.

The masks exist from the start (one byte per prunable weight, counted as parameters by the
meter) and are applied after every optimizer step, so a pruned weight stays exactly zero;
the optimizer's state for it is kept but never takes effect. Which weights: see
stages.common.weights.pruning.prunable.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from stages.common.core.params import Section
from stages.common.weights.pruning import magnitude_mask, prunable, zero_fraction
from stages.train.distributed import Context
from stages.train.techniques.base import State, Technique


class PruneParams(Section):
    final_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "fraction of each matrix zeroed by end_step; 0 = no pruning (masks cost 1 byte per weight)"))
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0,
                                    description="sparsity at start_step, raised from there on a polynomial "
                                                "schedule")
    start_step: int = Field(20, ge=0, description="first pruning step")
    end_step: int = Field(150, ge=0, description=(
        "last pruning step (< steps): the remaining steps recover at the final sparsity"))
    every: int = Field(10, ge=1, description=(
        "steps between prunings: more often = smoother, each costs a sort per matrix"))
    power: float = Field(3.0, gt=0.0, description=(
        "schedule exponent: 3 prunes fast early, gently near end_step (Zhu & Gupta 2017)"))

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
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (
            1 - progress) ** self.power




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

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.masks  # one byte per prunable weight: model state, counted with the parameters

    def record(self) -> dict[str, float]:
        return {"sparsity": self.sparsity}

    def restore(self, tensors: dict[str, torch.Tensor], record: dict[str, float]) -> None:
        """Masks and sparsity from a checkpoint."""
        for name, mask in tensors.items():
            self.masks[name].copy_(mask)
        self.sparsity = record["sparsity"]


class Fields(Section):
    prune: PruneParams = Field(default_factory=PruneParams,
                               description="gradual magnitude pruning of the block matrices (not "
                                           "embeddings) while training")


class Pruning(Technique):
    name = "pruning"
    Fields = Fields
    columns = {"sparsity": 0.0}
    grid = {"pruning to 50 % (during the middle of training)": {"prune": {"final_sparsity": 0.5}}}

    def refuse(self, p: Any) -> str | None:
        if p.prune.enabled and p.prune.end_step >= p.steps:
            return (f"prune.end_step ({p.prune.end_step}) must be below steps ({p.steps}): "
                    f"the final sparsity would never be reached")
        if p.prune.enabled and p.distributed.world_size > 1 and p.distributed.strategy == "fsdp":
            return "distributed.strategy fsdp shards the weights that prune masks; prune with ddp or zero1"
        return None

    def prepare(self, model: nn.Module, p: Any, device: torch.device) -> State | None:
        if not p.prune.enabled:
            return None
        with device:
            return Pruner(p.prune, model)

    def metrics(self, p: Any, model: nn.Module, ctx: Context) -> dict[str, Any]:
        return {"prune_sparsity": zero_fraction(model)}


TECHNIQUE = Pruning()
