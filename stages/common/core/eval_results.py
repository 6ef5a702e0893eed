"""What evaluate hands to the report: one typed row per model in data/eval/results.json
(`EvalRow`), the categories generation memory is counted in, and the figures of the machine
(MEASURED) that live in data/metrics/evaluate.json instead. Shared by evaluate, the report,
the planner's inference estimate and their tests; a field added here reruns only those stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict

from stages.common.core.schema import Handoff, load_json, read_rows

# What the generation meter counts (stages/common/modelling/generation.py), in the report's order.
GEN_CATEGORIES = ("weights", "kv_cache", "activations", "logits")

# figures of the machine a model was measured on, not of the model: data/metrics/evaluate.json
# holds them (`<name>_<figure>`); results.json, a cached output, the same bytes on any machine
MEASURED = ("load_seconds", "ms_per_token_b1", "ms_per_token_batch", "latency_seconds", "rss_peak_mib",
            "seconds",
            "rss_start_mib", "rss_tensor_mib",
            "kv8_ms_per_token", "kv4_ms_per_token",  # latency with an int8 / int4 KV cache
            "sparse_ms_per_token_b1")  # latency with the pruned weights kept sparse


class GenerationPoint(Handoff):
    """One batch × context of evaluate's metered generation (stages/common/modelling/generation.py):
    the peak's tensor MiB by category, when it happened, and the KV cache at the end beside its
    closed form."""

    batch: int
    context: int
    prompt: int
    peak_mib: float
    weights_mib: float
    kv_cache_mib: float  # at the peak: the cache, and a layer's tensor while concatenation grows it
    activations_mib: float
    logits_mib: float
    peak_phase: str
    peak_step: int
    kv_cache_end_mib: float
    kv_cache_predicted_mib: float


class KVQuantPoint(Handoff):
    """The trained model's generation with one KV cache at the grid's largest batch × context:
    bits 0 the exact cache (the model's dtype), 8 or 4 the quantized one
    (stages/common/modelling/kvquant.py). The cache at the end metered and in closed form, the peak, and
    the perplexity of validation windows read position by position through that cache."""

    bits: int
    batch: int
    context: int
    kv_cache_end_mib: float
    kv_cache_predicted_mib: float
    peak_mib: float
    activations_mib: float  # at the peak: the quantized cache's layer read back in the model's dtype is here
    ppl: float
    tokens: int  # positions the perplexity averages over


class SparseRuntime(Handoff):
    """A pruned variant with its weights kept sparse in memory (stages/common/weights/sparse.py)
    beside the same variant decoded dense: weight bytes, the tensor peak of one forward pass
    at evaluate's batch and of one sequence, the generation peak of one sequence at the
    largest context, and the largest logit difference (the same function)."""

    modules: int  # linear layers and embeddings kept sparse
    weights_mib: float
    dense_weights_mib: float
    forward_peak_mib: float  # at evaluate's batch × context; dense: the row's tensor_peak_mib
    forward_peak_b1_mib: float
    dense_forward_peak_b1_mib: float
    generation_peak_b1_mib: float
    dense_generation_peak_b1_mib: float
    max_logit_diff: float


class BatchFit(Handoff):
    """The largest batch whose generation peak fits the budget at one context: read off the
    line through the two largest metered batches (an upper bound), then metered (None: not run)."""

    context: int
    budget_mib: float
    batch: int  # the line's, or one fewer for each metered batch over the budget
    line_batch: int
    line_mib: float  # the line's peak at line_batch
    checked_mib: float | None = None  # the metered peak of `batch`


class EvalRow(Handoff):
    """One model's row of data/eval/results.json (written by evaluate, read by the report); the
    MEASURED figures are in data/metrics/evaluate.json, and `eval_rows` joins them again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    status: Literal["ok", "unsupported", "failed"]
    reason: str | None = None
    load_seconds: float | None = None
    params: int | None = None
    nonzero_params: int | None = None
    val_ppl: float | None = None
    val_top1: float | None = None
    val_top5: float | None = None
    test_ppl: float | None = None
    test_top1: float | None = None
    test_top5: float | None = None
    top1: float | None = None
    top5: float | None = None
    tensor_peak_mib: float | None = None
    tensor_weights_mib: float | None = None
    ms_per_token_b1: float | None = None
    ms_per_token_batch: float | None = None
    latency_seconds: float | None = None
    generations: list[str] | None = None  # sampled, one per prompt: "prompt | continuation"
    greedy: list[str] | None = None  # greedy, one per prompt
    greedy_repetition: float | None = None  # the greedy ones' mean 1 − distinct tokens / tokens
    cls_accuracy: float | None = None
    cls_precision_macro: float | None = None
    cls_recall_macro: float | None = None
    cls_f1_macro: float | None = None
    cls_confusion: list[list[int]] | None = None
    rss_peak_mib: float | None = None
    seconds: float | None = None
    bytes_on_disk: int | None = None
    size_ratio: float | None = None
    generation: list[GenerationPoint] | None = None
    max_batch: list[BatchFit] | None = None
    kv_cache_error: float | None = None  # the largest |KV cache − closed form| / closed form over the grid
    kv_quant: list[KVQuantPoint] | None = None
    sparse: SparseRuntime | None = None

    def figures(self) -> dict[str, object]:
        """The row as a mapping of the figures it has (None left out)."""
        return self.model_dump(exclude_none=True)


def eval_rows(results: Path, metrics: Path) -> list[dict[str, Any]]:
    """The evaluation's rows (results.json) with each model's MEASURED figures from its metrics
    file (missing there: left out, as results.json leaves out what a row has not)."""
    loaded = load_json(metrics) if metrics.is_file() else {}
    measured: dict[str, Any] = loaded if isinstance(loaded, dict) else {}
    rows = []
    for row in read_rows(results, EvalRow):
        figures = row.figures()
        figures.update({k: measured[f"{row.name}_{k}"] for k in MEASURED if f"{row.name}_{k}" in measured})
        rows.append(figures)
    return rows
