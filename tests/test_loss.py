"""The chunked cross-entropy (stages/common/modelling/loss.py): the standard loss and gradients, and the
bytes it holds, counted by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages.common.memory.tensor_meter import TensorMeter
from stages.common.modelling.loss import chunked, chunked_cross_entropy, chunked_distillation
from stages.common.modelling.models import ModelParams, build_model
from stages.common.modelling.windows import next_token_loss

SPECIAL = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gpt2", "lstm"])
@pytest.mark.parametrize("tie", [True, False])
def test_the_chunked_loss_is_the_standard_loss_and_gradient(family: str, tie: bool) -> None:
    torch.manual_seed(0)
    model = build_model(ModelParams(family=family, layers=2, width=64, heads=4, context=32,
                                    tie_embeddings=tie),
                        500, SPECIAL)
    rows = torch.randint(0, 500, (4, 33))
    logits = model(input_ids=rows[:, :-1]) if family == "lstm" else model(input_ids=rows[:, :-1]).logits
    standard = F.cross_entropy(logits.reshape(-1, 500), rows[:, 1:].reshape(-1))  # torch's, whole
    standard.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    with chunked(7):  # 128 positions: 18 chunks of 7 and one of 2
        loss = next_token_loss(model, rows)
    loss.backward()
    assert loss.item() == pytest.approx(standard.item(), abs=1e-5)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-7), name
    with torch.no_grad(), chunked(5):  # no gradient wanted: the loss alone, chunk by chunk
        assert next_token_loss(model, rows).item() == pytest.approx(standard.item(), abs=1e-5)


def test_under_bf16_autocast_the_products_run_in_bf16_like_the_standard_head() -> None:
    torch.manual_seed(0)
    model = build_model(ModelParams(layers=2, width=64, heads=4, context=32), 500, SPECIAL)
    rows = torch.randint(0, 500, (4, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        standard = next_token_loss(model, rows)
        with chunked(16):
            loss = next_token_loss(model, rows)
    assert loss.item() == pytest.approx(standard.item(), abs=2e-3)  # bf16 logits either way
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_micro_batch_scaling_reaches_the_gradients() -> None:
    """Gradient accumulation divides each micro-batch's loss: backward scales what forward computed."""
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (10,))
    (F.cross_entropy(hidden @ weight.T, targets) / 4).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (chunked_cross_entropy(hidden, weight, None, targets, 3) / 4).backward()
    assert torch.allclose(hidden.grad, expected[0],
                          atol=1e-7) and torch.allclose(weight.grad, expected[1], atol=1e-7)
    with pytest.raises(ValueError, match="at least 1 row"):
        chunked_cross_entropy(hidden, weight, None, targets, 0)


def loss_side_peak(n: int, width: int, vocab: int, chunk: int) -> tuple[int, int]:
    """The meter's peak of bytes made by the loss side (logits to the hidden states' and the
    weight's gradients), forward and backward: (standard, chunked)."""
    peaks = []
    for size in (0, chunk):
        torch.manual_seed(0)
        hidden = torch.randn(n, width, requires_grad=True)
        weight = torch.randn(vocab, width, requires_grad=True)
        targets = torch.randint(0, vocab, (n,))
        meter = TensorMeter()
        meter.track([hidden, targets], "activations")
        meter.track(weight, "parameters")
        inputs = sum(meter.current.values())
        with meter.phase(0, "forward"):
            if size:
                loss = chunked_cross_entropy(hidden, weight, None, targets, size)
            else:
                loss = F.cross_entropy(hidden @ weight.T, targets)
        with meter.phase(0, "backward"):
            loss.backward()
        peaks.append(meter.peak.total - inputs)
    return peaks[0], peaks[1]


def test_the_loss_side_holds_a_chunk_of_logits_not_all_of_them() -> None:
    n, width, vocab, chunk = 512, 16, 1000, 32
    standard, chunked_peak = loss_side_peak(n, width, vocab, chunk)
    # by hand, fp32: the chunked loss holds the two gradients it hands to backward (the hidden
    # states' n x width, the weight's vocab x width) and one chunk of logits (chunk x vocab),
    # plus vectors of `chunk` (log-sum-exp, target logits, row indices): under 64 B a row
    held = (n * width + vocab * width + chunk * vocab) * 4
    assert held <= chunked_peak <= held + 64 * chunk
    # the standard loss: the logits and their log-softmax in forward, and in backward the
    # log-softmax's gradient and the logits' on top of the saved log-softmax (3 x n x vocab)
    assert standard >= 3 * n * vocab * 4
    assert chunked_peak < 0.1 * standard


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_the_chunked_distillation_loss_is_kl_div_and_cross_entropy_on_the_whole_logits(alpha: float) -> None:
    """Against torch's own losses over the full logits: batchmean KL at temperature T (times T²)
    and the mean cross-entropy, weighted by alpha; the student's gradients the same."""
    torch.manual_seed(0)
    n, width, vocab, t = 37, 8, 50, 2.0
    hidden = torch.randn(n, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    teacher_hidden = torch.randn(n, width)
    teacher_head = torch.nn.Linear(width, vocab)
    targets = torch.randint(0, vocab, (n,))
    logits = hidden @ weight.T
    with torch.no_grad():
        target = teacher_head(teacher_hidden)
    soft = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(target / t, -1), log_target=True,
                    reduction="batchmean") * t * t
    standard = alpha * soft + (1 - alpha) * F.cross_entropy(logits, targets)
    standard.backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    # 7 x 5 + 2
    loss = chunked_distillation(hidden, weight, None, targets, teacher_hidden, teacher_head, t, alpha, 5)
    loss.backward()
    assert loss.item() == pytest.approx(standard.item(), rel=1e-5)
    assert torch.allclose(hidden.grad, expected[0], rtol=1e-4, atol=1e-7)
    assert torch.allclose(weight.grad, expected[1], rtol=1e-4, atol=1e-7)
    assert teacher_head.weight.grad is None  # the teacher is not trained
