"""What a training run holds, built the same way for a real run and for the dry run: the
seeded model with every technique's changes, its distributed wrapper, the optimizer, the
gradient scaler and the techniques' running state."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stages.common.core.schema import TokensMeta
from stages.common.memory.tensor_meter import TensorMeter
from stages.train import distributed
from stages.train.distributed import Context
from stages.train.task import LanguageModelling, Task
from stages.train.techniques import REGISTRY, State, optimizer_family


@dataclass
class Parts:
    """The model (wrapped by the distributed strategy, if any), its optimizer, the gradient
    scaler (a no-op unless fp16) and each stateful technique's state. `raw` is the model
    without DDP's wrapper (FSDP shards the model in place, so there it is the model itself:
    what evaluation runs and rank 0 saves). `keep_grads`: gradients stay allocated between
    steps (DDP's gradient buckets)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    raw: torch.nn.Module
    task: Task
    states: dict[str, State] = field(default_factory=dict)
    keep_grads: bool = False

    def track(self, meter: TensorMeter) -> None:
        meter.track_model(self.model, self.task.param_category)
        meter.track_optimizer(self.optimizer)
        for state in self.states.values():
            meter.track(state.tensors(), "parameters")  # model state (pruning's masks)

    def after_step(self, step: int) -> None:
        for state in self.states.values():
            state.after_step(step)

    def record(self) -> dict[str, float]:
        """Each technique's per-step columns (their value when it is off where it has no state)."""
        out: dict[str, float] = {}
        for technique in REGISTRY:
            state = self.states.get(technique.name)
            out.update(state.record() if state is not None else technique.columns)
        return out


def forward_context(p: Any, device: torch.device) -> contextlib.ExitStack:
    """Every technique's context around a forward pass (autocast, for one)."""
    stack = contextlib.ExitStack()
    for technique in REGISTRY:
        stack.enter_context(technique.forward_context(p, device))
    return stack


def build(p: Any, meta: TokensMeta, device: torch.device, seed: int, ctx: Context = Context(),
          dry_run: bool = False, word2vec: np.ndarray | None = None, task: Task | None = None,
          mesh: Any = None) -> Parts:
    """The task's model (seeded; by default a language model, its input embedding from
    `word2vec` when given), each technique's changes, the distributed wrapper (a dry run only
    reshapes what one rank holds, except fsdp's on a fake process group's `mesh`), the
    optimizer of p.optimizer's family, and the gradient scaler."""
    task = task or LanguageModelling(meta, word2vec=word2vec, seed=seed)
    torch.manual_seed(seed)
    with device:  # made where it trains: no copy, and fake tensors cannot be moved
        model = task.make_model(p, dry_run)
    states = {}
    for technique in REGISTRY:
        if (state := technique.prepare(model, p, device)) is not None:
            states[technique.name] = state
    model.train()
    raw = model
    if ctx.enabled and (not dry_run or mesh is not None):
        model = distributed.wrap_model(model, ctx, device, mesh)
    optimizer = optimizer_family(p.optimizer).make_optimizer(p, model, ctx, dry_run)
    for technique in REGISTRY:
        optimizer = technique.wrap_optimizer(p, optimizer)
    scalers = [s for t in REGISTRY if (s := t.gradient_scaler(p, device, dry_run)) is not None]
    scaler = scalers[0] if scalers else torch.amp.GradScaler(device.type, enabled=False)
    # DDP's gradients are views of its buckets: kept between steps (zeroed, not freed), the
    # meter sees them where they live, and a dry run holds them as long
    return Parts(model, optimizer, scaler, raw, task, states,
                 keep_grads=ctx.enabled and ctx.strategy in ("ddp", "zero1"))


@dataclass
class Progress:
    """What a run accumulates step by step (and a checkpoint carries)."""

    rng: np.random.Generator
    records: list[dict[str, Any]] = field(default_factory=list)
    metered: list[dict[str, Any]] = field(default_factory=list)  # each rank's metered figures
    timeline: list[dict[str, Any]] = field(default_factory=list)  # this rank's peak step, module by module
    step_seconds: list[float] = field(default_factory=list)
    cuda_peak: float = 0.0
    cuda_reserved: float = 0.0
