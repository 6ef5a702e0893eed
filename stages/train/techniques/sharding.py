"""Training across processes and machines (stages.train.distributed: the launcher, ddp,
zero1 and fsdp): the settings, the combinations no strategy can run, and auto-fit's moves to
a strategy that shards more. Wrapping the model and the per-rank dry run are the loop's and
the estimator's (stages.train.build, stages.train.estimate), since every rank runs them."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from stages.common.core.params import Section
from stages.train.distributed import Context, DistributedParams
from stages.train.techniques.base import Move, Technique

STRATEGIES = ("ddp", "zero1", "fsdp")  # each shards more than the one before


def batch_split_problem(p: Any, world: int) -> str | None:
    """Why `world` ranks cannot share each batch in whole micro-batches, or None."""
    from stages.train.techniques import rows_at_once

    rows = rows_at_once(p)
    if p.batch_size % (world * rows) == 0:
        return None
    return (f"batch_size ({p.batch_size}) must be a multiple of distributed.nproc x nnodes x "
            f"micro_batch_size ({world} x {rows}): each rank takes an equal share of the "
            f"batch in whole micro-batches")


class Fields(Section):
    distributed: DistributedParams = Field(default_factory=DistributedParams, description=(
        "train across processes and machines (torch.distributed, launched by torch's elastic launcher)"))


class Sharding(Technique):
    name = "distributed"
    Fields = Fields

    def refuse(self, p: Any) -> str | None:
        d = p.distributed
        if d.world_size == 1:
            return None
        if (problem := batch_split_problem(p, d.world_size)) is not None:
            return problem
        if d.strategy == "fsdp" and p.precision == "fp16":
            return "distributed.strategy fsdp: fp16's gradient scaler cannot see sharded gradients; use bf16"
        return None

    def world_problem(self, p: Any, world: int) -> str | None:
        return batch_split_problem(p, world)

    def no_checkpoints(self, p: Any, ctx: Context) -> str | None:
        if ctx.strategy == "fsdp":
            return "fsdp: no resume checkpoints (the stage saves and resumes ddp, zero1 and one-process runs)"
        return None

    def weight_shards(self, p: Any) -> int:
        return p.distributed.world_size if p.distributed.strategy == "fsdp" else 1

    def moves(self, p: Any) -> list[Move]:
        # sharding changes no number of the run, only what is communicated; bench/distributed
        # measured zero1 and fsdp at 1.03 and 1.39 x ddp's tokens/s on 2 CPU ranks: cost 1.0
        if p.distributed.world_size == 1:
            return []
        moves = []
        for strategy in STRATEGIES[STRATEGIES.index(p.distributed.strategy) + 1:]:
            if strategy != "fsdp" or not (p.prune.enabled or p.precision == "fp16"):
                moves.append(Move({"distributed.strategy": strategy}, 1.0))
        return moves

    def metrics(self, p: Any, model: torch.nn.Module, ctx: Context) -> dict[str, Any]:
        return {"dist_strategy": ctx.strategy, "dist_world_size": ctx.world}


TECHNIQUE = Sharding()
