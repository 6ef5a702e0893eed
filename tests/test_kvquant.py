"""The quantized KV cache: codes within half a step of the values, the bytes it holds (hand
counted), two int4 values a byte, and a model decoding through it close to the exact cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from stages.common.modelling.kvquant import QuantizedKVCache, QuantizedKVLayer, dequantize, quantize


@pytest.mark.parametrize("bits, top", [(8, 127), (4, 7)])
def test_codes_are_within_half_a_step_of_the_values(bits: int, top: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 64) * torch.linspace(0.1, 10, 5)[:, None]  # tokens of very different sizes
    codes, scale = quantize(x, bits)
    assert codes.shape == ((2, 3, 5, 64) if bits == 8 else (2, 3, 5, 32))
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8) and scale.shape == (2, 3, 5, 1)
    step = x.abs().amax(-1, keepdim=True) / top  # each token's own scale: nothing clips
    assert ((dequantize(codes, scale, bits, torch.float32) - x).abs() <= step / 2 + 1e-6).all()


def test_the_cache_holds_a_byte_or_half_a_byte_a_value_and_a_scale_a_token() -> None:
    for bits, per_tensor in ((8, 3 * 2 * 20 * 64 + 3 * 2 * 20 * 4), (4, 3 * 2 * 20 * 32 + 3 * 2 * 20 * 4)):
        layer = QuantizedKVLayer(bits)
        for chunk in (12, 1, 7):  # a prompt, then positions one or more at a time
            keys, values = layer.update(torch.randn(3, 2, chunk, 64), torch.randn(3, 2, chunk, 64))
        assert keys.shape == values.shape == (3, 2, 20, 64) and layer.get_seq_length() == 20
        # 8,160 (int8) or 4,320 (int4) for keys, the same for values
        assert layer.held_bytes() == 2 * per_tensor
    with pytest.raises(ValueError, match="head size 63 is odd"):
        QuantizedKVLayer(4).update(torch.randn(1, 1, 2, 63), torch.randn(1, 1, 2, 63))
    with pytest.raises(ValueError, match="KV cache bits: 3"):
        QuantizedKVLayer(3)


def test_a_model_decoding_through_it_stays_near_the_exact_cache() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (4, 40))

    def perplexity(cache: object) -> float:
        losses = []
        with torch.no_grad():
            model(input_ids=ids[:, :8], cache=cache, use_cache=True)
            for t in range(8, 39):
                logits = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1]
                losses.append(F.cross_entropy(logits, ids[:, t + 1]))
        return math.exp(torch.stack(losses).mean().item())

    exact = perplexity(DynamicCache())
    with torch.no_grad():  # the exact cache is the full forward pass, position by position
        full = model(input_ids=ids).logits[:, 8:39]
    assert exact == pytest.approx(math.exp(F.cross_entropy(full.reshape(-1, 300),
                                                           ids[:, 9:40].reshape(-1)).item()),
                                  rel=1e-4)
    assert perplexity(QuantizedKVCache(2, 8)) == pytest.approx(exact, rel=1e-3)
    assert perplexity(QuantizedKVCache(2, 4)) == pytest.approx(exact, rel=2e-2)
