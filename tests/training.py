"""In-process training helpers for technique tests: the tiny model's train params (clipping
off unless given), its tokens meta without a tokens folder, and seeded batches."""

from __future__ import annotations

import torch

from stages.common.params import validate_section
from stages.common.schema import SpecialIds, TokensMeta
from stages.train import Params
from tests.conftest import deep_update, tiny_params

VOCAB, WIDTH = 700, 64  # the tiny model (2 blocks of width 64) over a 700-word vocabulary
META = TokensMeta(dtype="uint16", vocab_size=VOCAB, special_tokens={"pad": "<pad>", "unk": "<unk>", "bos": "<s>",
                                                                     "eos": "</s>"},
                  special_ids=SpecialIds(pad=0, unk=1, bos=2, eos=3), docs={}, tokens={})
CPU = torch.device("cpu")


def params(**train: object) -> Params:
    return validate_section("train", deep_update(tiny_params()["train"], {"grad_clip": 0.0, **train}), Params)


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (8, 33), generator=g) for _ in range(n)]
