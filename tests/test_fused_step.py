"""The optimizer step fused into backward (train.optimizer_in_backward): the ordinary step's
result, one parameter's gradient alive at a time, its state saved and restored, and the
combinations it refuses."""

from __future__ import annotations

import copy

import pytest
import torch

from stages.common.core.errors import StageError
from stages.common.core.params import validate_section
from stages.train import Params
from stages.train.build import build
from stages.train.step import train_step
from stages.train.techniques.fused_step import InBackward
from tests.conftest import deep_update, tiny_params
from tests.training import CPU, META, VOCAB, WIDTH, batches, metered_against_estimate, params


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_fused_step_is_the_ordinary_step(optimizer: str) -> None:
    plain, fused = params(optimizer=optimizer), params(optimizer=optimizer, optimizer_in_backward=True)
    runs = []
    for p in (plain, fused):
        parts = build(p, META, CPU, seed=0)
        for step, rows in enumerate(batches(3)):
            train_step(parts, rows, p, CPU, step, None)
        runs.append(parts.raw.state_dict())
        assert all(q.grad is None for q in parts.raw.parameters())
    assert isinstance(build(fused, META, CPU, seed=0).optimizer, InBackward)
    for name, tensor in runs[0].items():
        assert torch.equal(tensor, runs[1][name]), name


def test_one_gradient_alive_at_a_time_and_the_dry_run_knows() -> None:
    meter = metered_against_estimate(params(optimizer_in_backward=True))
    # by hand: the largest parameter is the (tied) embedding, 700 x 64 float32; every other
    # gradient is freed by its step before the next one is made
    assert meter.category_peaks["gradients"] == VOCAB * WIDTH * 4
    ordinary = build(params(), META, CPU, seed=0)
    all_grads = sum(q.numel() * 4 for q in ordinary.raw.parameters())
    assert all_grads > 1.5 * VOCAB * WIDTH * 4


def test_its_state_is_saved_and_restored() -> None:
    p = params(optimizer_in_backward=True)
    first = build(p, META, CPU, seed=0)
    rows = batches(4)
    for step in range(2):
        train_step(first, rows[step], p, CPU, step, None)
    # copies, as a checkpoint on disk is (a state dict's tensors are the live ones)
    saved_model, saved_optimizer = copy.deepcopy(first.raw.state_dict()), copy.deepcopy(
        first.optimizer.state_dict())
    second = build(p, META, CPU, seed=1)  # another initialisation, then the checkpoint
    second.raw.load_state_dict(saved_model)
    second.optimizer.load_state_dict(saved_optimizer)
    for step in (2, 3):
        train_step(first, rows[step], p, CPU, step, None)
        train_step(second, rows[step], p, CPU, step, None)
    for name, tensor in first.raw.state_dict().items():
        assert torch.equal(tensor, second.raw.state_dict()[name]), name
    with pytest.raises(ValueError, match="per-parameter optimizers"):
        second.optimizer.load_state_dict({"per_parameter": saved_optimizer["per_parameter"][:-1]})


@pytest.mark.parametrize("train, message", [
    ({"grad_clip": 1.0}, "optimizer_in_backward: global-norm clipping needs every gradient at once"),
    ({"micro_batch_size": 4}, "optimizer_in_backward: each micro-batch's gradient would step on its own"),
    ({"precision": "fp16"}, "optimizer_in_backward: fp16's gradient scaler checks every gradient"),
    ({"micro_batch_size": 4, "distributed": {"nproc": 2}}, "optimizer_in_backward: data parallelism"),
    ({"optimizer": "sparse_adam", "model": {"tie_embeddings": False}}, "optimizer_in_backward: sparse_adam"),
])
def test_what_needs_every_gradient_at_once_is_refused_in_one_line(train: dict, message: str) -> None:
    with pytest.raises(StageError) as info:
        validate_section("train", deep_update(tiny_params()["train"],
                                              {"grad_clip": 0.0, "optimizer_in_backward": True, **train}),
                         Params)
    assert message in str(info.value) and "\n" not in str(info.value)
