"""A model's perplexity and next-token top-1/top-5 accuracy on the same fixed windows of the
validation and test splits as every other model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from stages.common.modelling.halfmath import half_products_in_float
from stages.common.modelling.loss import logits_in_chunks
from stages.common.modelling.windows import Windows

if TYPE_CHECKING:
    from stages.evaluate import Params, Paths


def windows(tokens: Path, split: str, dtype: str, context: int, batches: int,
            batch: int) -> list[torch.Tensor]:
    """The same consecutive non-overlapping windows of context + 1 ids for every model."""
    return list(Windows(tokens / f"{split}.bin", dtype, context).fixed_batches(batches, batch))


@torch.no_grad()
def quality(model: torch.nn.Module, batches: list[torch.Tensor], chunk: int = 0) -> dict[str, float]:
    """Mean next-token loss (→ perplexity) and top-1/top-5 accuracy over the windows; the
    logits `chunk` positions at a time (0: a batch's at once)."""
    loss, top1, top5, count = 0.0, 0, 0, 0
    for rows in batches:
        for logits, target in logits_in_chunks(model, rows, chunk):
            loss += F.cross_entropy(logits, target, reduction="sum").item()
            best = logits.topk(5, dim=-1).indices
            top1 += int((best[:, 0] == target).sum())
            top5 += int((best == target[:, None]).any(-1).sum())
            count += target.numel()
            del logits
    return {"ppl": math.exp(loss / count), "top1": top1 / count, "top5": top5 / count}


def quality_figures(model: torch.nn.Module, params: Params, paths: Paths, dtype: str,
                    context: int) -> dict[str, float]:
    """val_* and test_* perplexity and accuracy, and the test split's as top1 and top5."""
    result: dict[str, float] = {}
    for split in ("validation", "test"):
        # bf16 and fp16 products through the fp32 kernel: same figures, 4 × faster
        with half_products_in_float():
            figures = quality(model, windows(paths.tokens, split, dtype, context, params.eval_batches,
                                             params.batch_size), params.loss_chunk_tokens)
        prefix = "val" if split == "validation" else "test"
        result.update({f"{prefix}_ppl": figures["ppl"], f"{prefix}_top1": figures["top1"],
                       f"{prefix}_top5": figures["top5"]})
    result["top1"], result["top5"] = result["test_top1"], result["test_top5"]
    return result
