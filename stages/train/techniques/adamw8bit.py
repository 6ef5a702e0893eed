"""8-bit AdamW (bitsandbytes, which runs on CPU too): AdamW's two moments stored block-wise
quantized, one byte each per parameter plus an fp32 scale per 256-element block; tensors
under 4,096 elements keep fp32 moments."""

from __future__ import annotations

import logging
from typing import Any

import torch

from stages.train.distributed import Context
from stages.train.techniques.base import Move, Technique, standard_optimizer


class AdamW8bit(Technique):
    name = "adamw8bit"
    optimizers = ("adamw8bit",)
    grid = {"8-bit adamw": {"optimizer": "adamw8bit"}}

    def make_optimizer(self, p: Any, model: torch.nn.Module, ctx: Context,
                       dry_run: bool) -> torch.optim.Optimizer:
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # 4-bit kernels: unused
        import bitsandbytes

        return standard_optimizer(bitsandbytes.optim.AdamW8bit, {"lr": p.lr}, p, model, ctx, dry_run)

    def moves(self, p: Any) -> list[Move]:
        # bench/train_grid: 0.904 x AdamW's tokens/s, 1.044 x its perplexity after 100 steps: cost 1.16
        return [Move({"optimizer": "adamw8bit"}, 1.16)] if p.optimizer in ("adam", "adamw") else []


TECHNIQUE = AdamW8bit()
