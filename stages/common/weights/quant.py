"""Weight quantization modules whose quantized weights are plain tensors (int8, int4 packed
two per byte, fp32 scales) that safetensors stores and loads without pickles.

Why it is built this way: docs/design-notes.md, `stages.common.weights.quant`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from stages.common.modelling.models import output_head

Scheme = Literal["int8", "int8_dynamic", "int4"]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as out × in, bias) of an nn.Linear or a transformers Conv1D (stored in × out:
    the trap where a quantizer that looks only for nn.Linear silently skips GPT-2)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), module.bias.detach() if module.bias is not None else None
    return module.weight.detach().t(), module.bias.detach()


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight ≈ q × scale[:, None], q in [-127, 127]."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


EXACT_TERMS = 1040  # 127 × 127 × 1040 < 2^24: a sum of this many int8 × int8 products is exact in fp32


def int8_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M × K int8) @ b.T (b: N × K int8) as float: the exact integer sums, which
    `torch._int_mm(a, b.t()).float()` gives on CUDA (there it is that call). Not on CPU: with
    oneDNN capped below AVX-512 VNNI (base.portable caps it at AVX2) it saturates
    (bench/int_mm_isa.py). On CPU the same integers are multiplied in fp32, at most
    EXACT_TERMS of K at a time (every product and partial sum of values in [-127, 127] is an
    integer below 2^24, so exact in any order) and the pieces added in int32: the exact sums,
    where `torch._int_mm` ran 20 to 35 × slower than the fp32 product on a CPU
    without AVX-512 VNNI (docs/BENCHMARKS.md). The transient float copy of b is the one a
    weight-only layer makes too."""
    if a.is_cuda:
        return torch._int_mm(a, b.t()).float()
    total: torch.Tensor | None = None
    for start in range(0, a.shape[1], EXACT_TERMS):
        part = a[:, start:start + EXACT_TERMS].float() @ b[:, start:start + EXACT_TERMS].float().t()
        if start == 0 and a.shape[1] <= EXACT_TERMS:
            return part
        total = part.to(torch.int32) if total is None else total + part.to(torch.int32)
    assert total is not None, "an int8 product over zero features"
    return total.float()


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dynamic: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dynamic = in_features, out_features, dynamic
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, module: nn.Module, dynamic: bool) -> Int8Linear:
        weight, bias = linear_weight(module)
        out = cls(weight.shape[1], weight.shape[0], bias is not None, dynamic)
        out.qweight, out.scale = quantize_int8_rows(weight)
        if bias is not None:
            out.bias = bias.float().clone()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x2 = x.shape[:-1], x.reshape(-1, self.in_features).float()
        if self.dynamic:  # per-token int8 activations, the exact int8 x int8 product
            x_scale = x2.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
            xq = torch.round(x2 / x_scale).clamp(-127, 127).to(torch.int8)
            y = int8_product(xq, self.qweight) * x_scale * self.scale
        else:  # this layer's weight in float for the product only: a transient, not a resident copy
            y = x2 @ (self.qweight.float() * self.scale[:, None]).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("minimum", torch.zeros(out_features, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, module: nn.Module, group_size: int) -> Int4Linear:
        weight, bias = linear_weight(module)
        out_f, in_f = weight.shape
        if in_f % group_size:
            raise ValueError(f"{in_f} input features are not a multiple of group_size {group_size}")
        groups = weight.float().reshape(out_f, in_f // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = (high - low).clamp_min(1e-12) / 15
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(
            out_f, in_f)
        out = cls(in_f, out_f, bias is not None, group_size)
        out.packed = q[:, 0::2] | (q[:, 1::2] << 4)  # two 4-bit values per byte
        out.scale, out.minimum = scale, low
        if bias is not None:
            out.bias = bias.float().clone()
        return out

    def dequantized(self) -> torch.Tensor:
        q = torch.stack([self.packed & 15, self.packed >> 4], dim=-1).reshape(self.out_features, -1).float()
        groups = q.view(self.out_features, -1,
                        self.group_size) * self.scale[..., None] + self.minimum[..., None]
        return groups.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x2 = x.shape[:-1], x.reshape(-1, self.in_features).float()
        y = x2 @ self.dequantized().t()  # transient float weight of this layer only
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)


class Int8Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, module: nn.Embedding) -> Int8Embedding:
        out = cls(module.num_embeddings, module.embedding_dim)
        out.qweight, out.scale = quantize_int8_rows(module.weight.detach())
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)  # (..., dim)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, scheme: Scheme, embeddings: bool, group_size: int = 32
                   ) -> dict[str, dict[str, Any]]:
    """Replace every Linear/Conv1D (and, with `embeddings`, the input embedding and a tied
    head) by its quantized twin, in place. Returns {module name: how it was quantized}."""
    conv1d = _conv1d_type()
    kinds = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    record: dict[str, dict[str, Any]] = {}
    embedding = model.get_input_embeddings()
    head = output_head(model)
    tied = head is not None and head.weight is embedding.weight
    names = {id(m): n for n, m in model.named_modules()}
    if embeddings and isinstance(embedding, nn.Embedding):
        q = Int8Embedding.from_float(embedding)
        _set(model, names[id(embedding)], q)
        record[names[id(embedding)]] = {"kind": "int8_embedding",
                                        "shape": [q.num_embeddings, q.embedding_dim]}
        if tied:  # the head multiplies by the same int8 matrix
            qhead = Int8Linear(q.embedding_dim, q.num_embeddings, bias=False,
                               dynamic=scheme == "int8_dynamic")
            qhead.qweight, qhead.scale = q.qweight, q.scale
            _set(model, names[id(head)], qhead)
            record[names[id(head)]] = {"kind": "int8_tied_head", "shape": [q.num_embeddings, q.embedding_dim],
                                       "dynamic": qhead.dynamic, "tied_to": names[id(embedding)]}
    for name, module in list(model.named_modules()):
        if not isinstance(module, kinds) or name in record:
            continue
        if tied and module is head:
            continue  # tied to a float embedding: quantizing it would untie the two
        weight, bias = linear_weight(module)
        entry: dict[str, Any] = {"shape": list(weight.shape), "bias": bias is not None}
        if scheme == "int4":
            try:
                _set(model, name, Int4Linear.from_float(module, group_size))
                entry.update(kind="int4", group_size=group_size)
            except (RuntimeError, ValueError) as exc:  # a shape the int4 kernel refuses: int8 instead
                _set(model, name, Int8Linear.from_float(module, dynamic=False))
                entry.update(kind="int8", dynamic=False, fallback=str(exc).splitlines()[0])
        else:
            _set(model, name, Int8Linear.from_float(module, dynamic=scheme == "int8_dynamic"))
            entry.update(kind="int8", dynamic=scheme == "int8_dynamic")
        record[name] = entry
    return record


def skeleton(model: nn.Module, record: dict[str, dict[str, Any]]) -> None:
    """Swap in empty quantized modules as `record` (from quantize_model) says, ready for
    load_state_dict."""
    built: dict[str, nn.Module] = {}
    for name, entry in record.items():
        out_f, in_f = entry["shape"]
        match entry["kind"]:
            case "int8_embedding":
                module: nn.Module = Int8Embedding(out_f, in_f)
            case "int8_tied_head":
                module = Int8Linear(in_f, out_f, bias=False, dynamic=entry["dynamic"])
            case "int8":
                module = Int8Linear(in_f, out_f, entry["bias"], entry["dynamic"])
            case "int4":
                module = Int4Linear(in_f, out_f, entry["bias"], entry["group_size"])
            case other:
                raise ValueError(f"unknown quantized module kind {other!r}")
        built[name] = module
        _set(model, name, module)
    for name, entry in record.items():
        if entry["kind"] == "int8_tied_head":
            source = built[entry["tied_to"]]
            built[name].qweight, built[name].scale = source.qweight, source.scale
