"""Token windows and the next-token loss: what training, distillation and evaluation read
from data/tokens and how they score a model on it, written once.

A window is context + 1 consecutive ids of a memory-mapped split: the model reads the first
`context`, and each position's target is the id after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stages.common.core.errors import StageError
from stages.common.modelling.loss import CHUNK, next_token_loss_chunked
from stages.common.modelling.models import logits_of


def check_ids(path: Path, dtype: str, vocab_size: int) -> None:
    """A token file must hold whole ids, each inside the vocabulary: checked on read, in
    chunks (no memory that grows with the file), so a truncated or foreign file is one line
    here instead of a traceback deep inside the model."""
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise StageError(f"{path}: {size} bytes, not a whole number of {dtype} ids (truncated, or not a "
                         "token file)")
    with path.open("rb") as f:
        done = 0
        while chunk := f.read(1 << 22):
            ids = np.frombuffer(chunk, dtype=dtype)
            if ids.size and int(ids.max()) >= vocab_size:
                at = done + int(np.argmax(ids >= vocab_size))
                raise StageError(f"{path}: id {int(ids[at - done])} at position {at} is outside the "
                                 f"vocabulary ({vocab_size} ids in meta.json)")
            done += ids.size


class Windows:
    """Windows of context + 1 ids from a memory-mapped split (input: the first context ids,
    target: the last context)."""

    def __init__(self, path: Path, dtype: str, context: int, vocab_size: int | None = None) -> None:
        if vocab_size is not None:
            check_ids(path, dtype, vocab_size)
        self.ids = np.memmap(path, dtype=dtype, mode="r")
        self.context = context
        if len(self.ids) < context + 2:
            raise StageError(f"{path}: {len(self.ids)} tokens, fewer than train.model.context + 2 "
                             f"({context + 2}); lower the context or use a larger corpus")

    def batch(self, starts: np.ndarray) -> torch.Tensor:
        rows = np.stack([self.ids[s:s + self.context + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows)  # (batch, context + 1)

    def random_starts(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, len(self.ids) - self.context - 1, size=n)

    def fixed_batches(self, n_batches: int, batch: int) -> Iterator[torch.Tensor]:
        """Consecutive non-overlapping windows from the start: the same every evaluation."""
        stride = self.context + 1
        starts = np.arange(0, len(self.ids) - stride + 1, stride)[: n_batches * batch]
        for i in range(0, len(starts), batch):
            yield self.batch(starts[i:i + batch])


def next_token_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's next token; rows are (batch, context + 1). Inside
    `loss.chunked(n)` over n positions at a time, the full logits never made."""
    if chunk := CHUNK.get():
        return next_token_loss_chunked(model, rows, chunk)
    logits = logits_of(model, rows[:, :-1])  # (batch, context, vocab); autocast computes the loss in fp32
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
