"""A model's inference memory: the tensor peak of one forward pass, its sampled and greedy
generations, and (transformers models) greedy decoding with a KV cache metered over the grid of
batches × contexts, the largest batch within the budget, the quantized caches beside the exact
one and the timeline of the largest generation module by module (the trained model's)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stages.common.modelling.generation import (
    forward_peak,
    generation_memory,
    generations,
    kv_quantization,
    metered_generation,
    tiled,
)
from stages.common.modelling.models import LSTMLanguageModel

if TYPE_CHECKING:
    from stages.evaluate import Params

TIMELINE_STEPS = 2  # decode steps of the trained model's generation timeline, after its prefill


def has_kv_cache(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and not isinstance(model, LSTMLanguageModel)


def generation_figures(model: torch.nn.Module, folder: Path, rows: torch.Tensor, params: Params, seed: int,
                       reference: bool) -> dict[str, Any]:
    """The figures of one model's inference and generation on validation `rows`; the quantized
    caches and the timeline for the `reference` (the trained model) only."""
    result: dict[str, Any] = {}
    summary = forward_peak(model, rows[:, :-1])[0]
    result["tensor_peak_mib"] = summary["total_peak_mib"]
    result["tensor_weights_mib"] = summary["parameters_peak_mib"]
    result.update(generations(model, folder, params, seed))
    if not has_kv_cache(model):
        return result
    result.update(generation_memory(model, rows, params.generation_batches, params.generation_contexts,
                                    params.generation_prompt, params.generation_budget_mib))
    batch, context = max(params.generation_batches), max(params.generation_contexts)
    if reference and params.kv_cache_bits:
        exact = next(p for p in result["generation"] if (p["batch"], p["context"]) == (batch, context))
        result["kv_quant"] = kv_quantization(model, rows, batch, context, params.generation_prompt,
                                             params.kv_cache_bits, exact)
    if reference:  # its largest generation again, module by module (data/eval/timeline.csv)
        result["timeline"] = metered_generation(model, tiled(rows[:, :params.generation_prompt], batch),
                                                context,
                                                by_module=TIMELINE_STEPS)["timeline"]
    return result
