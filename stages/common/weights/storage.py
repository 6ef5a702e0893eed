"""Weights on disk at their real size: each tensor of a state dict stored in the smallest of
three encodings, in one safetensors file (no pickles), with what is needed to decode it in
the file's metadata.

- dense: the tensor as it is;
- bitmask: one bit per element saying "non-zero", then the non-zero values in order:
  n/8 + nnz × itemsize bytes (pays from about 1/8 sparsity for fp32, 1/4 for int8... up
  to the density where values dominate);
- csr (matrices): row offsets, column indices (int16 when the matrix has under 32,768
  columns) and the non-zero values: pays at high sparsity.
Zeros in a dense tensor do not shrink a file; these encodings do. Tensors that share
storage (tied embeddings) are written once and recorded as aliases.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

META_KEY = "lmmem_encoding"


def _encodings(t: torch.Tensor) -> dict[str, int]:
    """Bytes each encoding would take."""
    n, item = t.numel(), t.element_size()
    nnz = int(torch.count_nonzero(t)) if n else 0
    sizes = {"dense": n * item, "bitmask": math.ceil(n / 8) + nnz * item}
    if t.dim() == 2:
        col = 2 if t.shape[1] < 2**15 else 4
        sizes["csr"] = (t.shape[0] + 1) * 8 + nnz * (col + item)
    return sizes


def encode(name: str, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to store for `t` under keys starting with `name`, and how to decode them."""
    t = t.detach().contiguous().cpu()
    sizes = _encodings(t)
    kind = min(sizes, key=lambda k: (sizes[k], k != "dense"))  # dense on a tie
    info = {"format": kind, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if kind == "dense":
        return {name: t}, info
    if kind == "bitmask":
        flat = t.reshape(-1)
        nonzero = flat != 0
        bits = torch.from_numpy(np.packbits(nonzero.numpy()))
        return {f"{name}::mask": bits, f"{name}::values": flat[nonzero].clone()}, info
    sparse = t.to_sparse_csr()
    cols = sparse.col_indices().to(torch.int16 if t.shape[1] < 2**15 else torch.int32)
    return {f"{name}::crow": sparse.crow_indices().to(torch.int64), f"{name}::col": cols,
            f"{name}::values": sparse.values().clone()}, info


def decode(name: str, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    shape, kind = info["shape"], info["format"]
    dtype = getattr(torch, info["dtype"])
    if kind == "dense":
        return tensors[name]
    if kind == "bitmask":
        n = math.prod(shape)
        nonzero = torch.from_numpy(np.unpackbits(tensors[f"{name}::mask"].numpy(), count=n).astype(bool))
        flat = torch.zeros(n, dtype=dtype)
        flat[nonzero] = tensors[f"{name}::values"]
        return flat.reshape(shape)
    if kind == "csr":
        crow, col, values = tensors[f"{name}::crow"], tensors[f"{name}::col"].to(torch.int64), tensors[
            f"{name}::values"]
        return torch.sparse_csr_tensor(crow, col, values, size=shape).to_dense()
    raise ValueError(f"{name}: unknown encoding {kind!r}")


def save_state(state: dict[str, torch.Tensor], path: Path) -> dict[str, int]:
    """Write a state dict in the smallest encoding per tensor; returns how many tensors took
    each encoding."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"tensors": {}, "aliases": {}}
    first_of: dict[tuple[int, int, tuple[int, ...]], str] = {}
    counts: dict[str, int] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in first_of:  # shared with an earlier tensor (tied weights): store once
            meta["aliases"][name] = first_of[key]
            continue
        first_of[key] = name
        parts, info = encode(name, t)
        tensors.update(parts)
        meta["tensors"][name] = info
        counts[info["format"]] = counts.get(info["format"], 0) + 1
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    return counts


def load_state(path: Path, mapped: bool = False) -> dict[str, torch.Tensor]:
    """Read a file written by save_state back into a dense state dict (aliases included);
    `mapped`: each tensor stored dense is a view of a private mapping of the file
    (stages/common/memory/mapped.py: nothing read, pages shared between processes until written),
    only the sparse encodings are decoded into memory of their own."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from stages.common.memory.mapped import mapped_tensors

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if META_KEY not in metadata:
        raise ValueError(f"{path} was not written by lmmem's storage (no {META_KEY} metadata)")
    meta = json.loads(metadata[META_KEY])
    tensors = mapped_tensors(path) if mapped else load_file(str(path))
    state = {name: decode(name, info, tensors) for name, info in meta["tensors"].items()}
    for alias, target in meta["aliases"].items():
        state[alias] = state[target]
    return state
