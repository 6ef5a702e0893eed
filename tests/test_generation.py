"""Generation memory: the metered KV cache against hand-computed bytes (multi-head, grouped
and multi-query attention), the cache's growth caught at the peak, the peak's categories
summing to it, the largest batch within a budget checked by metering it and the next, and the
int8 / int4 caches metered as their codes and scales, read through position by position."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from stages.common.modelling.generation import (cached_perplexity, generation_memory, kv_cache_bytes,
                                                kv_quantization, largest_batch, metered_generation, tiled)
from stages.common.modelling.models import ModelParams, build_model

MIB = 2**20


def llama(kv_heads: int, vocab: int = 50) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("kv_heads, cache_bytes", [
    (4, 61_440),  # 2 (K, V) × 2 layers × 3 rows × 20 tokens × 4 heads × 16 values × 4 bytes
    (2, 30_720),  # grouped-query: 2 key/value heads shared by 4 query heads
    (1, 15_360),  # multi-query
])
def test_the_kv_cache_is_the_bytes_its_shape_says(kv_heads: int, cache_bytes: int) -> None:
    model = llama(kv_heads)
    point = metered_generation(model, torch.randint(0, 50, (3, 5)), 20)
    assert point["kv_cache_end_mib"] * MIB == cache_bytes
    assert kv_cache_bytes(model.config, 3, 20, torch.float32) == cache_bytes
    assert kv_cache_bytes(model.config, 3, 20, torch.bfloat16) == cache_bytes // 2
    weights = sum(p.numel() for p in model.parameters()) * 4 + sum(b.numel() * 4 for b in model.buffers())
    assert point["weights_mib"] * MIB == weights
    parts = sum(point[f"{c}_mib"] for c in ("weights", "kv_cache", "activations", "logits"))
    assert parts == pytest.approx(point["peak_mib"], abs=1e-9)
    assert point["peak_step"] in (0, 15)  # the prefill or the last of 15 decoding steps after 5 prompt tokens


def test_the_peak_counts_the_value_tensor_growing_as_cache() -> None:
    """With a small vocabulary the peak is the last layer's value concatenation: the whole
    cache at 20 tokens, the old value tensor at 19 and the new one, the new one made by that
    very op (counted as an activation first, then moved with the peak's split)."""
    point = metered_generation(llama(4), torch.randint(0, 50, (3, 5)), 20)
    old_value = 3 * 19 * 4 * 16 * 4
    assert (point["peak_phase"], point["peak_step"]) == ("decode", 15)
    assert point["kv_cache_mib"] * MIB == 61_440 + old_value
    assert point["activations_mib"] * MIB < 3 * 20 * 4 * 16 * 4  # the new value tensor is not counted here


# codes, and a 4-byte scale a token and head
@pytest.mark.parametrize("bits, per_head", [(8, 16 + 4), (4, 8 + 4)])
def test_a_quantized_cache_is_metered_as_its_codes_and_scales(bits: int, per_head: int) -> None:
    model = llama(4)
    point = metered_generation(model, torch.randint(0, 50, (3, 5)), 20, kv_bits=bits)
    held = 2 * 2 * 3 * 20 * 4 * per_head  # K and V × 2 layers × 3 rows × 20 tokens × 4 heads
    assert point["kv_cache_end_mib"] * MIB == held == kv_cache_bytes(model.config, 3, 20, torch.float32, bits)
    # at the peak: the cache, and at most one tensor's old codes and scales while concatenation grows it
    # (no stale copies: they are freed as each step replaces them)
    assert held - 2 * 3 * 4 * per_head <= point["kv_cache_mib"] * MIB <= held + 3 * 19 * 4 * per_head
    parts = sum(point[f"{c}_mib"] for c in ("weights", "kv_cache", "activations", "logits"))
    assert parts == pytest.approx(point["peak_mib"], abs=1e-9)


def test_perplexity_through_the_cache_is_the_forward_pass_s_and_quantized_near_it() -> None:
    model = llama(2, vocab=300)
    rows = torch.randint(0, 300, (4, 25))
    exact, positions = cached_perplexity(model, rows)
    with torch.no_grad():
        logits = model(input_ids=rows[:, :-1]).logits
    assert positions == 96
    assert exact == pytest.approx(math.exp(F.cross_entropy(logits.reshape(-1, 300),
                                                           rows[:, 1:].reshape(-1)).item()),
                                  rel=1e-5)
    points = kv_quantization(model, rows, 3, 20, 5, [8, 4])
    assert [p["bits"] for p in points] == [0, 8, 4] and points[0]["ppl"] == exact
    assert [p["kv_cache_end_mib"] * MIB for p in points] == [2 * 2 * 3 * 20 * 2 * n for n in (64, 20, 12)]
    assert points[1]["ppl"] == pytest.approx(exact,
                                             rel=1e-3) and points[2]["ppl"] == pytest.approx(exact, rel=3e-2)


def test_the_largest_batch_fits_the_budget_and_the_next_does_not() -> None:
    model = llama(2, vocab=300)
    rows = torch.randint(0, 300, (4, 6))
    points = [metered_generation(model, tiled(rows, b), 24) for b in (1, 2)]
    budget = points[0]["peak_mib"] + 9 * (points[1]["peak_mib"] - points[0]["peak_mib"]) + 1e-4
    batch, line = largest_batch(points, budget)
    assert batch == 10 and line <= budget
    peaks = {b: metered_generation(model, tiled(rows, b), 24)["peak_mib"] for b in range(6, 12)}
    assert all(peaks[b] >= line + (b - batch) * (line - points[1]["peak_mib"]) / (batch - 2) - 1e-9
               for b in peaks)  # convex: on or above the line beyond the two batches
    found = generation_memory(model, rows, [1, 2], [24], 6, budget)["max_batch"][0]
    assert found["line_batch"] == 10 and found["checked_mib"] == peaks[found["batch"]] <= budget
    assert peaks[found["batch"] + 1] > budget  # the largest: one more does not fit


def test_the_grid_has_every_point_the_closed_form_and_a_checked_batch() -> None:
    model = llama(2, vocab=300)
    found = generation_memory(model, torch.randint(0, 300, (2, 8)), [1, 3], [12, 24], 6, budget_mib=2.0)
    assert [(p["batch"], p["context"]) for p in found["generation"]] == [(1, 12), (3, 12), (1, 24), (3, 24)]
    assert found["kv_cache_error"] == 0.0
    last = found["max_batch"][-1]
    assert last["context"] == 24 and last["batch"] > 3
    assert last["checked_mib"] <= 2.0 and last["line_batch"] - last["batch"] in (0, 1)
    assert found["max_batch"][0]["checked_mib"] is None  # metered at the largest context only


def test_kv_heads_divide_the_heads_and_shrink_the_key_value_projections() -> None:
    with pytest.raises(ValueError, match=r"heads \(4\) must be a multiple of kv_heads \(3\)"):
        ModelParams(width=64, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match=r"kv_heads \(2\) below heads needs family llama"):
        ModelParams(family="gpt2", width=64, heads=4, kv_heads=2)
    special = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    for kv_heads, width in ((0, 64), (2, 32), (1, 16)):  # 4 heads of 16 values: K and V 4, 2 or 1 heads wide
        model = build_model(ModelParams(width=64, heads=4, kv_heads=kv_heads, layers=1, context=16), 50,
                            special)
        attention = model.model.layers[0].self_attn
        assert attention.k_proj.out_features == attention.v_proj.out_features == width
        assert attention.q_proj.out_features == 64
