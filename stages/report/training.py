"""The report's training section: the workspace run's loss and perplexity, each run's tensor peak
by category beside the dry run's estimate, the ranks of distributed runs, and memory against
perplexity."""

from __future__ import annotations

import json
import math
from typing import Any

from stages.common.core.schema import CATEGORIES
from stages.report import comparison
from stages.report.charts import line_chart, scatter, stacked_bars
from stages.report.document import Doc, num
from stages.report.provenance import flat


def section(doc: Doc, steps: list[dict[str, str]], workspace: dict[str, Any],
            runs: list[dict[str, Any]]) -> None:
    """The workspace run's curves, and each run's tensor peak by category beside its estimate."""
    doc.heading(1, "Training")
    if steps:
        def series(key: str) -> list[tuple[float, float]]:
            return [(float(r["step"]), float(r[key])) for r in steps if r.get(key)]

        doc.figure("loss", line_chart("Loss (workspace run)", "optimizer step", "cross-entropy",
                                      {"train": series("train_loss"), "validation": series("val_loss")}),
                   "Training and validation loss per step.")
        doc.figure("perplexity",
                   line_chart("Validation perplexity (workspace run)", "optimizer step", "perplexity",
                                            {"validation": [(x, math.exp(y))
                                                            for x, y in series("val_loss")]}),
                   "Validation perplexity per evaluation.")
    if not runs:
        doc.para("No training metrics.")
        return
    doc.para("Tensor memory by category at the moment of each run's peak (measured by the tensor "
             "meter; for a run on several ranks, the largest rank's), the dry-run estimate of the total "
             "made before training beside it.")
    doc.table(["run", "differs from workspace", "ranks", *CATEGORIES, "measured MiB", "estimated MiB",
               "error",
               "tokens/s", "val ppl"],
              [[r["name"], differs(r["params"], workspace), ranks_label(r["train"]),
                *[num(r["train"].get(f"mem_at_peak_{c}_mib")) for c in CATEGORIES],
                num(r["train"].get("mem_total_peak_mib")), num(r["train"].get("est_total_peak_mib")),
                pct(r["train"].get("est_total_peak_mib"), r["train"].get("mem_total_peak_mib")),
                num(r["train"].get("tokens_per_sec"), 0), num(r["train"].get("val_ppl"))] for r in runs])
    doc.figure("memory", stacked_bars("Training tensor peak by category", "MiB",
                                      [(r["name"],
                                        {c: r["train"].get(f"mem_at_peak_{c}_mib", 0.0) for c in CATEGORIES})
                                       for r in runs], CATEGORIES,
                                      {r["name"]: r["train"]["est_total_peak_mib"] for r in runs
                                       if "est_total_peak_mib" in r["train"]}),
               "Measured tensor peak by category (bars) and the estimate (tick), per run.")
    per_rank_table(doc, runs)
    points = [(r["name"], r["train"]["mem_total_peak_mib"], r["train"]["val_ppl"]) for r in runs
              if "mem_total_peak_mib" in r["train"] and "val_ppl" in r["train"]]
    front = comparison.front(points)
    doc.figure("pareto",
               scatter("Memory against perplexity", "tensor peak MiB", "validation perplexity", points,
                                 front), "Every run; the dashed line joins the Pareto front.")
    doc.para("Pareto front (no other run has both less memory and a lower perplexity): " + ", ".join(front)
             + ".")


def ranks_label(train: dict[str, Any]) -> str:
    world = train.get("dist_world_size", 1)
    return "1" if world == 1 else f"{world} × {train.get('dist_strategy', '?')}"


def per_rank_table(doc: Doc, runs: list[dict[str, Any]]) -> None:
    """Each rank of the distributed runs: its own peak per sharded category, its tensor peak
    against the estimate, and its saving against the estimate for ddp of the same run."""
    rows = []
    for r in runs:
        t = r["train"]
        for rank in range(t.get("dist_world_size", 1)):
            p = f"rank{rank}_"
            if f"{p}mem_total_peak_mib" not in t:  # a one-process run has no rank figures
                continue
            saving = t.get(f"{p}saving_vs_ddp")
            rows.append([r["name"], ranks_label(t), str(rank),
                         *[num(t.get(f"{p}mem_{c}_peak_mib"), 2)
                           for c in ("parameters", "gradients", "optimizer")],
                         num(t.get(f"{p}mem_total_peak_mib")), num(t.get(f"{p}est_total_peak_mib")),
                         pct(t.get(f"{p}est_total_peak_mib"), t.get(f"{p}mem_total_peak_mib")),
                         f"{saving * 100:.1f} %" if isinstance(saving, (int, float)) else "–"])
    if rows:
        doc.para("Per rank of the runs on several ranks: what each rank held of what the strategy shards "
                 "(each category's own peak, MiB), its tensor peak against its estimate, and the saving "
                 "against the estimate for ddp of the same run.")
        doc.table(["run", "ranks", "rank", "parameters", "gradients", "optimizer", "measured MiB",
                   "estimated MiB",
                   "error", "saving vs ddp"], rows)


def differs(params: dict[str, Any], workspace: dict[str, Any]) -> str:
    a, b = flat({k: v for k, v in params.items() if k != "flows"}), flat(workspace)
    keys = [k for k in a if a[k] != b.get(k)]
    return ", ".join(f"{k}={json.dumps(a[k], ensure_ascii=False)}" for k in keys) or "–"


def pct(estimate: Any, measured: Any) -> str:
    if not isinstance(estimate, (int, float)) or not isinstance(measured, (int, float)) or not measured:
        return "–"
    return f"{(estimate - measured) / measured * 100:+.2f} %"
