"""GaLore (the galore-torch package): AdamW whose two moments live in a low-rank projection
of each matrix's gradient. Every `galore_update_gap` steps an SVD of the gradient chooses
`galore_rank` directions; the moments are then rank x columns (or rows x rank) instead of
rows x columns, beside the projection matrix, and the update is projected back (scaled by
`galore_scale`). Norms and biases stay plain AdamW, and so does the embedding unless
`galore_embeddings` (GaLore's paper leaves it full; here it holds most of the parameters).

The projected matrices' moments: 2 x rank x max(rows, columns) x 4 B, plus the projection,
min(rows, columns) x rank x 4 B, against AdamW's 2 x rows x columns x 4 B."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from stages.common.core.params import Section
from stages.train.distributed import Context
from stages.train.techniques.base import Technique, trainable


class Fields(Section):
    galore_rank: int = Field(64, ge=1, description=(
        "galore_adamw: rank of each matrix's projected gradient: lower = less optimizer state, a coarser "
        "update"))
    galore_update_gap: int = Field(200, ge=1, description=(
        "galore_adamw: steps between the SVDs that choose each projection (one SVD per matrix, then reused)"))
    galore_scale: float = Field(0.25, gt=0.0, le=10.0,
                                description="galore_adamw: scale of the projected-back update")
    galore_embeddings: bool = Field(False, description=(
        "galore_adamw: project the embedding (and an untied head) too: most of this model's parameters, so "
        "most of the saving; false keeps them plain AdamW, as GaLore's paper does"))


def embedding_ids(model: torch.nn.Module) -> set[int]:
    """The embedding tables and an output head: the vocabulary-sized matrices."""
    ids = {id(q) for m in model.modules() if isinstance(m, torch.nn.Embedding) for q in m.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        ids |= {id(q) for q in head.parameters()}
    return ids


def compact_projections() -> None:
    """galore-torch keeps each projection as a slice of the SVD's factor (U[:, :rank] or
    Vh[:rank]), and a slice holds its whole factor's storage: min(rows, columns)^2 floats
    per matrix instead of rank x min(rows, columns). Its optimizer here makes projectors
    that keep a copy of the slice alone."""
    from galore_torch import adamw
    from galore_torch.galore_projector import GaLoreProjector

    class CompactProjector(GaLoreProjector):  # type: ignore[misc]
        def get_orthogonal_matrix(self, weights: torch.Tensor, rank: int, type: str) -> Any:
            found = super().get_orthogonal_matrix(weights, rank, type)
            return [m.clone() for m in found] if isinstance(found, list) else found.clone()

    if not issubclass(adamw.GaLoreProjector, GaLoreProjector) or adamw.GaLoreProjector is GaLoreProjector:
        adamw.GaLoreProjector = CompactProjector


class GaLore(Technique):
    name = "galore"
    Fields = Fields
    optimizers = ("galore_adamw",)
    grid = {"galore adamw (rank 64)": {"optimizer": "galore_adamw"}}

    def refuse(self, p: Any) -> str | None:
        if p.optimizer == "galore_adamw" and p.distributed.world_size > 1 and p.distributed.strategy != "ddp":
            return (f"optimizer galore_adamw with distributed.strategy {p.distributed.strategy}: GaLore's "
                    "SVD needs each matrix's whole gradient and its state is not sharded here; use ddp")
        return None

    def make_optimizer(self, p: Any, model: torch.nn.Module, ctx: Context,
                       dry_run: bool) -> torch.optim.Optimizer:
        from galore_torch import GaLoreAdamW

        compact_projections()

        params = trainable(model)
        skip = set() if p.galore_embeddings else embedding_ids(model)
        projected = [q for q in params if q.dim() == 2 and id(q) not in skip]
        galore = {"rank": p.galore_rank, "update_proj_gap": p.galore_update_gap, "scale": p.galore_scale,
                  "proj_type": "std"}
        groups = [{"params": projected, "weight_decay": p.weight_decay, **galore},
                  {"params": [q for q in params if q.dim() >= 2 and id(q) in skip],
                   "weight_decay": p.weight_decay},
                  {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}]
        return GaLoreAdamW([g for g in groups if g["params"]], lr=p.lr, no_deprecation_warning=True)


TECHNIQUE = GaLore()
