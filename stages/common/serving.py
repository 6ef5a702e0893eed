"""The report's generation memory: per evaluated model, the metered greedy generation with a
KV cache (evaluate; stages/common/generation.py) at the largest batch × context of its grid,
the peak by category, the KV cache beside its closed form, and per context the largest batch
within the budget, with that batch metered where evaluate ran it."""

from __future__ import annotations

from typing import Any

from stages.common.doc import Doc, num

CATEGORIES = ("weights", "kv_cache", "activations", "logits")  # as the generation meter counts them


def section(doc: Doc, results: list[dict[str, Any]]) -> None:
    rows = [r for r in results if r.get("status") == "ok" and r.get("generation")]
    if not rows:
        return
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
                      *[num(p[f"{c}_mib"], 2) for c in CATEGORIES], num(p["kv_cache_predicted_mib"], 3),
                      num(p["kv_cache_end_mib"], 3), f"{r['kv_cache_error'] * 100:.2f} %"])
    doc.table(["model", "batch × context", "peak MiB", "weights", "KV cache", "activations", "logits",
               "KV closed form", "KV metered", "KV error (grid)"], table)
    fits = [(r["name"], fit) for r in rows for fit in r.get("max_batch") or []]
    if fits:
        budget = fits[0][1]["budget_mib"]
        doc.para(f"The largest batch whose generation peak fits {num(budget)} MiB, per context: read off the line "
                 "through the two largest metered batches (every tensor but the weights grows with the batch), "
                 "and at the largest context that batch metered too.")
        doc.table(["model", "context", "largest batch", "line's peak MiB", "metered peak MiB"],
                  [[name, num(fit["context"]), num(fit["batch"]), num(fit["line_mib"], 2), num(fit.get("checked_mib"), 2)]
                   for name, fit in fits])
