"""Saved activations compressed or moved: what autograd keeps from the forward pass for the
backward pass goes through `torch.autograd.graph.saved_tensors_hooks`.

- bf16: each saved fp32 activation is kept as bf16 (half the bytes); backward reads it back
  as fp32, so the gradients carry bf16's rounding of what they are computed from.
- int8: kept as int8 with one fp32 scale per row of its last dimension (absmax / 127): about
  a quarter of the bytes, more rounding.
- cpu: kept in host memory (`torch.autograd.graph.save_on_cpu`, pinned) and brought back
  for backward: the accelerator holds none of them, at the price of two copies a step (the
  tensor meter counts the host copies too: read cuda_max_allocated_mib for the device). On
  a CPU there is no second memory to move them to: refused.

Parameters (and views of them, as a Linear layer saves its weight) pass through untouched:
copying a weight would add memory, not save it. Tensors under 64 KiB pass too: their
scale bookkeeping would cost more than it saves.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from pydantic import Field

from stages.common.core.errors import StageError
from stages.common.core.params import Section
from stages.train.techniques.base import Technique

SMALL = 1 << 16  # bytes: smaller saved tensors stay as they are


class Fields(Section):
    saved_activations: Literal["keep", "bf16", "int8", "cpu"] = Field("keep", description=(
        "keep: as computed | bf16: kept in bf16 for backward (half the bytes, rounding in the gradients) | "
        "int8: int8 with a scale per row (a quarter, more rounding) | cpu: in host memory (CUDA only)"))


def _passes(t: torch.Tensor) -> bool:
    """Left as it is: not a float32 activation worth packing (a parameter, a view of one, small)."""
    if t.dtype != torch.float32 or t.nbytes < SMALL:
        return True
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


def _pack_bf16(t: torch.Tensor) -> Any:
    return t if _passes(t) else ("bf16", t.to(torch.bfloat16))


def _pack_int8(t: torch.Tensor) -> Any:
    if _passes(t):
        return t
    scale = torch.linalg.vector_norm(t, ord=float("inf"), dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    return "int8", (t / scale).round_().to(torch.int8), scale


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    if packed[0] == "bf16":
        return packed[1].float()
    return packed[1].float() * packed[2]


class SavedActivations(Technique):
    name = "saved_activations"
    Fields = Fields
    grid = {"saved activations in bf16": {"saved_activations": "bf16"},
            "saved activations in int8": {"saved_activations": "int8"}}

    def start(self, p: Any, device: torch.device) -> dict[str, Any]:
        if p.saved_activations == "cpu" and device.type != "cuda":
            raise StageError("train.saved_activations cpu moves activations off an accelerator; on "
                             f"{device.type} "
                             "they are in host memory already: there is no second memory (use bf16 or int8)")
        return {}

    def forward_context(self, p: Any, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if p.saved_activations == "bf16":
            return torch.autograd.graph.saved_tensors_hooks(_pack_bf16, _unpack)
        if p.saved_activations == "int8":
            return torch.autograd.graph.saved_tensors_hooks(_pack_int8, _unpack)
        if p.saved_activations == "cpu" and device.type == "cuda":
            return torch.autograd.graph.save_on_cpu(pin_memory=True)
        return contextlib.nullcontext()


TECHNIQUE = SavedActivations()
