"""Adafactor (torch's): the second moment of a matrix factored into a row and a column
vector, no first moment: almost no optimizer state, at a cost in quality at AdamW's
learning rate."""

from __future__ import annotations

from typing import Any

import torch

from stages.train.distributed import Context
from stages.train.techniques.base import Move, Technique, standard_optimizer


class Adafactor(Technique):
    name = "adafactor"
    optimizers = ("adafactor",)
    grid = {"adafactor": {"optimizer": "adafactor"}}

    def make_optimizer(self, p: Any, model: torch.nn.Module, ctx: Context,
                       dry_run: bool) -> torch.optim.Optimizer:
        return standard_optimizer(torch.optim.Adafactor, {"lr": p.lr}, p, model, ctx, dry_run)

    def moves(self, p: Any) -> list[Move]:
        # bench/train_grid: 0.944 x AdamW's tokens/s, 5.86 x its perplexity after 100 steps at
        # lr 0.003: cost 6.2, the last resort
        if p.optimizer in ("adam", "adamw", "adamw8bit", "adagrad", "rmsprop"):
            return [Move({"optimizer": "adafactor"}, 6.2)]
        return []


TECHNIQUE = Adafactor()
