"""The planner's conformance suite: its estimate (the dry run on fake tensors, at any size)
against the same question run for real (stages.plan.measure), category by category, on
configurations small enough for this CPU, in one run.

    python -m bench.plan_conformance [--only training tuned distributed inference] [--json FILE]

Four families of tiny shapes (llama with grouped KV heads, qwen2 with tied embeddings and
biased projections, mistral with a sliding window shorter than the context, gpt2), each
through: every training technique's own configurations (the registry's `grid`, as they
land), precisions x activation checkpointing x micro-batches, full fine-tuning, LoRA and
QLoRA, ddp, zero1 and fsdp on 2 ranks (gloo), and inference with a KV cache in the weights'
dtype, 8 or 4 bits. Errors are (estimate - measured) / measured, per category: training, each
category's own peak and the total's; per rank for what a strategy shards; inference, each
category at the peak, and the cache at the end against its closed form. A configuration the
planner refuses (LoRA on gpt2's Conv1D) is listed as refused, not counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import machine
from stages.common.core.errors import StageError
from stages.plan.catalog import Architecture, _llama
from stages.plan.dryrun import Question, estimate
from stages.plan.measure import measure
from stages.train.techniques import REGISTRY

log = logging.getLogger("bench.plan_conformance")

FAMILIES = (
    Architecture("tiny-llama", "llama", _llama(512, 64, 176, 2, 4, 2, 256, 10000.0)),
    Architecture("tiny-qwen2", "qwen2", _llama(512, 64, 160, 2, 4, 1, 256, 1000000.0, tied=True, eps=1e-6)),
    Architecture("tiny-mistral", "mistral",
                 {**_llama(512, 64, 192, 2, 4, 2, 256, 10000.0), "sliding_window": 32}),
    Architecture("tiny-gpt2", "gpt2", {"vocab_size": 512, "n_positions": 256, "n_embd": 64, "n_layer": 2,
                                       "n_head": 4, "bos_token_id": 0, "eos_token_id": 0}),
)
SHAPE = {"batch_size": 4, "micro_batch_size": 2, "context": 64}
TINY = {"loss_chunk_tokens": 32, "galore_rank": 8}  # a registry grid's sizes scaled to these shapes
SHARDED = ("parameters", "gradients", "optimizer", "total")  # compared rank by rank


def scaled(overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: TINY.get(k, v) for k, v in overrides.items()}
    if out.get("optimizer") == "galore_adamw":
        out["galore_rank"] = TINY["galore_rank"]
    if out.get("optimizer_in_backward"):  # each micro-batch would step on its own
        out["micro_batch_size"] = SHAPE["batch_size"]
    return out


def cases(kinds: set[str]) -> list[tuple[str, Question, dict[str, Any]]]:
    """(name, question, train changes) of every configuration of `kinds`."""
    out: list[tuple[str, Question, dict[str, Any]]] = []
    for arch in FAMILIES:
        base = Question(arch, **SHAPE)
        if "training" in kinds:
            out.append((f"{arch.name} baseline", base, {}))
            for t in REGISTRY:
                for name, overrides in t.grid.items():
                    out.append((f"{arch.name} {name}", base, scaled(overrides)))
            for precision in ("fp32", "bf16", "fp16"):
                for checkpointing in (False, True):
                    for micro in (1, 2, 4):
                        q = Question(arch, **{**SHAPE, "micro_batch_size": micro})
                        name = f"{arch.name} {precision} checkpointing={checkpointing} micro-batch {micro}"
                        stack = {"precision": precision, "activation_checkpointing": checkpointing}
                        out.append((name, q, stack))
        if "tuned" in kinds:
            out.append((f"{arch.name} full fine-tuning", Question(arch, "finetune", **SHAPE), {}))
            for workload in ("lora", "qlora"):
                for precision in ("fp32", "bf16"):
                    for checkpointing in (False, True):
                        out.append((f"{arch.name} {workload} {precision} checkpointing={checkpointing}",
                                    Question(arch, workload, **SHAPE),
                                    {"precision": precision, "activation_checkpointing": checkpointing}))
        if "distributed" in kinds:
            for strategy in ("ddp", "zero1", "fsdp"):
                q = Question(arch, world_size=2, strategy=strategy, **SHAPE)
                out.append((f"{arch.name} {strategy} x2", q, {}))
                out.append((f"{arch.name} {strategy} x2 bf16 checkpointing", q,
                            {"precision": "bf16", "activation_checkpointing": True}))
        if "inference" in kinds:
            for dtype in ("fp32", "bf16"):
                for kv_bits in (0, 8, 4):
                    for batch, prompt, context in ((2, 16, 64), (4, 48, 128)):
                        q = Question(arch, "inference", batch_size=batch, context=context, prompt=prompt,
                                     dtype=dtype, kv_bits=kv_bits)
                        out.append((f"{arch.name} inference {dtype} kv {kv_bits or dtype} {batch}x{context}",
                                    q, {}))
    return out


def error(est: float, measured: float) -> float:
    """(estimate - measured) / measured; 0 where both are 0, infinite where only the estimate is."""
    if measured == 0:
        return 0.0 if est == 0 else math.inf
    return (est - measured) / measured


def compare(q: Question, est: dict[str, Any], meas: dict[str, Any]) -> dict[str, float]:
    """Each category's error (see the module docstring)."""
    out: dict[str, float] = {}
    if q.workload == "inference":
        for c, v in est["by_category"].items():
            out[c] = error(v, meas[f"mem_at_peak_{c}_mib"])
        out["total"] = error(est["peak_mib"], meas["mem_total_peak_mib"])
        out["kv cache (closed form)"] = error(est["kv_cache_predicted_mib"], meas["kv_cache_end_mib"])
        return out
    for c, v in est["category_peaks"].items():
        out[c] = error(v, meas[f"mem_{c}_peak_mib"])
    out["total"] = error(est["peak_mib"], meas["mem_total_peak_mib"])
    if q.world_size > 1:  # what a strategy shards, rank by rank (zero1's shares are uneven)
        for r in range(q.world_size):
            for c in SHARDED:
                key = f"rank{r}_est_{c}_peak_mib"
                if key in est["per_rank"]:
                    out[f"{c} (rank {r})"] = error(est["per_rank"][key], meas[f"rank{r}_mem_{c}_peak_mib"])
    return out


def run(kinds: set[str]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    rows, refused = [], []
    todo = cases(kinds)
    for i, (name, q, changes) in enumerate(todo, 1):
        started = time.perf_counter()
        try:
            est = estimate(q, changes)
            meas = measure(q, changes)
        except StageError as exc:
            refused.append((name, str(exc)))
            log.info("[%d/%d] %s: refused (%s)", i, len(todo), name, exc)
            continue
        errors = compare(q, est, meas)
        worst = max(errors.values(), key=abs)
        rows.append({"name": name, "workload": q.workload, "world": q.world_size, "errors": errors,
                     "estimate_mib": est["peak_mib"], "measured_mib": meas["mem_total_peak_mib"],
                     "seconds": time.perf_counter() - started})
        log.info("[%d/%d] %s: %.4f MiB estimated, %.4f measured, largest category error %+.3f%% (%.1f s)",
                 i, len(todo), name, est["peak_mib"], meas["mem_total_peak_mib"], 100 * worst,
                 time.perf_counter() - started)
    return rows, refused


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def report(rows: list[dict[str, Any]], refused: list[tuple[str, str]], seconds: float) -> str:
    by_category: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for c, e in row["errors"].items():
            by_category[c.split(" (rank")[0]].append(e)
    lines = [(f"machine: {machine()}; {len(rows)} configurations compared, {len(refused)} refused by the "
              f"planner, {seconds / 60:.1f} min"), "",
             ("| category | comparisons | median abs error | 99th percentile | max abs error | "
              "under-estimates beyond 1 % |"),
             "|---|---|---|---|---|---|"]
    everything: list[float] = []
    for c, errs in by_category.items():
        absolute = [abs(e) for e in errs]
        everything += errs
        lines.append(f"| {c} | {len(errs)} | {statistics.median(absolute):.3%} | "
                     f"{percentile(absolute, 99):.3%} | "
                     f"{max(absolute):.3%} | {sum(e < -0.01 for e in errs)} |")
    absolute = [abs(e) for e in everything]
    lines.append(f"| **all** | {len(everything)} | {statistics.median(absolute):.3%} | "
                 f"{percentile(absolute, 99):.3%} | {max(absolute):.3%} | "
                 f"{sum(e < -0.01 for e in everything)} |")
    worst = sorted(rows, key=lambda r: -max(abs(e) for e in r["errors"].values()))[:10]
    lines += ["", "Largest errors:", "", "| configuration | category | error |", "|---|---|---|"]
    for row in worst:
        c, e = max(row["errors"].items(), key=lambda kv: abs(kv[1]))
        lines.append(f"| {row['name']} | {c} | {e:+.3%} |")
    if refused:
        lines += ["", "Refused by the planner (not counted):", ""]
        lines += [f"- {name}: {why}" for name, why in refused]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=("training", "tuned", "distributed", "inference"),
                        default=["training", "tuned", "distributed", "inference"])
    parser.add_argument("--json", type=Path, help="every configuration's errors, written here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "lmmem"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.perf_counter()
    rows, refused = run(set(args.only))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "refused": refused}, indent=1), encoding="utf-8")
    print(report(rows, refused, time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
