"""Adam-mini (the adam-mini package): Adam's first moment per parameter, but one second
moment per block instead of per parameter: per attention head for the query and key
matrices, per output neuron (row) for the value, output, MLP and embedding matrices, one
for each other tensor. The blocks come from the parameters' names (llama's q_proj, k_proj,
v_proj, o_proj, mlp, embed_tokens); a name it does not know is one block. State: about 4 B
per parameter against AdamW's 8."""

from __future__ import annotations

from typing import Any

import torch

from stages.train.distributed import Context
from stages.train.techniques.base import Technique


class AdamMini(Technique):
    name = "adam_mini"
    optimizers = ("adam_mini",)
    grid = {"adam-mini": {"optimizer": "adam_mini"}}

    def refuse(self, p: Any) -> str | None:
        if p.optimizer != "adam_mini":
            return None
        if p.distributed.world_size > 1:
            return ("optimizer adam_mini: one process only (it partitions by parameter name and reduces "
                    "across every GPU of the machine itself)")
        if p.optimizer_in_backward:
            return ("optimizer adam_mini with optimizer_in_backward: Adam-mini cannot be split into "
                    "per-parameter optimizers")
        return None

    def make_optimizer(self, p: Any, model: torch.nn.Module, ctx: Context,
                       dry_run: bool) -> torch.optim.Optimizer:
        from adam_mini import Adam_mini

        named = [(name, q) for name, q in model.named_parameters() if q.requires_grad]
        return Adam_mini(named, lr=p.lr, weight_decay=p.weight_decay, dim=p.model.width,
                         n_heads=p.model.heads,
                         n_kv_heads=p.model.key_value_heads(),
                         verbose=False)


TECHNIQUE = AdamMini()
