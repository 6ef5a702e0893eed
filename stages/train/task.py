"""What a run learns: its model, its batches, its loss and its validation. The loop, the dry
run and auto-fit are the same for every task; a task says what differs.

- `LanguageModelling`: next-token prediction on token windows from scratch (train, compare).
- the finetune stage's tasks (stages.finetune.tasks) start from a trained model instead.

A batch is a tensor of rows, `row_length(p)` ids each, so that splitting it into
micro-batches and across ranks is the same for every task.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common.core.errors import StageError
from stages.common.core.schema import CATEGORIES, TokensMeta
from stages.common.modelling.models import build_model
from stages.common.modelling.windows import Windows, next_token_loss
from stages.train.techniques import rows_at_once


class Task:
    """The base: what every task provides (see the module docstring)."""

    name = "task"
    categories: tuple[str, ...] = CATEGORIES  # the tensor meter's categories for this task's runs
    data_attributes: tuple[str, ...] = ()  # what holds its corpus (left out of `without_data`)

    def without_data(self) -> Task:
        """A copy without its corpus: what a dry run in another process needs (the model, the
        rows' shape, the loss), cheap to send."""
        light = copy.copy(self)
        for name in self.data_attributes:
            setattr(light, name, None)
        return light

    def make_model(self, p: Any, dry_run: bool) -> torch.nn.Module:
        """The model to train, made under the caller's device (and seeded by it)."""
        raise NotImplementedError

    def row_length(self, p: Any) -> int:
        """Ids per row of a batch."""
        raise NotImplementedError

    def sequence_length(self, p: Any) -> int:
        """Positions the model reads per row (the throughput's and the budget's unit)."""
        return self.row_length(p) - 1

    def loss(self, model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fake_rows(self, n: int, p: Any, device: torch.device) -> torch.Tensor:
        """`n` rows for the dry run (shapes only)."""
        return torch.zeros(n, self.row_length(p), dtype=torch.long, device=device)

    def param_category(self, name: str, param: torch.Tensor) -> str:
        """The meter's category of a parameter or buffer."""
        return "parameters"

    def sample(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        """`n` training rows drawn with `rng`."""
        raise NotImplementedError

    def validate(self, model: torch.nn.Module, p: Any, device: torch.device,
                 forward: Any) -> dict[str, float]:
        """Validation figures (`val_loss` at least); `forward()` is the techniques' context."""
        raise NotImplementedError


class LanguageModelling(Task):
    """Next-token prediction on windows of context + 1 ids of data/tokens, from a freshly
    initialised model (its input embedding from Word2Vec when given)."""

    name = "language modelling"
    data_attributes = ("train", "val", "word2vec")

    def __init__(self, meta: TokensMeta, tokens: Path | None = None, context: int = 0,
                 word2vec: np.ndarray | None = None, seed: int = 0) -> None:
        self.meta, self.word2vec, self.seed = meta, word2vec, seed
        self.train = self.val = None
        if tokens is not None:
            self.train = Windows(tokens / "train.bin", meta.dtype, context, meta.vocab_size)
            self.val = Windows(tokens / "validation.bin", meta.dtype, context, meta.vocab_size)

    def make_model(self, p: Any, dry_run: bool) -> torch.nn.Module:
        model = build_model(p.model, self.meta.vocab_size, self.meta.special_ids.model_dump())
        if self.word2vec is not None and not dry_run:
            init_embedding_from_word2vec(model, self.word2vec, self.seed)
        return model

    def row_length(self, p: Any) -> int:
        return p.model.context + 1

    def loss(self, model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return next_token_loss(model, rows)

    def sample(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        assert self.train is not None
        return self.train.batch(self.train.random_starts(rng, n))

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, p: Any, device: torch.device,
                 forward: Any) -> dict[str, float]:
        """Mean next-token loss on fixed validation windows: eval_batches × batch_size of them,
        the same whatever the micro-batch, run micro_batch_size at a time (its memory bound)."""
        assert self.val is not None
        model.eval()
        total, count = 0.0, 0
        for batch in self.val.fixed_batches(p.eval_batches, p.batch_size):
            for rows in batch.split(rows_at_once(p)):
                with forward():
                    loss = next_token_loss(model, rows.to(device))
                total += loss.item() * rows.size(0)
                count += rows.size(0)
        model.train()
        if count == 0:
            raise StageError("the validation split is shorter than one window: lower train.model.context")
        return {"val_loss": total / count}


def init_embedding_from_word2vec(model: torch.nn.Module, aligned: np.ndarray, seed: int) -> None:
    """Copy Word2Vec's vectors (row i = token id i) into the input embedding. A different width
    goes through a fixed random projection; either way rows are rescaled to the standard
    deviation of the embedding they replace, so the rest of the initialisation stays in scale."""
    weight = model.get_input_embeddings().weight
    if aligned.shape[0] != weight.shape[0]:
        raise StageError(f"data/embed/aligned.npy has {aligned.shape[0]} rows for a vocabulary of "
                         f"{weight.shape[0]}: rerun the embed stage on these tokens")
    vectors = torch.from_numpy(aligned).float()
    if vectors.shape[1] != weight.shape[1]:
        g = torch.Generator().manual_seed(seed)
        projection = torch.randn(vectors.shape[1], weight.shape[1], generator=g) / math.sqrt(vectors.shape[1])
        vectors = vectors @ projection
    with torch.no_grad():
        vectors *= weight.std() / vectors.std().clamp_min(1e-12)
        weight.copy_(vectors.to(weight.device, weight.dtype))
