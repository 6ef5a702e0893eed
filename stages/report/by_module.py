"""The report's memory by module: for the peak step of training (data/plots/train/timeline.csv)
and for the trained model's generation at the largest batch × context of evaluate's grid
(data/eval/timeline.csv), which module's tensors were alive from one module to the next
(stages.common.memory.timeline wrote them): a stacked area per timeline, and a table of the bands at
the peak sample. Static SVG, the same bytes from the same CSVs."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from stages.report.charts import stacked_area
from stages.report.document import Doc, num

FIXED = ("sample", "step", "phase", "module")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A timeline CSV: the band columns (`<band>_mib`) as floats; [] when there is none."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: (v if k in ("phase", "module") else float(v) if k.endswith("_mib") else int(v))
                 for k, v in row.items()} for row in csv.DictReader(f)]


def bands(rows: list[dict[str, Any]]) -> list[str]:
    return [k.removesuffix("_mib") for k in rows[0] if k not in FIXED] if rows else []


def section(doc: Doc, training: list[dict[str, Any]], generation: list[dict[str, Any]]) -> None:
    if not training and not generation:
        return
    doc.heading(1, "Memory by module")
    doc.para("The tensor meter's bytes split by the module whose forward or backward made them "
             "(activations and temporaries in training; activations, KV cache and logits in generation), "
             "the weights, gradients and optimizer state as bands of their own, sampled each time the work "
             "moves on to another module; each sample holds the largest total since the previous one. "
             "`(no module)` is what runs outside every module: the batch, the loss.")
    for rows, name, title, what in ((training, "timeline-train", "Training: the peak step, module by module",
                                     f"the metered step with the largest total (step {training[0]['step']})"
                                     if training else ""),
                                    (generation, "timeline-generation", "Generation, module by module",
                                     ("the trained model's greedy generation at the grid's largest batch × "
                                      "context (its prefill and last decode steps)"))):
        if not rows:
            continue
        names = bands(rows)
        marks = [(r["sample"], r["phase"]) for i, r in enumerate(rows) if i == 0
                 or r["phase"] != rows[i - 1]["phase"]]
        if len(marks) > 12:  # generation: a decode step each; only where prefill ends
            marks = marks[:2]
        doc.figure(name, stacked_area(title, "sample (a module boundary)", "MiB",
                                      {b: [r[f"{b}_mib"] for r in rows] for b in names}, marks),
                   f"Live tensor MiB per band over {what}.")
        peak = max(rows, key=lambda r: sum(r[f"{b}_mib"] for b in names))
        total = sum(peak[f"{b}_mib"] for b in names)
        doc.para(f"At the peak (sample {peak['sample']}, {peak['phase']}, in `{peak['module']}`), "
                 f"{num(total, 2)} MiB:")
        doc.table(["band", "MiB", "share"], [[b, num(peak[f"{b}_mib"], 2), f"{peak[f'{b}_mib'] / total:.1%}"]
                                             for b in sorted(names, key=lambda b: -peak[f"{b}_mib"])
                                             if peak[f"{b}_mib"] > 0])
