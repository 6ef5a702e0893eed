"""The report's comparison of memory techniques: every configuration the compare stage
trained (data/metrics/compare/<name>.json), in params.yaml's order, as a table against the
baseline configuration and three figures: the tensor peak by category measured beside
estimated, memory against perplexity with its Pareto front, memory against tokens/s with
its front."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from stages.common.core.artifacts import read_json
from stages.common.core.schema import CATEGORIES
from stages.report.charts import scatter, stacked_bars
from stages.report.document import Doc, num


def read_compared(metrics_dir: Path, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The configurations params.yaml names that have metrics, in its order (a configuration
    since removed from params.yaml is left out, its old file not deleted: DVC's to manage)."""
    configs = (params.get("compare") or {}).get("configs") or {}
    folder = metrics_dir / "compare"
    return [{"name": name, **read_json(folder / f"{name}.json")} for name in configs
            if (folder / f"{name}.json").is_file()]


def front(points: list[tuple[str, float, float]], higher_is_better: bool = False) -> list[str]:
    """Labels on the Pareto front by x: no other point has less memory (x) and a better y
    (lower, or higher with `higher_is_better`)."""
    sign = -1.0 if higher_is_better else 1.0
    ordered = sorted(points, key=lambda p: (p[1], sign * p[2], p[0]))
    found, best = [], math.inf
    for label, _, y in ordered:
        if sign * y < best:
            found.append(label)
            best = sign * y
    return found


def baseline_of(rows: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any] | None:
    name = (params.get("compare") or {}).get("baseline", "baseline")
    return next((r for r in rows if r["name"] == name), None)


def times(value: Any, base: Any) -> str:
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or not base:
        return "–"
    return f"{value / base:.3f}"


def summary_line(rows: list[dict[str, Any]], params: dict[str, Any], tolerance: float = 1.03) -> str | None:
    """The leanest configuration within `tolerance` × the baseline's perplexity."""
    base = baseline_of(rows, params)
    if base is None or len(rows) < 2:
        return None
    fair = [r for r in rows if r.get("val_ppl", math.inf) <= base.get("val_ppl", math.nan) * tolerance]
    if not fair:  # a baseline without a finite perplexity: nothing to measure against
        return None
    lean = min(fair, key=lambda r: (r["mem_total_peak_mib"], r["name"]))
    return (f"Techniques compared: of {len(rows)} configurations trained {num(base.get('steps'), 0)} steps "
            f"each, {lean['name']} held the least tensor memory within {tolerance:.2f} × the baseline's "
            f"perplexity: {times(lean['mem_total_peak_mib'], base['mem_total_peak_mib'])} × the baseline's "
            f"peak ({num(lean['mem_total_peak_mib'])} of {num(base['mem_total_peak_mib'])} MiB) at "
            f"{times(lean['val_ppl'], base['val_ppl'])} × its perplexity and "
            f"{times(lean.get('tokens_per_sec'), base.get('tokens_per_sec'))} × its tokens/s.")


def section(doc: Doc, rows: list[dict[str, Any]], params: dict[str, Any]) -> None:
    doc.heading(2, "Techniques compared")
    if not rows:
        doc.para("No configuration of compare.configs has been trained (dvc repro runs one compare@<name> "
                 "stage per configuration).")
        return
    base = baseline_of(rows, params) or {}
    worst = max((abs(r.get(f"est_error_{c}_peak_mib", 0.0)) for r in rows for c in [*CATEGORIES, "total"]),
                default=0.0)
    doc.para(f"The default model trained under each configuration of compare.configs for the same "
             f"{num(base.get('steps', rows[0].get('steps')), 0)} optimizer steps: the tensor meter's peak by "
             f"category (at the moment of the total peak), the dry run's estimate of the total made before "
             "training, throughput on the unmetered steps and the validation perplexity after the last "
             f"step, against the baseline ({base.get('name', '–')}). The estimate's largest error over every "
             f"configuration and category (each category's own peak): {worst * 100:.2f} %.")
    doc.table(["configuration", "train keys", *CATEGORIES, "measured MiB", "estimated MiB", "× baseline",
               "tokens/s", "× baseline", "val ppl", "× baseline"],
              [[r["name"], keys_text(r.get("config_keys", "{}")),
                *[num(r.get(f"mem_at_peak_{c}_mib")) for c in CATEGORIES],
                num(r.get("mem_total_peak_mib")), num(r.get("est_total_peak_mib")),
                times(r.get("mem_total_peak_mib"), base.get("mem_total_peak_mib")),
                num(r.get("tokens_per_sec"), 0), times(r.get("tokens_per_sec"), base.get("tokens_per_sec")),
                num(r.get("val_ppl")), times(r.get("val_ppl"), base.get("val_ppl"))] for r in rows])
    doc.figure("compare_memory",
               measured_beside_estimated("Tensor peak by category: measured, estimated", rows,
                                         list(CATEGORIES)),
               "Each configuration's tensor peak by category: the meter's (solid) and the dry run's (pale).")
    memory = [(r["name"], r["mem_total_peak_mib"], r["val_ppl"]) for r in rows
              if "mem_total_peak_mib" in r and "val_ppl" in r]
    lean = front(memory)
    doc.figure("compare_pareto", scatter("Memory against perplexity (equal steps)", "tensor peak MiB",
                                         "validation perplexity", memory, lean),
               "Every configuration; the dashed line joins the Pareto front.")
    doc.para("Pareto front, memory against perplexity (no other configuration has both less memory and a "
             "lower perplexity): " + ", ".join(lean) + ".")
    speed = [(r["name"], r["mem_total_peak_mib"], r["tokens_per_sec"]) for r in rows
             if "mem_total_peak_mib" in r and "tokens_per_sec" in r]
    fast = front(speed, higher_is_better=True)
    doc.figure("compare_speed",
               scatter("Memory against throughput", "tensor peak MiB", "tokens/s", speed, fast),
               "Every configuration; the dashed line joins the front (no other has less memory and more "
               "tokens/s).")
    doc.para("Front, memory against throughput: " + ", ".join(fast) + ".")


def measured_beside_estimated(title: str, rows: list[dict[str, Any]], categories: list[str]) -> str:
    """One stacked bar per row: the meter's peak by category at the total's peak, the dry
    run's beside it."""
    return stacked_bars(title, "MiB",
                        [(r["name"], {c: r.get(f"mem_at_peak_{c}_mib", 0.0) for c in categories})
                         for r in rows], categories,
                        beside={r["name"]: {c: r.get(f"est_at_peak_{c}_mib", 0.0) for c in categories}
                                for r in rows})


def keys_text(config_keys: str) -> str:
    """A configuration's train keys as `key=value` pairs (nested keys dotted)."""
    def flat(data: dict[str, Any], prefix: str = "") -> list[str]:
        out = []
        for key, value in data.items():
            out += flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [
                f"{prefix}{key}={json.dumps(value)}"]
        return out

    return ", ".join(flat(json.loads(config_keys))) or "– (the train section)"
