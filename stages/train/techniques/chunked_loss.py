"""The chunked loss: the next-token cross-entropy over `loss_chunk_tokens` positions at a
time, its gradient computed in the same pass (stages.common.modelling.loss), so the (batch × context ×
vocabulary) logits and their gradient never exist whole. The loss and the gradients are the
standard ones (to rounding); the products are the same, none computed twice."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from pydantic import Field

from stages.common.core.params import Section
from stages.common.modelling.loss import chunked
from stages.train.techniques.base import Move, Technique


class Fields(Section):
    loss_chunk_tokens: int = Field(0, ge=0, description=(
        "0 = the whole batch x context x vocabulary logits at once | N = the loss over N positions at a "
        "time, gradient in the same pass: the logits never exist whole (N x vocabulary x 4 B), same loss"))


class ChunkedLoss(Technique):
    name = "chunked_loss"
    Fields = Fields
    grid = {"chunked loss (256 tokens)": {"loss_chunk_tokens": 256}}

    def refuse(self, p: Any) -> str | None:
        if p.loss_chunk_tokens and p.distributed.strategy == "fsdp" and p.distributed.world_size > 1:
            return ("loss_chunk_tokens: fsdp keeps the output head's weight sharded outside the model's "
                    "forward, where the chunked loss reads it; use ddp or zero1, or loss_chunk_tokens: 0")
        return None

    def forward_context(self, p: Any, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        return chunked(p.loss_chunk_tokens) if p.loss_chunk_tokens else contextlib.nullcontext()

    def moves(self, p: Any) -> list[Move]:
        # bench/chunked_loss and bench/step_speed (docs/BENCHMARKS.md): the same loss and
        # gradients, 1.28-1.42 x the standard throughput: cost 1.0 (moves are never below 1)
        return [Move({"loss_chunk_tokens": 256}, 1.0)] if not p.loss_chunk_tokens else []


TECHNIQUE = ChunkedLoss()
