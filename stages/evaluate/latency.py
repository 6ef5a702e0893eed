"""A model's latency in ms per generated token, in a process with the cores to itself."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.common.core.schema import TokensMeta, read_typed
from stages.common.harness.workers import share_cores
from stages.common.modelling.generation import ms_per_token
from stages.common.weights.loading import load_model_folder
from stages.common.weights.sparse import sparsify
from stages.evaluate.quality import windows

if TYPE_CHECKING:
    from stages.evaluate import Params, Paths

LATENCY_PROMPT = 8  # tokens of validation text the latency's greedy generation starts from


def latency(folder: Path, params: Params, paths: Paths, context: int, threads: int, kv_bits: list[int],
            sparse: bool) -> dict[str, Any]:
    """ms per generated token at batch 1 and at latency_batch (greedy, median of the repeats
    after a warm-up), at latency_batch with each quantized KV cache of `kv_bits`, and, `sparse`,
    at batch 1 with the weights kept sparse, in a fresh process with the cores to itself: no
    other work runs meanwhile."""
    share_cores(threads)
    meta = read_typed(paths.tokens / "meta.json", TokensMeta)
    model = load_model_folder(folder)
    started = time.perf_counter()
    prompt = windows(paths.tokens, "validation", meta.dtype, context, 1,
                     params.batch_size)[0][:1, :LATENCY_PROMPT]
    found = {"ms_per_token_b1": ms_per_token(model, prompt, 1, params.latency_new_tokens,
                                             params.latency_repeats),
             "ms_per_token_batch": ms_per_token(model, prompt, params.latency_batch,
                                                params.latency_new_tokens,
                                                params.latency_repeats)}
    for bits in kv_bits:
        found[f"kv{bits}_ms_per_token"] = ms_per_token(model, prompt, params.latency_batch,
                                                       params.latency_new_tokens,
                                                       params.latency_repeats, bits)
    if sparse and sparsify(model)["swapped"]:
        found["sparse_ms_per_token_b1"] = ms_per_token(model, prompt, 1, params.latency_new_tokens,
                                                       params.latency_repeats)
    return {**found, "latency_seconds": time.perf_counter() - started}
