"""The report's generation memory: per evaluated model, the metered greedy generation with a
KV cache (evaluate; stages/common/modelling/generation.py) at the largest batch × context of its grid,
the peak by category, the KV cache beside its closed form, and per context the largest batch
within the budget, with that batch metered where evaluate ran it; and the trained model's
quantized KV caches beside the exact one: bytes, perplexity, latency; and pruned variants with
their weights kept sparse in memory beside their dense decoding."""

from __future__ import annotations

from typing import Any

from stages.common.core.eval_results import GEN_CATEGORIES
from stages.report.document import Doc, num


def section(doc: Doc, results: list[dict[str, Any]]) -> None:
    rows = [r for r in results if r.get("status") == "ok" and r.get("generation")]
    if rows:
        generation(doc, rows)
    sparse_weights(doc, results)


def generation(doc: Doc, rows: list[dict[str, Any]]) -> None:
    doc.heading(1, "Generation memory")
    first = rows[0]["generation"]
    doc.para(f"Greedy decoding with transformers' DynamicCache from a {first[0]['prompt']}-token prompt "
             "until the cache holds the context, under the tensor meter: the peak's MiB by category at the "
             "largest batch × context of the grid, and the KV cache at the end against its closed form "
             "(2 × layers × batch × context × KV heads × head size × bytes per value). The largest error of "
             "that form over the whole grid is the last column.")
    table = []
    for r in rows:
        p = max(r["generation"], key=lambda q: (q["context"], q["batch"]))
        table.append([r["name"], f"{p['batch']} × {p['context']}", num(p["peak_mib"], 2),
                      *[num(p[f"{c}_mib"], 2) for c in GEN_CATEGORIES], num(p["kv_cache_predicted_mib"], 3),
                      num(p["kv_cache_end_mib"], 3), f"{r['kv_cache_error'] * 100:.2f} %"])
    doc.table(["model", "batch × context", "peak MiB", "weights", "KV cache", "activations", "logits",
               "KV closed form", "KV metered", "KV error (grid)"], table)
    fits = [(r["name"], fit) for r in rows for fit in r.get("max_batch") or []]
    if fits:
        budget = fits[0][1]["budget_mib"]
        doc.para(f"The largest batch whose generation peak fits {num(budget)} MiB, per context: read off "
                 "the line through the two largest metered batches (every tensor but the weights grows with "
                 "the batch), and at the largest context that batch metered too.")
        doc.table(["model", "context", "largest batch", "line's peak MiB", "metered peak MiB"],
                  [[name, num(fit["context"]), num(fit["batch"]), num(fit["line_mib"], 2),
                    num(fit.get("checked_mib"), 2)]
                   for name, fit in fits])
    quantized_cache(doc, rows)


def quantized_cache(doc: Doc, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        points = r.get("kv_quant")
        if not points:
            continue
        exact = points[0]
        doc.para(f"{r['name']}: the KV cache quantized per token and head (int8, int4: a byte or half a "
                 "byte a value and one fp32 scale per token and head; stages/common/modelling/kvquant.py) "
                 f"beside the exact cache (bits 0), at batch {exact['batch']} × context {exact['context']}; "
                 f"perplexity over {exact['tokens']} validation positions read one at a time through the "
                 "cache; latency in ms per token generated at the latency batch.")
        table = []
        for p in points:
            ms = r.get("ms_per_token_batch") if p["bits"] == 0 else r.get(f"kv{p['bits']}_ms_per_token")
            exact_ms = r.get("ms_per_token_batch")
            table.append([str(p["bits"]) if p["bits"] else "exact", num(p["kv_cache_end_mib"], 3),
                          num(p["kv_cache_predicted_mib"], 3),
                          num(exact["kv_cache_end_mib"] / p["kv_cache_end_mib"], 2),
                          num(p["peak_mib"], 2), num(p["ppl"], 2), num(p["ppl"] / exact["ppl"], 4),
                          num(ms, 2),
                          num(ms / exact_ms, 2) if ms is not None and exact_ms else "–"])
        doc.table(["KV cache", "KV MiB metered", "KV closed form", "× smaller", "peak MiB", "perplexity",
                   "× exact's", "ms / token", "× exact's"], table)


def sparse_weights(doc: Doc, results: list[dict[str, Any]]) -> None:
    rows = [r for r in results if r.get("status") == "ok" and r.get("sparse")]
    if not rows:
        return
    doc.heading(1, "Sparse weights at run time")
    doc.para("Pruned variants held in memory as a bitmask of their non-zero weights and those values "
             "(decoded a layer at a time, the output head a slice of the vocabulary at a time; "
             "stages/common/weights/sparse.py) beside the same variant decoded dense on load: the weights' "
             "MiB, the tensor peak of one forward pass at evaluate's batch and of one sequence, one "
             "sequence's generation peak, and the latency at batch 1. The logits stay the same (largest "
             "difference in the last column).")
    table = []
    for r in rows:
        s = r["sparse"]
        ms, dense_ms = r.get("sparse_ms_per_token_b1"), r.get("ms_per_token_b1")
        table.append([r["name"], num(s["modules"]),
                      f"{num(s['dense_weights_mib'], 2)} → {num(s['weights_mib'], 2)}",
                      f"{num(r['tensor_peak_mib'], 1)} → {num(s['forward_peak_mib'], 1)}",
                      f"{num(s['dense_forward_peak_b1_mib'], 2)} → {num(s['forward_peak_b1_mib'], 2)}",
                      f"{num(s['dense_generation_peak_b1_mib'], 2)} → {num(s['generation_peak_b1_mib'], 2)}",
                      num(s["generation_peak_b1_mib"] / s["dense_generation_peak_b1_mib"], 3),
                      f"{num(dense_ms, 2)} → {num(ms, 2)}", f"{s['max_logit_diff']:.1e}"])
    doc.table(["model", "sparse modules", "weights MiB", "forward peak MiB (batch)",
               "forward peak MiB (1 sequence)",
               "generation peak MiB (1 sequence)", "generation × dense", "ms / token (batch 1)",
               "logit diff"], table)
