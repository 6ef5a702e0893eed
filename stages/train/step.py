"""One optimizer step: the arithmetic of training, the same for a real run and the dry run,
whatever the task (its loss is the task's)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from stages.common.memory.tensor_meter import TensorMeter
from stages.common.modelling.optim import clip_gradients
from stages.train import distributed
from stages.train.build import Parts, forward_context
from stages.train.techniques import rows_at_once


def train_step(parts: Parts, rows: torch.Tensor, p: Any, device: torch.device, step: int,
               meter: TensorMeter | None) -> list[torch.Tensor]:
    """One optimizer step over `rows` (this rank's share of the batch, context + 1), in
    micro-batches; the meter, when given, watches each phase. Returns the micro-batches'
    (scaled-down) losses. Distributed, DDP averages the gradients over the ranks on the
    last micro-batch: the update is the one a single process makes on the whole batch."""
    model, optimizer, scaler = parts.model, parts.optimizer, parts.scaler

    def phase(name: str) -> contextlib.AbstractContextManager[Any]:
        return meter.phase(step, name) if meter is not None else contextlib.nullcontext()

    micros = rows.split(rows_at_once(p))
    losses = []
    for i, micro in enumerate(micros):
        with distributed.no_sync(model, last=i + 1 == len(micros)):
            with phase("forward"):
                if meter is not None:
                    meter.track(micro, "activations")
                with forward_context(p, device):
                    loss = parts.task.loss(model, micro) / len(micros)
            with phase("backward"):
                scaler.scale(loss).backward()
        losses.append(loss.detach())
        del loss
    with phase("optimizer"):
        if p.grad_clip:
            scaler.unscale_(optimizer)
            clip_gradients(model, p.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=not parts.keep_grads)
        parts.after_step(step)
    return losses
