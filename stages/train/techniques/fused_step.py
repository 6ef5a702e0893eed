"""The optimizer step fused into backward: each parameter has an optimizer of its own (the
configured family, with its group's settings) that steps it the moment autograd has
accumulated its gradient, in a post-accumulate-grad hook, and the gradient is freed there.
So the gradients of all parameters are never alive together: the gradient peak is about the
largest parameter's (here the embedding), not the sum of all of them.

What it rules out is whatever needs every gradient before any step: gradient accumulation
over micro-batches, global-norm clipping, fp16's gradient scaler (it looks for inf in all
gradients first), data parallelism (it reduces gradients across processes after the hook
would have stepped) and sparse_adam (two optimizers split the model)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from pydantic import Field

from stages.common.core.params import Section
from stages.train.techniques.base import Technique


class Fields(Section):
    optimizer_in_backward: bool = Field(False, description=(
        "true: step each parameter as soon as its gradient is ready and free that gradient (the gradients "
        "are never all alive); needs grad_clip 0, micro_batch_size = batch_size, one process"))


class InBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped from backward. `step()` has nothing left to do;
    `param_groups` are the per-parameter optimizers' own (a learning rate set here reaches
    them) and `state` holds their state, so the loop, the meter and checkpoints see the
    optimizer they expect."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        cls, defaults = type(optimizer), dict(optimizer.defaults)
        accepted = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in defaults.items() if k in accepted}  # the group's settings override them
        self.inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        for group in optimizer.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for q in group["params"]:
                self.inner[q] = cls([{"params": [q], **settings}], **kwargs)
        super().__init__(list(self.inner), defaults)
        self.param_groups = [g for o in self.inner.values() for g in o.param_groups]
        self._handles = [q.register_post_accumulate_grad_hook(self._step_one) for q in self.inner]

    def _step_one(self, q: torch.Tensor) -> None:
        self.inner[q].step()
        q.grad = None
        self.state[q] = self.inner[q].state[q]
        for hook in list(self._optimizer_step_post_hooks.values()):  # the meter counts the new state now
            hook(self, (), {})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Every parameter stepped in backward already."""
        return None

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"per_parameter": [o.state_dict() for o in self.inner.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        saved = state_dict["per_parameter"]
        if len(saved) != len(self.inner):
            raise ValueError(f"the checkpoint holds {len(saved)} per-parameter optimizers, not "
                             f"{len(self.inner)}")
        for (q, o), s in zip(self.inner.items(), saved, strict=True):
            o.load_state_dict(s)
            if q in o.state:
                self.state[q] = o.state[q]
        self.param_groups = [g for o in self.inner.values() for g in o.param_groups]


class FusedStep(Technique):
    name = "optimizer_in_backward"
    Fields = Fields
    grid = {"optimizer step in backward": {"optimizer_in_backward": True, "grad_clip": 0.0}}

    def refuse(self, p: Any) -> str | None:
        if not p.optimizer_in_backward:
            return None
        if p.distributed.world_size > 1:
            return ("optimizer_in_backward: data parallelism reduces gradients across processes after the "
                    "step would have run; use one process")
        if p.micro_batch_size != p.batch_size:
            return ("optimizer_in_backward: each micro-batch's gradient would step on its own instead of "
                    "adding up; set micro_batch_size to batch_size")
        if p.grad_clip:
            return ("optimizer_in_backward: global-norm clipping needs every gradient at once, which is "
                    "never held; set grad_clip: 0")
        if p.precision == "fp16":
            return ("optimizer_in_backward: fp16's gradient scaler checks every gradient before any step; "
                    "use bf16")
        if p.optimizer == "sparse_adam":
            return "optimizer_in_backward: sparse_adam splits the model between two optimizers; use adamw"
        return None

    def wrap_optimizer(self, p: Any, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return InBackward(optimizer) if p.optimizer_in_backward else optimizer

    # no auto-fit move: measured it would cost 1.0 (bench/step_speed 1.04 x the throughput,
    # bench/train_grid --steps 30 0.995 x the perplexity without clipping), but auto-fit applies
    # moves cumulatively, and once made it would refuse every micro-batching move after it,
    # which saves far more


TECHNIQUE = FusedStep()
