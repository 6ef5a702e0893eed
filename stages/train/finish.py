"""The end of a run: the metrics (what was metered on every rank beside the dry run's
prediction, throughput, quality, each technique's figures) and the outputs, written
atomically on rank 0: the model folder and the per-step CSV."""

from __future__ import annotations

import csv
import logging
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from stages.common.core.artifacts import atomic_dir, size_on_disk, write_params
from stages.common.core.params import BaseParams
from stages.common.core.schema import TokensMeta, mem_key
from stages.common.memory.rss_meter import peak_rss_mib, start_rss_mib
from stages.common.memory.timeline import write_rows
from stages.common.modelling.models import TOKENIZER_FILES, build_model, count_parameters
from stages.train import distributed
from stages.train.build import Parts, Progress
from stages.train.distributed import Context
from stages.train.params import Paths
from stages.train.techniques import REGISTRY

log = logging.getLogger("lmmem.train")

NOT_WEIGHTS = ("gradients", "optimizer", "activations", "temporaries")  # the other categories hold weights
MEASURED = ("step_ms", "rss_mib", "cuda_peak_mib")  # per-step figures of the machine, not of the computation
CSV_FIELDS = ["step", "train_loss", "val_loss", "lr", "step_ms", *[c for t in REGISTRY for c in t.columns],
              "rss_mib", "tensor_peak_mib"]


def finish(parts: Parts, progress: Progress, p: Any, paths: Paths, base: BaseParams, ctx: Context,
           device: torch.device, meta: TokensMeta, predicted: dict[str, Any],
           extra: dict[str, Any]) -> dict[str, Any] | None:
    """Gather every rank's figures, then on rank 0 write the outputs; returns the metrics
    there (None on the other ranks)."""
    cuda: dict[str, float] = {}
    if device.type == "cuda":
        cuda = {"cuda_max_allocated_mib": max(progress.cuda_peak,
                                              torch.cuda.max_memory_allocated(device) / 2**20),
                "cuda_max_reserved_mib": max(progress.cuda_reserved,
                                             torch.cuda.max_memory_reserved(device) / 2**20)}
    gathered = ctx.gather({**cuda, "peak_rss_mib": peak_rss_mib(), "rss_start_mib": start_rss_mib()})
    ranks = [{**m, **rest} for m, rest in zip(progress.metered, gathered, strict=True)]
    final = full_model(parts, p, meta, ctx)
    if not ctx.main:
        return None
    metrics = run_metrics(final, progress, p, ctx, extra, parts.task.sequence_length(p))
    metrics.update(rank_figures(ranks, predicted))
    metrics.update(predicted)
    metrics.update(estimate_errors(metrics, predicted))
    # the peak RSS predicted from the dry run's tensors and weights (stages.common.memory.rss_prediction, by
    # the stage's contract)
    metrics["rss_tensor_mib"] = predicted.get("est_total_peak_mib", metrics.get(mem_key("total"), 0.0))
    weights = [c for c in parts.task.categories if c not in NOT_WEIGHTS]  # parameters; frozen, adapters, ...
    metrics["rss_weights_mib"] = sum(predicted.get(mem_key(c, "est_"), metrics.get(mem_key(c), 0.0))
                                     for c in weights)
    if hasattr(final, "generation_config"):  # trained without a KV cache; generation wants one
        final.config.use_cache = final.generation_config.use_cache = True
    if paths.out is not None:
        with atomic_dir(paths.out, paths.writer) as tmp:
            final.save_pretrained(str(tmp))
            for name in TOKENIZER_FILES:
                shutil.copy(paths.tokens / name, tmp / name)
            write_params(tmp, base=base, train=p)
            metrics["size_on_disk_mib"] = size_on_disk(tmp) / 2**20
    write_steps(paths, progress.records, device, progress.timeline)
    log.info("trained %d steps: val loss %.4f (ppl %.1f), %s tokens/s", p.steps, metrics["val_loss"],
             metrics["val_ppl"], f"{metrics.get('tokens_per_sec', 0):.0f}")
    return metrics


def run_metrics(final: torch.nn.Module, progress: Progress, p: Any, ctx: Context,
                extra: dict[str, Any], sequence: int) -> dict[str, Any]:
    records = progress.records
    final_val = records[-1]["val_loss"]  # the last step always evaluates
    tokens_per_step = p.batch_size * sequence
    metrics: dict[str, Any] = {
        **count_parameters(final), **extra,
        "steps": p.steps, "tokens_seen": p.steps * tokens_per_step,
        "train_loss": statistics.fmean(r["train_loss"] for r in records[-10:]),
        "val_loss": final_val, "val_ppl": math.exp(final_val),
    }
    for technique in REGISTRY:
        metrics.update(technique.metrics(p, final, ctx))
    timed = progress.step_seconds[1:] or progress.step_seconds  # the first unmetered step warms caches up
    if timed:
        median = statistics.median(timed)
        metrics.update({"step_ms_median": median * 1000, "tokens_per_sec": tokens_per_step / median})
    return metrics


def estimate_errors(metrics: dict[str, Any], predicted: dict[str, Any]) -> dict[str, float]:
    """Relative error of each predicted peak (every category, the total, each rank's)."""
    out = {}
    for key, value in predicted.items():
        measured = metrics.get(key.replace("est_", "mem_", 1))
        if key.endswith("_peak_mib") and not key.startswith("dist_") and measured:
            out[key.replace("est_", "est_error_", 1)] = (value - measured) / measured
    return out


def full_model(parts: Parts, p: Any, meta: TokensMeta, ctx: Context) -> torch.nn.Module:
    """The trained model whole, to save: gathered from FSDP's shards onto rank 0 (a
    collective), the model itself otherwise."""
    if ctx.strategy != "fsdp":
        return parts.raw
    state = distributed.full_state_dict(parts.model)
    if not ctx.main:
        return parts.raw
    with torch.device("cpu"):
        model = build_model(p.model, meta.vocab_size, meta.special_ids.model_dump())
    model.load_state_dict(state)
    return model


def rank_figures(ranks: list[dict[str, Any]], predicted: dict[str, Any]) -> dict[str, Any]:
    """The metered figures of one process, or distributed: every rank's peaks as
    rank<r>_mem_*, the largest rank's as mem_*, and each rank's saving against the
    prediction for ddp (the same run unsharded)."""
    if len(ranks) == 1:
        return ranks[0]
    total = mem_key("total")
    out: dict[str, Any] = dict(max(ranks, key=lambda r: r.get(total, 0.0)))
    largest = max(ranks, key=lambda r: r["peak_rss_mib"])  # the process whose peak the prediction is held to
    out["peak_rss_mib"], out["rss_start_mib"] = largest["peak_rss_mib"], largest["rss_start_mib"]
    ddp = predicted.get("dist_ddp_est_total_peak_mib")
    for rank, figures in enumerate(ranks):
        for key, value in figures.items():
            if key.endswith("_mib"):
                out[f"rank{rank}_{key}"] = value
        if ddp and total in figures:
            out[f"rank{rank}_saving_vs_ddp"] = 1 - figures[total] / ddp
    return out


def write_steps(paths: Paths, records: list[dict[str, Any]], device: torch.device,
                timeline: list[dict[str, Any]]) -> None:
    """steps.csv, and timeline.csv: the peak step module by module (stages.common.memory.timeline)."""
    with atomic_dir(paths.plots, paths.writer) as tmp:
        write_steps_csv(tmp / "steps.csv", records, device, paths.step_timings)
        if timeline:
            write_rows(tmp / "timeline.csv", timeline)


def write_steps_csv(path: Path, records: list[dict[str, Any]], device: torch.device, timings: bool) -> None:
    """One row a step: the loss, learning rate, each technique's columns (and a task's own,
    such as the validation accuracy); with `timings` also the step's time, RSS and CUDA peak
    (without, a cached output: the same bytes on any machine; the metrics hold the medians)."""
    with path.open("w", newline="") as f:
        fields = CSV_FIELDS + (["cuda_peak_mib"] if device.type == "cuda" else [])
        fields += [k for k in dict.fromkeys(k for r in records for k in r) if k not in fields]  # a task's own
        if not timings:
            fields = [k for k in fields if k not in MEASURED]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in records:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()
                             if k in fields})
