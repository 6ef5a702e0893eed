"""What evaluate writes in data/eval: results.json (everything per model but the figures of the
machine), table.csv (the DVC plot of size against perplexity), generations.md (prompts ×
models) and the trained model's generation timeline: the same bytes on any machine."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.common.core.artifacts import atomic_dir, write_json, write_params
from stages.common.core.eval_results import MEASURED, EvalRow
from stages.common.core.params import BaseParams
from stages.common.memory.timeline import write_rows

if TYPE_CHECKING:
    from stages.evaluate import Params

TABLE = ("name", "status", "bytes_on_disk", "size_ratio", "params", "nonzero_params", "val_ppl", "test_ppl",
         "top1", "top5", "tensor_peak_mib", "greedy_repetition", "cls_accuracy", "cls_f1_macro")


def write_outputs(out: Path, rows: list[dict[str, Any]], timeline: list[dict[str, Any]], params: Params,
                  base: BaseParams) -> None:
    with atomic_dir(out, "evaluate") as tmp:
        if timeline:
            write_rows(tmp / "timeline.csv", timeline)
        write_json(tmp / "results.json",
                   [EvalRow.model_validate({k: v for k, v in row.items() if k not in MEASURED})
                    for row in rows])  # the machine's figures: in the metrics
        with (tmp / "table.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TABLE, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        lines = ["# Generations", "", (f"Sampled (seed {base.seed}, temperature {params.temperature}, "
                 f"top-k {params.top_k}), then greedy (its repetition per model in results.json); "
                                       "prompt | continuation."), ""]
        for i, prompt in enumerate(params.prompts):
            lines += [f"## {prompt}", ""]
            for key, title in (("generations", "Sampled:"), ("greedy", "Greedy:")):
                lines += [title, "", *[f"- **{row['name']}**: {row[key][i]}" for row in rows if key in row],
                          ""]
        (tmp / "generations.md").write_text("\n".join(lines), encoding="utf-8")
        write_params(tmp, base=base, evaluate=params)
