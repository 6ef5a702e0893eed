"""One model measured, in a fresh process of its own: load time, quality, inference peak and
generations, the probe, the sparse run, the process's peak RSS."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stages.common.core.schema import TokensMeta, read_typed
from stages.common.harness.workers import share_cores
from stages.common.memory.rss_meter import peak_rss_mib, reset_peak_rss, start_rss_mib
from stages.common.modelling.halfmath import half_products_in_float
from stages.common.weights.loading import load_model_folder, weight_counts
from stages.common.weights.sparse import sparse_figures
from stages.evaluate.generation import generation_figures, has_kv_cache
from stages.evaluate.metrics import tensor_peaks
from stages.evaluate.probe import probe
from stages.evaluate.quality import quality_figures, windows

if TYPE_CHECKING:
    from stages.evaluate import Params, Paths

log = logging.getLogger("lmmem.evaluate")

TRAINED = "model"  # the row of data/model, the reference of every ratio


def measure(name: str, folder: Path, params: Params, paths: Paths, context: int, seed: int,
            threads: int) -> dict[str, Any]:
    """Everything about one model but its latency; runs in a fresh process (beside another
    model's, each on its share of the cores)."""
    share_cores(threads)
    reset_peak_rss()  # the imports are the same for every model: leave them out
    torch.manual_seed(seed)
    meta = read_typed(paths.tokens / "meta.json", TokensMeta)
    started = time.perf_counter()
    model = load_model_folder(folder)
    result: dict[str, Any] = {"name": name, "status": "ok", "load_seconds": time.perf_counter() - started}
    phases: dict[str, float] = {}
    clock = time.perf_counter()
    result["params"], result["nonzero_params"] = weight_counts(model)
    result.update(quality_figures(model, params, paths, meta.dtype, context))
    phases["quality"], clock = time.perf_counter() - clock, time.perf_counter()

    rows = windows(paths.tokens, "validation", meta.dtype, context, 1, params.batch_size)[0]
    result.update(generation_figures(model, folder, rows, params, seed, reference=name == TRAINED))
    phases["inference peak and generation"], clock = time.perf_counter() - clock, time.perf_counter()
    if params.classify and meta.labels:
        with half_products_in_float():
            result.update(probe(model, paths, params, meta, seed))
        phases["probe"], clock = time.perf_counter() - clock, time.perf_counter()
    if params.sparse_runtime and has_kv_cache(model):
        result["sparse"] = sparse_figures(model, rows, max(params.generation_contexts),
                                          params.generation_prompt)
        phases["sparse at run time"] = time.perf_counter() - clock  # last: the model is sparse from here on
    result["rss_peak_mib"], result["rss_start_mib"] = peak_rss_mib(), start_rss_mib()
    result["rss_tensor_mib"] = max(tensor_peaks(result))
    result["seconds"] = time.perf_counter() - started
    log.info("%s: %.1f s (%s)", name, result["seconds"],
             ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    return result
