"""Pruned weights kept sparse in memory at run time, not decoded back to dense on load.

Why it is built this way: docs/design-notes.md, `stages.common.weights.sparse`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("lmmem.sparse")

CHUNK_OUTPUT = 1 << 18  # values of one slice's product of the output head (1 MiB in fp32)
BIT_ORDER = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # np.packbits' order


def bitmask_bytes(weight: torch.Tensor) -> int:
    """What `BitmaskMatrix` holds for a (rows, columns) matrix: mask, values and row starts."""
    rows, cols = weight.shape
    return rows * -(-cols // 8) + int(torch.count_nonzero(weight)) * weight.element_size() + (rows + 1) * 8


def pays(weight: torch.Tensor) -> bool:
    """The bitmask form of a (rows, columns) matrix is smaller than the matrix dense."""
    return bitmask_bytes(weight) < weight.numel() * weight.element_size()


class BitmaskMatrix(nn.Module):
    """A matrix held as a row-packed bitmask of its non-zeros, their values in row order, and
    each row's first value (buffers: the tensor meter counts them with the weights)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        weight = weight.detach()
        self.shape = tuple(weight.shape)
        nonzero = weight != 0
        pad = -self.shape[1] % 8
        bits = F.pad(nonzero, (0, pad)).view(self.shape[0], -1, 8).to(torch.uint8)
        self.register_buffer("mask", (bits * BIT_ORDER).sum(-1, dtype=torch.uint8))
        self.register_buffer("values", weight[nonzero].clone())
        starts = torch.zeros(self.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(nonzero.sum(1), 0, out=starts[1:])
        self.register_buffer("starts", starts)

    def _bits(self, mask: torch.Tensor) -> torch.Tensor:
        return ((mask.unsqueeze(-1) & BIT_ORDER) != 0).flatten(1)[:, :self.shape[1]]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The dense rows `index` (a 1-D tensor of row numbers, in any order): (len(index), columns)."""
        nonzero = self._bits(self.mask[index])
        where = self.starts[index].unsqueeze(1) + nonzero.cumsum(1) - 1  # each non-zero's place in values
        out = torch.zeros(len(index), self.shape[1], dtype=self.values.dtype)
        out[nonzero] = self.values[where[nonzero]]
        return out

    def row_range(self, start: int, stop: int) -> torch.Tensor:
        """The dense rows start..stop-1: their values are one run, scattered in the mask's order
        (no index per value: the temporary is the rows' mask, a byte a value, and the rows)."""
        out = torch.zeros(stop - start, self.shape[1], dtype=self.values.dtype)
        return out.masked_scatter_(self._bits(self.mask[start:stop]),
                                   self.values[int(self.starts[start]):int(self.starts[stop])])

    def dense(self) -> torch.Tensor:
        return self.row_range(0, self.shape[0])


class SparseLinear(nn.Module):
    """x @ W.T + b with W a BitmaskMatrix: decoded whole for each product, or a slice of its
    rows at a time when it has more than `chunk_rows` (the output head): at most `chunk_rows`,
    fewer when many positions come at once, so that a slice's product (positions × rows)
    stays within `CHUNK_OUTPUT` values beside the whole output."""

    def __init__(self, matrix: BitmaskMatrix, bias: torch.Tensor | None, chunk_rows: int = 2048) -> None:
        super().__init__()
        self.matrix = matrix
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.chunk_rows = chunk_rows
        self.in_features, self.out_features = matrix.shape[1], matrix.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.matrix.shape[0]
        if rows <= self.chunk_rows:
            return F.linear(x, self.matrix.dense(), self.bias)
        out = x.new_empty(*x.shape[:-1], rows)
        step = max(64, min(self.chunk_rows, CHUNK_OUTPUT // max(1, x[..., 0].numel())))
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            out[..., start:stop] = F.linear(x, self.matrix.row_range(start, stop),
                                            None if self.bias is None else self.bias[start:stop])
        return out


class SparseEmbedding(nn.Module):
    """An embedding table held as a BitmaskMatrix: a lookup decodes only the rows it reads."""

    def __init__(self, matrix: BitmaskMatrix, padding_idx: int | None = None) -> None:
        super().__init__()
        self.matrix = matrix
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = matrix.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.matrix.rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)


def sparsify(model: nn.Module, chunk_rows: int = 2048) -> dict[str, int]:
    """Swap each nn.Linear and nn.Embedding of `model` whose bitmask form is smaller than its
    dense weight for its sparse twin, in place (tied weights become one shared matrix). The
    weight bytes before and after, and how many modules were swapped."""
    made: dict[int, BitmaskMatrix] = {}  # by the dense weight's storage: tied tables share one
    before = after = swapped = 0
    counted: set[int] = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (nn.Linear, nn.Embedding)) or child.weight.dim() != 2:
                continue
            weight = child.weight
            key = weight.untyped_storage().data_ptr()
            if key not in made:
                if not pays(weight):
                    continue
                made[key] = BitmaskMatrix(weight)
            matrix = made[key]
            if key not in counted:
                counted.add(key)
                before += weight.numel() * weight.element_size()
                after += sum(b.numel() * b.element_size() for b in matrix.buffers())
            twin: nn.Module = (SparseLinear(matrix, child.bias, chunk_rows) if isinstance(child, nn.Linear)
                               else SparseEmbedding(matrix, child.padding_idx))
            setattr(parent, name, twin)
            swapped += 1
    log.info("kept sparse: %d modules, weights %.2f → %.2f MiB", swapped, before / 2**20, after / 2**20)
    return {"swapped": swapped, "dense_bytes": before, "sparse_bytes": after}


def sparse_figures(model: nn.Module, rows: torch.Tensor, context: int,
                   prompt_tokens: int) -> dict[str, float] | None:
    """evaluate's figures for a pruned transformers model: one forward pass of a sequence and
    one sequence's generation to `context` tokens metered dense, then the model made sparse in
    place and the same measured again, with a forward pass of all `rows` (evaluate's batch).
    None (the model untouched) when no weight has zeros enough to pay."""
    from stages.common.modelling.generation import forward_peak, metered_generation, tiled

    if not any(pays(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))
               and m.weight.dim() == 2):
        return None  # nothing pays: no need to measure the dense model again
    one, prompt = rows[:1, :-1], tiled(rows[:, :prompt_tokens], 1)
    dense_b1, dense_logits = forward_peak(model, one)
    dense_generation = metered_generation(model, prompt, context)["peak_mib"]
    found = sparsify(model)
    if not found["swapped"]:
        return None
    b1, logits = forward_peak(model, one)
    return {"modules": found["swapped"], "weights_mib": b1["parameters_peak_mib"],
            "dense_weights_mib": dense_b1["parameters_peak_mib"],
            "forward_peak_mib": forward_peak(model, rows[:, :-1])[0]["total_peak_mib"],
            "forward_peak_b1_mib": b1["total_peak_mib"],
            "dense_forward_peak_b1_mib": dense_b1["total_peak_mib"],
            "generation_peak_b1_mib": metered_generation(model, prompt, context)["peak_mib"],
            "dense_generation_peak_b1_mib": dense_generation,
            "max_logit_diff": float((logits.float() - dense_logits.float()).abs().max())}
