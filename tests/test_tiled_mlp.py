"""The MLP in tiles (train.mlp_tiles): the same outputs and gradients, the MLP's wide
intermediates held a tile at a time, the dry run exact on it, and its refusals."""

from __future__ import annotations

import pytest
import torch

from stages.common.core.errors import StageError
from stages.common.core.params import validate_section
from stages.common.modelling.windows import next_token_loss
from stages.train import Params
from stages.train.build import build
from tests.conftest import deep_update, tiny_params
from tests.training import CPU, META, batches, metered_against_estimate, params


def loss_and_gradients(tiles: int, family: str = "llama") -> tuple[float, torch.Tensor]:
    model = build(params(mlp_tiles=tiles, model={"family": family}), META, CPU, seed=0).raw
    loss = next_token_loss(model, batches(1)[0])
    loss.backward()
    return loss.item(), torch.cat([q.grad.flatten() for q in model.parameters()])


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D views its input as rows
def test_tiles_give_the_same_loss_and_gradients(family: str) -> None:
    loss, grads = loss_and_gradients(1, family)
    for tiles in (2, 4):
        tiled_loss, tiled_grads = loss_and_gradients(tiles, family)
        assert tiled_loss == pytest.approx(loss, abs=1e-6)
        assert torch.allclose(tiled_grads, grads, atol=1e-6, rtol=1e-5)


def test_the_mlp_intermediates_are_held_a_tile_at_a_time() -> None:
    tiny = tiny_params()["train"]
    batch, context, width = tiny["batch_size"], tiny["model"]["context"], tiny["model"]["width"]
    ffn = -(-width * 8 // 3 // 64) * 64  # llama's 8/3 x width, rounded up to 64: 192 here
    whole = metered_against_estimate(params()).category_peaks["activations"]
    tiled = metered_against_estimate(params(mlp_tiles=4)).category_peaks["activations"]
    # each block saved gate, up, their SwiGLU product's two factors: four batch x context x ffn
    # float32 tensors; tiled, each block keeps only its tiles' inputs and the joined output
    intermediates = 4 * batch * context * ffn * 4
    layers = tiny["model"]["layers"]
    assert whole - tiled >= layers * (intermediates - batch * context * width * 4)
    # inside checkpointed blocks: the recomputation's workspace in backward shrinks
    full = metered_against_estimate(params(activation_checkpointing=True)).category_peaks["temporaries"]
    both = metered_against_estimate(params(activation_checkpointing=True,
                                           mlp_tiles=4)).category_peaks["temporaries"]
    assert both < full


@pytest.mark.parametrize("changes, expected", [
    ({"mlp_tiles": 4, "model": {"family": "lstm"}}, "mlp_tiles: the lstm baseline has no MLP"),
    ({"mlp_tiles": 64}, "mlp_tiles (64) is more than the context (32 positions)"),
])
def test_tiles_that_cannot_work_are_refused_in_one_line(changes: dict[str, object], expected: str) -> None:
    with pytest.raises(StageError) as info:
        validate_section("train", deep_update(tiny_params()["train"], changes), Params)
    assert expected in str(info.value) and "\n" not in str(info.value)
