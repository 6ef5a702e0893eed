"""The report's fine-tuning sections.

- Fine-tuning: every run of the finetune stage (data/metrics/finetune/<name>.json), in
  params.yaml's order, as a table against the baseline run with the test split's scores
  beside evaluate's bag-of-Word2Vec baseline and frozen probe, and two figures: the tensor
  peak by category measured beside estimated, and memory against test accuracy with its
  Pareto front.
- Adapting to a new domain: every run of the adapt stage (data/metrics/adapt/<name>.json)
  the same way, its quality the perplexity on the new domain and on the original one (what
  the run forgot), each beside the trained model's own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.common.core.artifacts import read_json
from stages.report.charts import scatter
from stages.report.comparison import front, measured_beside_estimated, times
from stages.report.document import Doc, num

CATEGORIES = ["frozen", "trainable", "adapters", "gradients", "optimizer", "activations", "temporaries"]


def read_tuned(metrics_dir: Path, params: dict[str, Any], stage: str = "finetune") -> list[dict[str, Any]]:
    """The runs of `stage` params.yaml names that have metrics, in its order."""
    runs = (params.get(stage) or {}).get("runs") or {}
    folder = metrics_dir / stage
    return [{"name": name, **read_json(folder / f"{name}.json")} for name in runs
            if (folder / f"{name}.json").is_file()]


def method(row: dict[str, Any]) -> str:
    keys = json.loads(row.get("run_keys", "{}"))
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in keys.items()) or "–"


def baseline_and_worst(rows: list[dict[str, Any]], params: dict[str, Any],
                       stage: str) -> tuple[dict[str, Any], float]:
    """The stage's baseline run (its row, or {}) and the dry run's largest error over every run
    and category."""
    name = (params.get(stage) or {}).get("baseline", "full")
    worst = max((abs(r.get(f"est_error_{c}_peak_mib", 0.0)) for r in rows for c in [*CATEGORIES, "total"]),
                default=0.0)
    return next((r for r in rows if r["name"] == name), {}), worst


MEMORY_COLUMNS = ["run", "train keys", *CATEGORIES, "measured MiB", "estimated MiB", "× baseline"]
FEATURES = {True: "the frozen probe of the trained model", False: "bag of Word2Vec"}  # evaluate's classifiers


def memory_cells(r: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """A run's MEMORY_COLUMNS: its keys, the meter's categories at the peak, measured and estimated total."""
    return [r["name"], method(r), *[num(r.get(f"mem_at_peak_{c}_mib"), 2) for c in CATEGORIES],
            num(r.get("mem_total_peak_mib")), num(r.get("est_total_peak_mib")),
            times(r.get("mem_total_peak_mib"), base.get("mem_total_peak_mib"))]


def figures(doc: Doc, stage: str, title: str, rows: list[dict[str, Any]], key: str, label: str,
            higher_is_better: bool) -> list[str]:
    """The memory by category measured beside estimated, and memory against `key` with its front."""
    doc.figure(f"{stage}_memory", measured_beside_estimated(
        f"{title}: tensor peak by category, measured and estimated", rows, CATEGORIES),
        "Each run's tensor peak by category: the meter's (solid) and the dry run's (pale).")
    points = [(r["name"], r["mem_total_peak_mib"], r[key]) for r in rows if "mem_total_peak_mib" in r
              and key in r]
    lean = front(points, higher_is_better=higher_is_better)
    doc.figure(f"{stage}_pareto",
               scatter(f"{title}: memory against {label}", "tensor peak MiB", label, points, lean),
               f"Every run; the dashed line joins the front (no other has less memory and a "
               f"{'higher' if higher_is_better else 'lower'} {label}).")
    return lean


def section(doc: Doc, rows: list[dict[str, Any]], params: dict[str, Any],
            results: list[dict[str, Any]]) -> None:
    doc.heading(2, "Fine-tuning")
    if not rows:
        doc.para("No run of finetune.runs has been made (dvc repro runs one finetune@<name> stage per run).")
        return
    base, worst = baseline_and_worst(rows, params, "finetune")
    doc.para(f"The trained model fine-tuned as a sentiment classifier by each run of finetune.runs, "
             f"{num(rows[0].get('steps'), 0)} optimizer steps each, the settings in finetune.shared the "
             "same for all: the tensor meter's peak by category (at the moment of the total peak), the dry "
             f"run's estimate of the total, and the test split's scores, against {base.get('name', '–')}. "
             f"The estimate's largest error over every run and category: {worst * 100:.2f} %.")
    doc.table([*MEMORY_COLUMNS, "docs/s", "test accuracy", "macro F1"],
              [[*memory_cells(r, base), num(r.get("docs_per_sec"), 0), num(r.get("accuracy"), 3),
                num(r.get("f1_macro"), 3)] for r in rows])
    others = [(r["name"], r.get("cls_accuracy"), r.get("cls_f1_macro")) for r in results
              if r["name"] in ("model", "word2vec-bow") and "cls_accuracy" in r]
    if others:
        doc.para("Beside them, evaluate's classifiers on the same test split (a logistic head on fixed "
                 "features): "
                 + "; ".join(f"{FEATURES[n == 'model']} accuracy {a:.3f}, macro F1 {f:.3f}"
                             for n, a, f in others) + ".")
    lean = figures(doc, "finetune", "Fine-tuning", rows, "accuracy", "test accuracy", higher_is_better=True)
    doc.para("Front, memory against accuracy: " + ", ".join(lean) + ".")


def adapt_section(doc: Doc, rows: list[dict[str, Any]], params: dict[str, Any],
                  domain: dict[str, Any] | None) -> None:
    doc.heading(2, "Adapting to a new domain")
    if not rows:
        doc.para("No run of adapt.runs has been made (dvc repro runs one adapt@<name> stage per run).")
        return
    base, worst = baseline_and_worst(rows, params, "adapt")
    corpus = (f"{domain.get('source', '–')} ({num(domain.get('tokens_train'), 0)} training tokens, "
              f"{100 * domain.get('unk_rate_train', 0.0):.1f} % of its words unknown to the model)"
              if domain else "–")
    doc.para(f"The trained model trained on, as a language model, on a new domain, {corpus}, by each run of "
             f"adapt.runs, {num(rows[0].get('steps'), 0)} optimizer steps each, the settings in "
             "adapt.shared the same for all: the tensor peak by category, the dry run's estimate (its "
             f"largest error over every run and category: {worst * 100:.2f} %), and the perplexity on each "
             "domain's test split, before (the trained model) and after. The original domain's rise is "
             "what the run forgot.")
    doc.table([*MEMORY_COLUMNS, "windows/s", "new domain ppl", "original ppl"],
              [[*memory_cells(r, base), num(r.get("docs_per_sec"), 1),
                f"{num(r.get('base_domain_ppl'), 1)} → {num(r.get('domain_ppl'), 1)}",
                f"{num(r.get('base_original_ppl'), 1)} → {num(r.get('original_ppl'), 1)}"] for r in rows])
    lean = figures(doc, "adapt", "Adapting", rows, "domain_ppl", "new-domain perplexity",
                   higher_is_better=False)
    doc.para("Front, memory against new-domain perplexity: " + ", ".join(lean) + ".")
