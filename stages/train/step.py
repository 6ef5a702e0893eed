"""One optimizer step and the validation loss: the arithmetic of training, the same for a
real run and the dry run."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from stages.common import distributed
from stages.common.errors import StageError
from stages.common.meter import TensorMeter
from stages.common.optim import clip_gradients
from stages.common.windows import Windows, next_token_loss
from stages.train.build import Parts, forward_context


def train_step(parts: Parts, rows: torch.Tensor, p: Any, device: torch.device, step: int,
               meter: TensorMeter | None) -> list[torch.Tensor]:
    """One optimizer step over `rows` (this rank's share of the batch, context + 1), in
    micro-batches; the meter, when given, watches each phase. Returns the micro-batches'
    (scaled-down) losses. Distributed, DDP averages the gradients over the ranks on the
    last micro-batch: the update is the one a single process makes on the whole batch."""
    model, optimizer, scaler = parts.model, parts.optimizer, parts.scaler

    def phase(name: str) -> contextlib.AbstractContextManager[Any]:
        return meter.phase(step, name) if meter is not None else contextlib.nullcontext()

    micros = rows.split(p.micro_batch_size)
    losses = []
    for i, micro in enumerate(micros):
        with distributed.no_sync(model, last=i + 1 == len(micros)):
            with phase("forward"):
                if meter is not None:
                    meter.track(micro, "activations")
                with forward_context(p, device):
                    loss = next_token_loss(model, micro) / len(micros)
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


@torch.no_grad()
def validation_loss(model: torch.nn.Module, windows: Windows, p: Any, device: torch.device) -> float:
    """Mean next-token loss on fixed validation windows: eval_batches × batch_size of them,
    the same whatever the micro-batch, run micro_batch_size at a time (its memory bound)."""
    model.eval()
    total, count = 0.0, 0
    for batch in windows.fixed_batches(p.eval_batches, p.batch_size):
        for rows in batch.split(p.micro_batch_size):
            with forward_context(p, device):
                loss = next_token_loss(model, rows.to(device))
            total += loss.item() * rows.size(0)
            count += rows.size(0)
    model.train()
    if count == 0:
        raise StageError("the validation split is shorter than one window: lower train.model.context")
    return total / count
