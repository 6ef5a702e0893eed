"""Gradient accumulation: each batch runs as batch_size / micro_batch_size forward and
backward passes whose gradients add up before one optimizer step, so activations are held
for a micro-batch at a time while the effective batch stays batch_size. The step splits the
batch into rows of `rows_at_once` (stages.train.techniques.rows_at_once); this module owns the
setting, its checks and its auto-fit moves."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from stages.common.core.params import Section
from stages.train.distributed import Context
from stages.train.techniques.base import Move, Technique

# bench/train_grid: micro-batch 1 (four halvings of 16) ran at 0.694 x the baseline's
# tokens/s, the perplexity the same up to rounding: 1.095 x slower per halving
HALVING_COST = 1.095


class Fields(Section):
    micro_batch_size: int = Field(
        8, ge=1,
        description="sequences per forward/backward; smaller = less activation memory, more steps of "
                    "accumulation")


class MicroBatching(Technique):
    name = "micro_batching"
    Fields = Fields
    grid = {"micro-batch 4 (x4 accumulation)": {"micro_batch_size": 4},
            "micro-batch 1 (x16 accumulation)": {"micro_batch_size": 1}}

    def refuse(self, p: Any) -> str | None:
        if p.batch_size % p.micro_batch_size:
            return (f"batch_size ({p.batch_size}) must be a multiple of micro_batch_size "
                    f"({p.micro_batch_size}): the effective batch must stay the same")
        return None

    def rows_at_once(self, p: Any) -> int | None:
        return p.micro_batch_size

    def moves(self, p: Any) -> list[Move]:
        moves, micro, cost = [], p.micro_batch_size, 1.0
        while micro > 1 and micro % 2 == 0:
            micro //= 2
            cost *= HALVING_COST
            moves.append(Move({"micro_batch_size": micro}, cost))
        return moves

    def metrics(self, p: Any, model: torch.nn.Module, ctx: Context) -> dict[str, Any]:
        return {"accumulation_steps": p.batch_size // ctx.world // p.micro_batch_size}


TECHNIQUE = MicroBatching()
