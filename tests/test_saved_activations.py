"""Saved activations compressed for backward (train.saved_activations): the packed bytes by
hand, the training they give, the dry run's knowledge of them, and the refusal on a CPU."""

from __future__ import annotations

import pytest
import torch

from stages.common.core.errors import StageError
from stages.common.modelling.windows import next_token_loss
from stages.train.build import build, forward_context
from stages.train.techniques.saved_activations import TECHNIQUE, _pack_bf16, _pack_int8, _unpack
from tests.training import CPU, META, batches, metered_against_estimate, params


def test_packing_by_hand() -> None:
    torch.manual_seed(0)
    t = torch.randn(64, 512)  # 128 KiB of float32: an activation worth packing
    kind, half = _pack_bf16(t)
    assert kind == "bf16" and half.dtype == torch.bfloat16 and half.nbytes == 64 * 512 * 2
    assert torch.allclose(_unpack((kind, half)), t, rtol=2**-8, atol=0)  # bf16 keeps 8 bits of mantissa
    kind, q, scale = _pack_int8(t)
    # a byte each, a scale a row
    assert q.dtype == torch.int8 and q.nbytes + scale.nbytes == 64 * 512 + 64 * 4
    assert (q.abs().amax(dim=-1) == 127).all()  # each row's largest magnitude maps to 127
    assert ((_unpack((kind, q, scale)) - t).abs() <= scale / 2 + 1e-7).all()  # within half a step
    weight = torch.nn.Parameter(torch.randn(512, 512))
    for pack in (_pack_bf16, _pack_int8):
        view = weight.t()  # as a Linear layer saves its weight for backward
        small = torch.randn(8, 8)
        assert pack(weight) is weight and pack(view) is view and pack(small) is small


def gradients(saved: str) -> torch.Tensor:
    """All of one backward pass's gradients, flattened."""
    p = params(saved_activations=saved)
    model = build(p, META, CPU, seed=0).raw
    with forward_context(p, CPU):
        loss = next_token_loss(model, batches(1)[0])
    loss.backward()
    return torch.cat([q.grad.flatten() for q in model.parameters()])


def test_fewer_activation_bytes_nearly_the_same_gradients() -> None:
    keep, bf16, int8 = (metered_against_estimate(params(saved_activations=s)).category_peaks["activations"]
                        for s in ("keep", "bf16", "int8"))
    assert int8 < bf16 < keep
    exact = gradients("keep")
    for saved, tolerance in (("bf16", 0.01), ("int8", 0.05)):
        error = (gradients(saved) - exact).norm() / exact.norm()
        assert 0 < error < tolerance, (saved, error)


def test_host_memory_is_refused_on_a_cpu() -> None:
    with pytest.raises(StageError, match="there is no second memory"):
        TECHNIQUE.start(params(saved_activations="cpu"), CPU)
    assert TECHNIQUE.start(params(saved_activations="bf16"), CPU) == {}
