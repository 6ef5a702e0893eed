"""GaLore and Adam-mini: their optimizer state counted by hand from the model's shapes
against the meter, the dry run exact on them, training that learns, and the combinations
they refuse."""

from __future__ import annotations

import pytest
import torch

from stages.common.core.errors import StageError
from stages.common.core.params import validate_section
from stages.train import Params
from stages.train.build import build
from stages.train.step import train_step
from tests.conftest import deep_update, tiny_params
from tests.training import CPU, META, batches, metered_against_estimate, params


def shapes() -> dict[str, tuple[int, ...]]:
    """The tiny model's trainable parameters by name (the tied head is the embedding)."""
    model = build(params(), META, CPU, seed=0).raw
    return {name: tuple(q.shape) for name, q in model.named_parameters()}


def test_galore_state_is_the_low_rank_moments_and_the_projection() -> None:
    rank = 16
    expected = 0
    for name, shape in shapes().items():
        # projected: rank x the longer side, twice; the projection
        if len(shape) == 2 and "embed" not in name:
            rows, cols = shape
            expected += (2 * rank * max(rows, cols) + rank * min(rows, cols)) * 4
        else:  # the embedding and the norms: AdamW's two full moments
            expected += 2 * torch.Size(shape).numel() * 4
    meter = metered_against_estimate(params(optimizer="galore_adamw", galore_rank=rank))
    assert meter.category_peaks["optimizer"] == expected
    adamw = metered_against_estimate(params(optimizer="adamw")).category_peaks["optimizer"]
    assert expected < 0.6 * adamw  # the blocks' moments at rank 16 of 64


def test_galore_projects_the_embedding_when_asked_and_steps_in_backward() -> None:
    plain = metered_against_estimate(params(optimizer="galore_adamw",
                                            galore_rank=16)).category_peaks["optimizer"]
    embedded = metered_against_estimate(params(optimizer="galore_adamw", galore_rank=16,
                                               galore_embeddings=True))
    vocab, width = shapes()["model.embed_tokens.weight"]
    # the embedding's 2 x 700 x 64 moments become 2 x 700 x 16, plus a 16 x 64 projection
    assert plain - embedded.category_peaks["optimizer"] == (
        2 * vocab * width - 2 * vocab * 16 - 16 * width) * 4
    fused = metered_against_estimate(params(optimizer="galore_adamw", galore_rank=16,
                                            optimizer_in_backward=True))
    assert fused.category_peaks["optimizer"] == plain


def test_adam_mini_keeps_one_second_moment_per_head_or_row() -> None:
    heads = tiny_params()["train"]["model"]["heads"]
    expected = 0
    for name, shape in shapes().items():
        numel = torch.Size(shape).numel()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            expected += (numel + heads) * 4  # the first moment, one second moment per head
        elif len(shape) == 2:
            expected += (numel + shape[0]) * 4  # one per output row (embedding: per token)
        else:
            expected += (numel + 1) * 4  # a norm: one for the whole vector
    meter = metered_against_estimate(params(optimizer="adam_mini"))
    assert meter.category_peaks["optimizer"] == expected


@pytest.mark.parametrize("optimizer", ["galore_adamw", "adam_mini"])
def test_the_lean_optimizers_learn(optimizer: str) -> None:
    p = params(optimizer=optimizer, lr=0.01, warmup_steps=0)
    parts = build(p, META, CPU, seed=0)
    rows = batches(1)[0]
    losses = [sum(loss.item() for loss in train_step(parts, rows, p, CPU, step, None)) for step in range(8)]
    assert losses[-1] < losses[0] - 0.5, losses  # the same batch, eight steps: it is learnt


@pytest.mark.parametrize("changes, expected", [
    ({"optimizer": "adam_mini", "optimizer_in_backward": True},
     ("optimizer adam_mini with optimizer_in_backward: Adam-mini cannot be split into per-parameter "
      "optimizers")),
    ({"optimizer": "adam_mini", "micro_batch_size": 4, "distributed": {"nproc": 2}},
     "optimizer adam_mini: one process only"),
    ({"optimizer": "galore_adamw", "micro_batch_size": 4, "distributed": {"nproc": 2, "strategy": "zero1"}},
     ("optimizer galore_adamw with distributed.strategy zero1: GaLore's SVD needs each matrix's whole "
      "gradient")),
])
def test_what_they_cannot_do_is_refused_in_one_line(changes: dict[str, object], expected: str) -> None:
    with pytest.raises(StageError) as info:
        validate_section("train", deep_update(tiny_params()["train"], {"grad_clip": 0.0, **changes}), Params)
    assert expected in str(info.value) and "\n" not in str(info.value)
