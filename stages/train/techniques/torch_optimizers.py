"""torch's classic optimizers, by the state they keep per parameter: SGD with momentum (one
buffer), Adam and AdamW (two moments), Adagrad (one sum of squares), RMSprop (a square
average, plus a momentum buffer when momentum > 0)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from stages.common.core.params import Section
from stages.train.distributed import Context
from stages.train.techniques.base import Technique, standard_optimizer


class Fields(Section):
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd and rmsprop only")


class TorchOptimizers(Technique):
    name = "torch_optimizers"
    Fields = Fields
    optimizers = ("sgd", "adam", "adamw", "adagrad", "rmsprop")
    grid = {"sgd (momentum)": {"optimizer": "sgd"}}

    def make_optimizer(self, p: Any, model: torch.nn.Module, ctx: Context,
                       dry_run: bool) -> torch.optim.Optimizer:
        classes = {"sgd": (torch.optim.SGD, {"momentum": p.momentum}), "adam": (torch.optim.Adam, {}),
                   "adamw": (torch.optim.AdamW, {}), "adagrad": (torch.optim.Adagrad, {}),
                   "rmsprop": (torch.optim.RMSprop, {"momentum": p.momentum})}
        cls, kwargs = classes[p.optimizer]
        return standard_optimizer(cls, {"lr": p.lr, **kwargs}, p, model, ctx, dry_run)


TECHNIQUE = TorchOptimizers()
