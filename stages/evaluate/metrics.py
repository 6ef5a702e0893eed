"""Evaluate's figures for data/metrics/evaluate.json, from each model's row: its numbers, its
process's predicted peak RSS, its tensor peaks, the quantized caches and the sparse run set
beside their references."""

from __future__ import annotations

from typing import Any

from stages.common.memory import rss_prediction


def tensor_peaks(result: dict[str, Any]) -> list[float]:
    """Every metered tensor peak of one model's measuring process: the forward pass, each
    generation (the grid, the budget's checks, the quantized caches), the sparse run's."""
    found = [result["tensor_peak_mib"], *(p["peak_mib"] for p in result.get("generation") or []),
             *(p["peak_mib"] for p in result.get("kv_quant") or []),
             *(f["checked_mib"] for f in result.get("max_batch") or [] if f.get("checked_mib") is not None)]
    if sparse := result.get("sparse"):
        found += [sparse[k] for k in ("forward_peak_mib", "forward_peak_b1_mib", "dense_forward_peak_b1_mib",
                                      "generation_peak_b1_mib", "dense_generation_peak_b1_mib")]
    return found


def row_metrics(row: dict[str, Any], allocator: str) -> dict[str, Any]:
    """One model's flat figures for data/metrics/evaluate.json, `<model>_<figure>`: its row's
    numbers, the predicted peak RSS of its process (stages.common.memory.rss_prediction), the largest batch
    per context, the generation's peak and cache, each quantized cache against the exact one, the
    sparse run against the dense decoding."""
    metrics: dict[str, Any] = {}
    for key, value in row.items():
        if key not in ("name", "generations", "greedy", "reason", "cls_confusion", "generation", "max_batch",
                       "kv_quant", "sparse") and value is not None:
            metrics[f"{row['name']}_{key}"] = value
    # its process's peak RSS predicted from its tensors (stages.common.memory.rss_prediction)
    if "rss_start_mib" in row:
        metrics.update(rss_prediction.figures("evaluate", allocator, row["rss_start_mib"],
                                              row["rss_tensor_mib"],
                                              row["tensor_weights_mib"], row["rss_peak_mib"],
                                              prefix=f"{row['name']}_"))
    for fit in row.get("max_batch") or []:
        metrics[f"{row['name']}_max_batch_t{fit['context']}"] = fit["batch"]
    if row.get("generation"):
        metrics[f"{row['name']}_generation_peak_mib"] = row["generation"][-1]["peak_mib"]
        metrics[f"{row['name']}_kv_cache_mib"] = row["generation"][-1]["kv_cache_end_mib"]
    exact = (row.get("kv_quant") or [None])[0]
    for point in (row.get("kv_quant") or [])[1:]:  # against the exact cache (bits 0)
        key = f"{row['name']}_kv{point['bits']}"
        metrics[f"{key}_cache_mib"] = point["kv_cache_end_mib"]
        metrics[f"{key}_cache_saving"] = exact["kv_cache_end_mib"] / point["kv_cache_end_mib"]
        metrics[f"{key}_ppl_ratio"] = point["ppl"] / exact["ppl"]
    if sparse := row.get("sparse"):
        metrics[f"{row['name']}_sparse_weights_mib"] = sparse["weights_mib"]
        metrics[f"{row['name']}_sparse_forward_peak_ratio"] = sparse["forward_peak_mib"] / row[
            "tensor_peak_mib"]
        metrics[f"{row['name']}_sparse_generation_peak_b1_ratio"] = (sparse["generation_peak_b1_mib"]
                                                                     / sparse["dense_generation_peak_b1_mib"])
    return metrics
