"""Pruned weights kept sparse at run time: the bitmask form decodes to the same matrix (any
rows, any order, a row width that is not a whole number of bytes), holds the bytes counted by
hand, and a pruned model made sparse computes the same logits and greedy tokens with a
smaller tensor peak; a dense model is left as it is."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stages.common.memory.tensor_meter import TensorMeter
from stages.common.modelling import generation
from stages.common.weights.sparse import (CHUNK_OUTPUT, BitmaskMatrix, SparseEmbedding, SparseLinear,
                                          bitmask_bytes, sparsify)


def half_zero(rows: int, cols: int) -> torch.Tensor:
    torch.manual_seed(0)
    weight = torch.randn(rows, cols)
    return weight * (torch.rand(rows, cols) < 0.5)


def test_the_bitmask_form_decodes_to_the_same_matrix_and_holds_its_hand_counted_bytes() -> None:
    weight = half_zero(37, 13)  # 13 columns: each row's bits padded to 2 bytes
    matrix = BitmaskMatrix(weight)
    assert torch.equal(matrix.dense(), weight)
    index = torch.tensor([36, 0, 5, 5, 17])
    assert torch.equal(matrix.rows(index),
                       weight[index]) and torch.equal(matrix.row_range(5, 30), weight[5:30])
    nnz = int((weight != 0).sum())
    held = sum(b.numel() * b.element_size() for b in matrix.buffers())
    assert held == bitmask_bytes(weight) == 37 * 2 + nnz * 4 + 38 * 8


def llama(vocab: int = 300) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def pruned(vocab: int = 3000) -> LlamaForCausalLM:
    """Half of every matrix zeroed, the tied embedding too (what prune50-all stores)."""
    model = llama(vocab)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                w = module.weight
                w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    return model


def forward_peak(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    summary, logits = generation.forward_peak(model, ids)  # the meter evaluate uses
    return summary["total_peak_mib"], summary["parameters_peak_mib"], logits


def test_a_pruned_model_kept_sparse_computes_the_same_with_a_smaller_peak() -> None:
    dense, sparse = pruned(), pruned()
    found = sparsify(sparse, chunk_rows=256)  # the 3,000-row head in 12 slices
    # 2 layers × 7 matrices, the embedding and the tied head: one shared matrix
    assert found["swapped"] == 16
    assert isinstance(sparse.lm_head, SparseLinear) and isinstance(sparse.model.embed_tokens, SparseEmbedding)
    assert sparse.lm_head.matrix is sparse.model.embed_tokens.matrix
    matrices = [3000 * 64] + 2 * [64 * 64] * 4 + 2 * [64 * 128] * 3
    assert found["dense_bytes"] == 4 * sum(matrices)
    ids = torch.randint(0, 3000, (1, 20))
    dense_peak, dense_weights, dense_logits = forward_peak(dense, ids)
    sparse_peak, sparse_weights, sparse_logits = forward_peak(sparse, ids)
    assert torch.allclose(sparse_logits, dense_logits, atol=1e-5)
    assert (sparse_weights - dense_weights) * 2**20 == found["sparse_bytes"] - found["dense_bytes"]
    assert sparse_peak < 0.75 * dense_peak  # the weights are most of a one-sequence peak
    with torch.no_grad():
        same = [m.generate(ids[:, :5], max_new_tokens=10, do_sample=False) for m in (dense, sparse)]
    assert torch.equal(same[0], same[1])


def test_a_dense_model_is_left_dense() -> None:
    model = llama()
    assert sparsify(model) == {"swapped": 0, "dense_bytes": 0, "sparse_bytes": 0}
    assert isinstance(model.lm_head, torch.nn.Linear)


@pytest.mark.parametrize("rows", [5, 64])
def test_a_sparse_linear_with_a_bias_matches_the_dense_one(rows: int) -> None:
    torch.manual_seed(1)
    layer = torch.nn.Linear(16, rows)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(rows, 16) < 0.3)
    x = torch.randn(3, 4, 16)
    twin = SparseLinear(BitmaskMatrix(layer.weight), layer.bias, chunk_rows=8)
    assert torch.allclose(twin(x), layer(x), atol=1e-6)


def test_the_head_s_slices_shrink_as_the_positions_grow() -> None:
    """Many positions at once: each slice's product stays near CHUNK_OUTPUT values beside the
    whole output (a fixed 2,048-row slice would hold 4,096 × 2,048 values, 32 MiB, at once)."""
    head = SparseLinear(BitmaskMatrix(half_zero(4096, 64)), None)
    x = torch.randn(4096, 64)
    meter = TensorMeter()
    meter.track_model(head)
    meter.track(x, "activations")
    with torch.no_grad(), meter.phase(0, "forward"):
        out = head(x)
    meter.close()
    held = meter.summary(prefix="")["total_peak_mib"] * 2**20
    weights = sum(b.numel() * b.element_size() for b in head.buffers())
    beside = held - weights - (x.numel() + out.numel()) * 4  # the input and the output
    assert beside <= CHUNK_OUTPUT * 4 + 64 * 64 * 6  # one slice's product and its 64 decoded rows
    assert torch.allclose(out, x @ head.matrix.dense().T, atol=1e-5)
