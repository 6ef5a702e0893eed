"""A planner's question run for real, on shapes small enough for this machine: the same model,
techniques and steps as the dry run (stages.plan.dryrun), on real tensors of random token ids,
under the same meter. What the conformance suite (bench/plan_conformance.py) holds each
estimate against, category by category.

Training runs `max(2, meter_steps)` optimizer steps in this process, or on `world_size`
ranks started on this machine (gloo, loopback) that return each rank's meter; inference
runs the dry run's metered generations on a randomly initialised model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from stages.common.memory.tensor_meter import TensorMeter
from stages.plan.catalog import hf_config
from stages.plan.dryrun import DTYPES, Architecture_, Question, generation_peaks, meta_of, train_params
from stages.train.distributed import Context, DistributedParams

SEED = 0


def measure(q: Question, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """`q` run for real: the meter's figures (mem_*), every rank's as rank<r>_mem_*, and for
    distributed runs the largest rank's as mem_*."""
    if q.workload == "inference":
        return _inference(q)
    if q.world_size == 1:
        return _steps(q, changes, Context())
    from stages.train.distributed import launch_here

    per_rank = launch_here(DistributedParams(nproc=q.world_size, strategy=q.strategy), _rank, q, changes)
    ranks = [per_rank[r] for r in range(q.world_size)]
    out = dict(max(ranks, key=lambda m: m["mem_total_peak_mib"]))
    for r, m in enumerate(ranks):
        out.update({f"rank{r}_{k}": v for k, v in m.items()})
    return out


def _rank(q: Question, changes: dict[str, Any] | None) -> dict[str, Any]:
    """One rank of a distributed measurement, in a process of its own."""
    from stages.train.distributed import process_group

    torch.manual_seed(SEED)
    with process_group(DistributedParams(nproc=q.world_size, strategy=q.strategy), "cpu") as ctx:
        return _steps(q, changes, replace(ctx, strategy=q.strategy))


def _steps(q: Question, changes: dict[str, Any] | None, ctx: Context) -> dict[str, Any]:
    """The training loop's metered steps (stages.train.loop.one_step) on this rank's rows."""
    from stages.train.build import build
    from stages.train.step import train_step
    from stages.train.techniques import REGISTRY

    p = train_params(q, changes)
    device = torch.device("cpu")
    for technique in REGISTRY:
        technique.start(p, device)
    task = Architecture_(q.arch, q.context, q.workload in ("lora", "qlora"))
    parts = build(p, meta_of(q.arch), device, SEED, ctx=ctx, task=task)
    meter = TensorMeter(task.categories)
    parts.track(meter)
    rng = np.random.default_rng(SEED)
    vocab = hf_config(q.arch).vocab_size
    local = p.batch_size // ctx.world
    try:
        for step in range(max(2, p.meter_steps)):
            batch = torch.from_numpy(rng.integers(0, vocab, (p.batch_size, q.context + 1), dtype=np.int64))
            rows = batch[ctx.rank * local:(ctx.rank + 1) * local].clone()
            del batch
            train_step(parts, rows, p, device, step, meter)
            del rows
    finally:
        meter.close()
    return meter.summary()


def _inference(q: Question) -> dict[str, Any]:
    """The dry run's two metered generations (dryrun.generation_peaks) on a randomly initialised
    model, the larger peak's figures and the cache at the end."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    config = hf_config(q.arch, use_cache=True)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=DTYPES[q.dtype]).eval()
    found = generation_peaks(model, q)
    return {"mem_total_peak_mib": found["peak_mib"], "mem_peak_phase": found["phase"],
            **{f"mem_at_peak_{c}_mib": mib for c, mib in found["by_category"].items()},
            "kv_cache_end_mib": found["kv_cache_end_mib"]}
