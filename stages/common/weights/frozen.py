"""Frozen weights held quantized while other weights train through them (QLoRA's base):
int8 (one byte a weight, an fp32 scale per row) or NF4 (4-bit NormalFloat, QLoRA's data
type: 16 levels at the quantiles of a normal distribution, an fp32 absmax per block of 64
weights, two weights a byte: about 4.5 bits a weight).

Each layer dequantizes its weight for the product only and again in backward (a custom
autograd function saves the quantized weight, not a float copy), so what stays resident is
the quantized bytes. The gradient reaches the input, never the frozen weight.

Plain torch, no kernels of its own: the dry run traces it on fake tensors as it traces
everything else. (bitsandbytes' NF4 runs on this CPU too, but its parameters cannot be made
on fake tensors; docs/BENCHMARKS.md compares the two.)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Scheme = Literal["int8", "nf4"]
BLOCK = 64  # NF4 weights per absmax
# QLoRA's NF4 levels (Dettmers et al. 2023, as bitsandbytes has them)
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)


def nf4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 of numel/2, absmax fp32 of numel/BLOCK) of a weight whose size is a
    multiple of BLOCK: each weight the nearest level to weight / its block's absmax."""
    blocks = weight.detach().float().reshape(-1, BLOCK)
    absmax = blocks.abs().amax(1).clamp_min(1e-12)
    levels = torch.tensor(NF4, device=weight.device)
    codes = torch.empty(blocks.shape, dtype=torch.uint8, device=weight.device)
    for start in range(0, blocks.shape[0], 4096):  # a chunk at a time: the distances are 16 x its size
        chunk = blocks[start:start + 4096] / absmax[start:start + 4096, None]
        codes[start:start + 4096] = (chunk[..., None] - levels).abs().argmin(-1).to(torch.uint8)
    flat = codes.reshape(-1)
    return (flat[0::2] << 4) | flat[1::2], absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The float weight of `nf4_quantize`'s output, through a 256-entry table of byte pairs."""
    levels = torch.tensor(NF4, device=packed.device)
    pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)  # byte -> (high, low)
    values = pairs[packed.long()].reshape(-1, BLOCK) * absmax.reshape(-1, 1)
    return values.reshape(shape)


class _FrozenMatmul(torch.autograd.Function):
    """x @ W.T with W rebuilt from its quantized form in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: FrozenLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return x @ layer.dequantized().to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad @ ctx.layer.dequantized().to(grad.dtype), None


class FrozenLinear(nn.Module):
    """A Linear layer's frozen weight, quantized (`scheme`), with its bias (frozen, float)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: Scheme,
                 tied: FrozenEmbedding | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.scheme = scheme
        if tied is not None:  # the weight is an embedding's (tied): its quantized bytes, not a second copy
            packed, scale = tied.qweight, tied.scale
        elif scheme == "nf4":
            packed, scale = nf4_quantize(weight)
        else:
            scale = weight.detach().float().abs().amax(1).clamp_min(1e-12) / 127
            packed = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)

    def dequantized(self) -> torch.Tensor:
        if self.scheme == "nf4":
            return nf4_dequantize(self.qweight, self.scale, torch.Size((self.out_features, self.in_features)))
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenMatmul.apply(x, self)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


class FrozenEmbedding(nn.Module):
    """An embedding table, frozen and quantized per row (int8) or per block (NF4): a lookup
    dequantizes only the rows it reads."""

    def __init__(self, weight: torch.Tensor, scheme: Scheme, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.scheme, self.padding_idx = scheme, padding_idx
        if scheme == "nf4":  # blocks within a row, so that a row dequantizes alone
            packed, scale = nf4_quantize(weight)
            packed = packed.reshape(self.num_embeddings, -1)
            scale = scale.reshape(self.num_embeddings, -1)
        else:
            scale = weight.detach().float().abs().amax(1).clamp_min(1e-12) / 127
            packed = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", packed)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows, scale = self.qweight[ids], self.scale[ids]
        if self.scheme == "nf4":
            shape = torch.Size((*ids.shape, self.embedding_dim))
            return nf4_dequantize(rows.reshape(-1), scale.reshape(-1), shape)
        return rows.float() * scale.unsqueeze(-1)


def quantizable(weight: torch.Tensor, scheme: Scheme) -> bool:
    """NF4 needs each row in whole blocks (an embedding's rows dequantize one by one)."""
    return scheme == "int8" or weight.shape[-1] % BLOCK == 0


def freeze_quantized(model: nn.Module, scheme: Scheme, keep: tuple[str, ...]) -> dict[str, str]:
    """Swap every frozen nn.Linear and nn.Embedding of `model` (requires_grad off, its name not
    under a `keep` prefix) for its quantized form, in place. Returns {module name: what it
    became}; a layer NF4 cannot hold (rows not in blocks of 64) becomes int8, said there. An
    output layer tied to the input embedding keeps the tie: both read one quantized copy."""
    swapped: dict[str, str] = {}
    embeddings: dict[int, FrozenEmbedding] = {}  # id of the float weight -> its quantized embedding
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Embedding)) or any(name.startswith(k) for k in keep):
            continue
        if any(q.requires_grad for q in module.parameters()):
            continue
        used: Scheme = scheme if quantizable(module.weight, scheme) else "int8"
        if isinstance(module, nn.Linear):
            tied = embeddings.get(id(module.weight))
            new: nn.Module = FrozenLinear(module.weight, module.bias, tied.scheme if tied else used, tied)
        else:
            new = embeddings[id(module.weight)] = FrozenEmbedding(module.weight, used, module.padding_idx)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped[name] = used if used == scheme else f"int8 (its rows are not whole blocks of {BLOCK} for nf4)"
    return swapped

