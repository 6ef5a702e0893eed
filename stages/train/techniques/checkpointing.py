"""Activation checkpointing: each transformer block keeps only its input in the forward pass
and recomputes the rest during backward (transformers' gradient checkpointing, non-reentrant),
on every block or every Nth."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from stages.common.params import Section
from stages.train.techniques.base import Move, State, Technique


class Fields(Section):
    activation_checkpointing: bool = Field(
        False, description="true: keep only block inputs, recompute the rest in backward (less memory, ~30% slower)")
    activation_checkpointing_every: int = Field(
        1, ge=1, description="checkpoint every Nth block only (1 = all): larger saves less memory, recomputes less")


class Checkpointing(Technique):
    name = "activation_checkpointing"
    order = 40
    Fields = Fields
    grid = {"activation checkpointing": {"activation_checkpointing": True}}

    def refuse(self, p: Any) -> str | None:
        if p.activation_checkpointing and p.model.family == "lstm":
            return ("activation_checkpointing: the lstm baseline runs as one cuDNN/ATen op, "
                    "there are no layers to checkpoint; use llama or gpt2")
        return None

    def prepare(self, model: torch.nn.Module, p: Any, device: torch.device) -> State | None:
        if p.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                                  every_n_layers=p.activation_checkpointing_every)
        return None

    def moves(self, p: Any) -> list[Move]:
        # bench/train_grid: 0.855 x the baseline's tokens/s, the same perplexity (the same
        # products recomputed): cost 1.17
        if p.activation_checkpointing or p.model.family == "lstm":
            return []
        return [Move({"activation_checkpointing": True}, 1.17)]


TECHNIQUE = Checkpointing()
