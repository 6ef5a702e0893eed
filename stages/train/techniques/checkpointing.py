"""Activation checkpointing: each transformer block keeps only its input in the forward pass
and recomputes the rest during backward (transformers' activation checkpointing,
non-reentrant), on every block or every Nth.

Selective checkpointing (`activation_checkpointing_policy`) keeps some of a block's results
through torch's policy API (`torch.utils.checkpoint.create_selective_checkpoint_contexts`)
and recomputes only the rest: `save_matmuls` keeps every matrix product and attention output
and recomputes the cheap pointwise work (norms, SwiGLU/GELU, RoPE, residual adds);
`save_attention` keeps only the attention outputs (the one product whose cost grows with the
context squared). Between `full` and no checkpointing they draw the memory-recompute curve.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from pydantic import Field

from stages.common.core.params import Section
from stages.train.techniques.base import Move, State, Technique

aten = torch.ops.aten
ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten._scaled_dot_product_flash_attention.default,
             aten._scaled_dot_product_efficient_attention.default,
             aten._scaled_dot_product_cudnn_attention.default}
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
SAVED = {"save_attention": ATTENTION, "save_matmuls": ATTENTION | MATMULS}


class Fields(Section):
    activation_checkpointing: bool = Field(
        False,
        description="true: keep only block inputs, recompute the rest in backward (less memory, ~30% slower)")
    activation_checkpointing_every: int = Field(
        1, ge=1,
        description="checkpoint every Nth block only (1 = all): larger saves less memory, recomputes less")
    activation_checkpointing_policy: Literal["full", "save_attention", "save_matmuls"] = Field(
        "full", description=(
            "full: recompute the whole block | save_attention: keep attention outputs | save_matmuls: keep "
            "every matrix product, recompute only pointwise work (more memory than full, little recompute)"))


def _policy(saved: set[Any], ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(policy: str) -> dict[str, Any]:
    """torch.utils.checkpoint's keyword arguments for a policy."""
    if policy == "full":
        return {"use_reentrant": False}
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    context_fn = functools.partial(create_selective_checkpoint_contexts,
                                   functools.partial(_policy, SAVED[policy]))
    return {"use_reentrant": False, "context_fn": context_fn}


class Checkpointing(Technique):
    name = "activation_checkpointing"
    Fields = Fields
    grid = {"activation checkpointing": {"activation_checkpointing": True},
            "selective checkpointing (save matmuls)": {"activation_checkpointing": True,
                                                       "activation_checkpointing_policy": "save_matmuls"},
            "selective checkpointing (save attention)": {"activation_checkpointing": True,
                                                         "activation_checkpointing_policy": "save_attention"}}

    def refuse(self, p: Any) -> str | None:
        if p.activation_checkpointing and p.model.family == "lstm":
            return ("activation_checkpointing: the lstm baseline runs as one cuDNN/ATen op, "
                    "there are no layers to checkpoint; use llama or gpt2")
        if p.activation_checkpointing_policy != "full" and not p.activation_checkpointing:
            return (f"activation_checkpointing_policy {p.activation_checkpointing_policy} chooses what "
                    "checkpointing keeps: set activation_checkpointing: true, or the policy back to full")
        return None

    def prepare(self, model: torch.nn.Module, p: Any, device: torch.device) -> State | None:
        if p.activation_checkpointing:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=checkpoint_kwargs(p.activation_checkpointing_policy),
                every_n_layers=p.activation_checkpointing_every)
        return None

    def flops_factor(self, p: Any) -> float:
        return 4 / 3 if p.activation_checkpointing else 1.0  # the forward once more in the backward

    def moves(self, p: Any) -> list[Move]:
        # bench/train_grid: 0.855 x the baseline's tokens/s, the same perplexity (the same
        # products recomputed): cost 1.17
        if p.activation_checkpointing or p.model.family == "lstm":
            return []
        return [Move({"activation_checkpointing": True}, 1.17)]


TECHNIQUE = Checkpointing()
