"""The report's fine-tuning section: every run of the finetune stage
(data/metrics/finetune/<name>.json), in params.yaml's order, as a table against the baseline
run with the test split's scores beside evaluate's bag-of-Word2Vec baseline and frozen
probe, and two figures: the tensor peak by category measured beside estimated, and memory
against test accuracy with its Pareto front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.common.artifacts import read_json
from stages.common.comparison import front, measured_beside_estimated, times
from stages.common.doc import Doc, num
from stages.common.svg import scatter

CATEGORIES = ["frozen", "trainable", "adapters", "gradients", "optimizer", "activations", "temporaries"]


def read_tuned(metrics_dir: Path, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs params.yaml names that have metrics, in its order."""
    runs = (params.get("finetune") or {}).get("runs") or {}
    folder = metrics_dir / "finetune"
    return [{"name": name, **read_json(folder / f"{name}.json")} for name in runs
            if (folder / f"{name}.json").is_file()]


def method(row: dict[str, Any]) -> str:
    keys = json.loads(row.get("run_keys", "{}"))
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in keys.items()) or "–"


def section(doc: Doc, rows: list[dict[str, Any]], params: dict[str, Any], results: list[dict[str, Any]]) -> None:
    doc.heading(2, "Fine-tuning")
    if not rows:
        doc.para("No run of finetune.runs has been made (dvc repro runs one finetune@<name> stage per run).")
        return
    name = (params.get("finetune") or {}).get("baseline", "full")
    base = next((r for r in rows if r["name"] == name), {})
    worst = max((abs(r.get(f"est_error_{c}_peak_mib", 0.0)) for r in rows for c in [*CATEGORIES, "total"]),
                default=0.0)
    doc.para(f"The trained model fine-tuned as a sentiment classifier by each run of finetune.runs, "
             f"{num(rows[0].get('steps'), 0)} optimizer steps each, the settings in finetune.shared the same for "
             f"all: the tensor meter's peak by category (at the moment of the total peak), the dry run's estimate "
             f"of the total, and the test split's scores, against {base.get('name', '–')}. The estimate's largest "
             f"error over every run and category: {worst * 100:.2f} %.")
    doc.table(["run", "train keys", *CATEGORIES, "measured MiB", "estimated MiB", "× baseline", "docs/s",
               "test accuracy", "macro F1"],
              [[r["name"], method(r), *[num(r.get(f"mem_at_peak_{c}_mib"), 2) for c in CATEGORIES],
                num(r.get("mem_total_peak_mib")), num(r.get("est_total_peak_mib")),
                times(r.get("mem_total_peak_mib"), base.get("mem_total_peak_mib")), num(r.get("docs_per_sec"), 0),
                num(r.get("accuracy"), 3), num(r.get("f1_macro"), 3)] for r in rows])
    others = [(r["name"], r.get("cls_accuracy"), r.get("cls_f1_macro")) for r in results
              if r["name"] in ("model", "word2vec-bow") and "cls_accuracy" in r]
    if others:
        doc.para("Beside them, evaluate's classifiers on the same test split (a logistic head on fixed features): "
                 + "; ".join(f"{'the frozen probe of the trained model' if n == 'model' else 'bag of Word2Vec'} "
                             f"accuracy {a:.3f}, macro F1 {f:.3f}" for n, a, f in others) + ".")
    doc.figure("finetune_memory", measured_beside_estimated(
        "Fine-tuning: tensor peak by category, measured and estimated", rows, CATEGORIES),
        "Each run's tensor peak by category: the meter's (solid) and the dry run's (pale).")
    points = [(r["name"], r["mem_total_peak_mib"], r["accuracy"]) for r in rows
              if "mem_total_peak_mib" in r and "accuracy" in r]
    lean = front(points, higher_is_better=True)
    doc.figure("finetune_pareto", scatter("Fine-tuning: memory against test accuracy", "tensor peak MiB",
                                          "test accuracy", points, lean),
               "Every run; the dashed line joins the front (no other has less memory and a higher accuracy).")
    doc.para("Front, memory against accuracy: " + ", ".join(lean) + ".")
