"""In-process training helpers for technique tests: the tiny model's train params (clipping
off unless given), its tokens meta without a tokens folder, seeded batches, and a metered
run checked against the dry run."""

from __future__ import annotations

import pytest
import torch

from stages.common.core.params import validate_section
from stages.common.core.schema import SpecialIds, TokensMeta
from stages.common.memory.tensor_meter import TensorMeter
from stages.train import Params
from stages.train.build import build
from stages.train.estimate import predict_memory
from stages.train.step import train_step
from tests.conftest import deep_update, tiny_params

VOCAB, WIDTH = 700, 64  # the tiny model (2 blocks of width 64) over a 700-word vocabulary
META = TokensMeta(dtype="uint16", vocab_size=VOCAB,
                  special_tokens={"pad": "<pad>", "unk": "<unk>", "bos": "<s>",
                                  "eos": "</s>"},
                  special_ids=SpecialIds(pad=0, unk=1, bos=2, eos=3), docs={}, tokens={})
CPU = torch.device("cpu")


def params(**train: object) -> Params:
    return validate_section("train", deep_update(tiny_params()["train"], {"grad_clip": 0.0, **train}), Params)


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (8, 33), generator=g) for _ in range(n)]


def metered_against_estimate(p: Params) -> TensorMeter:
    """Two metered steps of `p` (as the stage meters them); every category's peak must be
    within 2 % of the dry run's estimate. Returns the closed meter."""
    parts = build(p, META, CPU, seed=0)
    meter = TensorMeter()
    parts.track(meter)
    for step, rows in enumerate(batches(2)):
        train_step(parts, rows, p, CPU, step, meter)
    meter.close()
    estimate = predict_memory(p, META, CPU, seed=0)
    for key, value in meter.summary().items():
        if key.endswith("_peak_mib"):
            assert estimate[key.replace("mem_", "est_", 1)] == pytest.approx(value, rel=0.02), key
    return meter
