"""The next-token cross-entropy without the full logits.

Why it is built this way: docs/design-notes.md, `stages.common.modelling.loss`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.common.core.errors import StageError
from stages.common.modelling.models import logits_of, output_head

CHUNK: ContextVar[int] = ContextVar("loss_chunk_tokens", default=0)


@contextlib.contextmanager
def chunked(tokens: int) -> Iterator[None]:
    """next_token_loss computes its cross-entropy `tokens` positions at a time inside (0: whole)."""
    token = CHUNK.set(tokens)
    try:
        yield
    finally:
        CHUNK.reset(token)


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the loss side's products run in: autocast's when it is bf16, else the weight's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16:
        return torch.bfloat16
    return weight.dtype


# d(a chunk's summed loss) / d(its logits), written over the fp32 logits in place; returns the
# chunk's summed loss. Arguments: the logits, the rows' start and stop.
LossGrad = Callable[[torch.Tensor, int, int], torch.Tensor]


class _ChunkedLinearLoss(torch.autograd.Function):
    """mean over rows of a loss of the logits hidden @ weight.T + bias, chunk rows at a time,
    with the gradients computed in the forward pass. `loss_grad` gives each chunk's summed loss
    and turns its logits into their gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                loss_grad: LossGrad, chunk: int) -> torch.Tensor:
        dtype = compute_dtype(weight)
        n = hidden.size(0)
        with torch.autocast(weight.device.type, enabled=False):
            w = weight.to(dtype)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
            grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, n, chunk):
                h = hidden[start:start + chunk].to(dtype)
                logits = (h @ w.T).float()
                if bias is not None:
                    logits += bias.float()
                total += loss_grad(logits, start, start + h.size(0))
                logits.div_(n)  # d(mean loss) / d(logits)
                g = logits.to(dtype)  # the same tensor when fp32
                del logits
                if grad_hidden.dtype == dtype:  # written in place: no product-sized temporary
                    torch.mm(g, w, out=grad_hidden[start:start + chunk])
                else:
                    grad_hidden[start:start + chunk] = g @ w
                if grad_weight is not None and grad_weight.dtype == dtype:
                    grad_weight.addmm_(g.T, h)
                elif grad_weight is not None:  # bf16 products, accumulated in the weight's fp32
                    grad_weight += g.T @ h
                if grad_bias is not None:
                    grad_bias += g.sum(0).to(grad_bias.dtype)
                del g, h
        # kept on ctx, not saved for backward: backward hands these very tensors over (a
        # saved tensor still referenced by the graph would be copied into .grad)
        ctx.grads = [grad_hidden, grad_weight, grad_bias]
        return total / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("the chunked loss's gradients were handed over by an earlier backward")
        grads, ctx.grads = ctx.grads, None  # scaled in place and handed over: run backward once
        grad_hidden, grad_weight, grad_bias = (None if g is None else g.mul_(grad_out) for g in grads)
        del grads
        return grad_hidden, grad_weight, grad_bias, None, None


def _cross_entropy_grad(targets: torch.Tensor) -> LossGrad:
    def loss_grad(logits: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        t = targets[start:stop]
        lse = torch.logsumexp(logits, dim=-1)
        loss = (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
        logits.sub_(lse[:, None]).exp_()  # softmax, in place
        logits[torch.arange(t.numel(), device=t.device), t] -= 1.0
        return loss
    return loss_grad


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of (rows, width) hidden states through a linear head (weight:
    vocabulary × width) against (rows,) targets, `chunk` rows at a time; differentiable."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 row, got {chunk}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearLoss.apply(hidden, weight, bias, _cross_entropy_grad(targets), chunk)
    dtype = compute_dtype(weight)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.size(0), chunk):
        logits = F.linear(hidden[start:start + chunk].to(dtype), weight.to(dtype),
                          None if bias is None else bias.to(dtype)).float()
        total += F.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
    return total / hidden.size(0)


def _distillation_grad(targets: torch.Tensor, teacher_hidden: torch.Tensor, teacher_head: nn.Module,
                       temperature: float, alpha: float) -> LossGrad:
    t = temperature

    def loss_grad(logits: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        with torch.no_grad():
            teacher = teacher_head(teacher_hidden[start:stop]).float()
        log_pt = torch.log_softmax(teacher.div_(t), dim=-1)
        del teacher
        log_ps = torch.log_softmax(logits / t, dim=-1)
        soft = (log_pt.exp() * (log_pt - log_ps)).sum() * (t * t)  # T² · KL(teacher_T ‖ student_T)
        # its gradient in the logits: T · (softmax(logits / T) − softmax(teacher / T))
        soft_grad = log_ps.exp_().sub_(log_pt.exp_()).mul_(alpha * t)
        del log_pt
        rows = targets[start:stop]
        hard = _cross_entropy_grad(rows)(logits, 0, stop - start)  # logits → softmax − one-hot
        logits.mul_(1 - alpha).add_(soft_grad)
        return alpha * soft + (1 - alpha) * hard
    return loss_grad


def chunked_distillation(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor,
                         teacher_hidden: torch.Tensor, teacher_head: nn.Module, temperature: float,
                         alpha: float,
                         chunk: int) -> torch.Tensor:
    """alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · cross-entropy, averaged over rows,
    `chunk` rows at a time: the student's (rows, width) hidden states through its linear head
    (weight: vocabulary × width), the teacher's hidden states through `teacher_head` (no
    gradient), T the temperature. Neither model's logits exist whole; differentiable in the
    student's hidden states and head (the same loss as `F.kl_div(..., reduction="batchmean")`
    over the full logits)."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 row, got {chunk}")
    grad = _distillation_grad(targets, teacher_hidden.detach(), teacher_head, temperature, alpha)
    return _ChunkedLinearLoss.apply(hidden, weight, bias, grad, chunk)


@contextlib.contextmanager
def _bypassed(head: nn.Module) -> Iterator[None]:
    head.forward = lambda x: x  # type: ignore[method-assign]  # the instance's, over the class's
    try:
        yield
    finally:
        del head.forward


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP's wrapper (DDP's forward still runs: its gradient hooks need it)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def hidden_and_head(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
    """(batch, time) ids → the (batch, time, width) hidden states the output head would read,
    and the head."""
    head = output_head(unwrapped(model))
    if head is None:
        raise StageError(f"{type(unwrapped(model)).__name__} has no output head to chunk the loss over")
    with _bypassed(head):
        hidden = logits_of(model, input_ids)
    return hidden, head


def next_token_loss_chunked(model: nn.Module, rows: torch.Tensor, chunk: int) -> torch.Tensor:
    """`windows.next_token_loss`, `chunk` tokens of logits at a time."""
    hidden, head = hidden_and_head(model, rows[:, :-1])
    if isinstance(head, nn.Linear):
        weight = head.weight
    # a frozen quantized head (stages.common.weights.frozen): rebuilt, no gradient
    elif hasattr(head, "dequantized"):
        weight = head.dequantized()
    else:
        raise StageError(f"the chunked loss needs a linear output head, not {type(head).__name__}")
    return chunked_cross_entropy(hidden.reshape(-1, hidden.size(-1)), weight, head.bias,
                                 rows[:, 1:].reshape(-1), chunk)


def logits_in_chunks(model: nn.Module, rows: torch.Tensor,
                     chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 logits, targets) of the windows `rows`, `chunk` positions at a time (0: all at
    once), through the model's own head (a quantized one too)."""
    hidden, head = hidden_and_head(model, rows[:, :-1])
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), rows[:, 1:].reshape(-1)
    step = chunk or hidden.size(0)
    for start in range(0, hidden.size(0), step):
        yield head(hidden[start:start + step]).float(), targets[start:start + step]
