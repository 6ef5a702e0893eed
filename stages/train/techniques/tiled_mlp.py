"""The MLP in tiles: each block's MLP runs over `mlp_tiles` pieces of the sequence, each
piece under its own (non-reentrant) activation checkpoint, so that the MLP's wide
intermediate results (gate, up, their product: batch x context x ffn_width each) exist for
one piece at a time and are recomputed, piece by piece, in backward. The MLP works on each
position alone, so the result is the same; the cost is the MLP's forward once more.

Inside a fully checkpointed block it shrinks what the block's recomputation holds during
backward, the largest workspace left once the logits are chunked; without checkpointing it
frees the MLP's saved activations (about two thirds of a llama block's)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from stages.common.core.params import Section
from stages.train.techniques.base import Move, State, Technique


class Fields(Section):
    mlp_tiles: int = Field(1, ge=1, le=64, description=(
        "1 = the MLP over the whole sequence | N = over N pieces of it, each recomputed in backward: its "
        "wide intermediates an Nth as large at a time, the MLP's forward run twice"))


def tile(mlp: torch.nn.Module, tiles: int, contiguous: bool = False) -> None:
    """Make `mlp` run over `tiles` pieces of the sequence (dim 1), each checkpointed.
    `contiguous`: each piece copied whole before the MLP (gpt2's Conv1D views its input as
    rows, which a piece of a batch of several sequences is not; the copy is a temporary of
    the piece, recomputed, not kept)."""
    from torch.utils.checkpoint import checkpoint

    whole = mlp.forward
    run = (lambda piece: whole(piece.contiguous())) if contiguous else whole

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or hidden.dim() != 3:
            return whole(hidden)
        pieces = hidden.chunk(tiles, dim=1)
        return torch.cat([checkpoint(run, piece, use_reentrant=False) for piece in pieces], dim=1)

    mlp.forward = forward  # type: ignore[method-assign]


class TiledMLP(Technique):
    name = "tiled_mlp"
    Fields = Fields
    grid = {"mlp in 4 tiles": {"mlp_tiles": 4}}

    def refuse(self, p: Any) -> str | None:
        if p.mlp_tiles > 1 and p.model.family == "lstm":
            return "mlp_tiles: the lstm baseline has no MLP; use llama or gpt2"
        if p.mlp_tiles > p.model.context:
            return f"mlp_tiles ({p.mlp_tiles}) is more than the context ({p.model.context} positions)"
        return None

    def prepare(self, model: torch.nn.Module, p: Any, device: torch.device) -> State | None:
        if p.mlp_tiles > 1:
            from stages.train.distributed import block_classes

            blocks = block_classes(model)
            for module in model.modules():
                if blocks and isinstance(module, blocks):
                    tile(module.mlp, p.mlp_tiles, contiguous=p.model.family == "gpt2")
        return None

    def moves(self, p: Any) -> list[Move]:
        # bench/step_speed: 0.926 x the baseline's throughput (the MLP's forward run twice), the
        # same perplexity (the same products): cost 1.08
        return [Move({"mlp_tiles": 4}, 1.08)] if p.mlp_tiles == 1 and p.model.family != "lstm" else []


TECHNIQUE = TiledMLP()
