"""Mixed precision: the forward pass and loss under torch.autocast in bf16 or fp16, with a
gradient scaler for fp16 (whose narrow range would flush small gradients to zero). The
weights, gradients and optimizer state stay fp32; autocast keeps low-precision copies of
the weights it casts and computes the loss in fp32."""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from pydantic import Field

from stages.common.core.params import Section
from stages.train.techniques.base import Move, Technique

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Fields(Section):
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32 | bf16 (autocast: about half the activation bytes) | fp16 (autocast + "
                            "gradient scaler)")


class Precision(Technique):
    name = "precision"
    Fields = Fields
    grid = {"bf16 autocast": {"precision": "bf16"}}

    def forward_context(self, p: Any, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if p.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=DTYPES[p.precision])

    def gradient_scaler(self, p: Any, device: torch.device, dry_run: bool) -> torch.amp.GradScaler | None:
        # the dry run goes without it (a few bytes): its overflow check would need values
        return torch.amp.GradScaler(device.type, enabled=p.precision == "fp16" and not dry_run)

    def moves(self, p: Any) -> list[Move]:
        # bench/train_grid (docs/BENCHMARKS.md): bf16 ran 1.25 x the steps/s of fp32 on CPU at
        # 0.988 x its perplexity: cost 1.0
        return [Move({"precision": "bf16"}, 1.0)] if p.precision == "fp32" else []


TECHNIQUE = Precision()
