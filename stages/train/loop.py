"""The training run of one process (one rank), top to bottom: set up, agree on the plan
(the dry run's prediction and what fits the budget), build, resume, step, checkpoint,
finish. What each step does: docs/design-notes.md, `stages.train`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stages.common.core.artifacts import file_digest
from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.memory.rss_meter import current_rss_mib
from stages.common.memory.tensor_meter import TensorMeter
from stages.common.memory.timeline import ModuleTimeline
from stages.common.modelling.optim import lr_at, set_lr
from stages.train import checkpoint, identity
from stages.train.budget import check_parameters_fit, describe, fit_budget, meta_model
from stages.train.build import Parts, Progress, build, forward_context
from stages.train.distributed import Context
from stages.train.duration import say_duration
from stages.train.estimate import predict_memory
from stages.train.finish import finish
from stages.train.params import Paths
from stages.train.step import train_step
from stages.train.task import LanguageModelling, Task
from stages.train.techniques import REGISTRY, no_checkpoints, world_problem

log = logging.getLogger("lmmem.train")


@dataclass
class Trained:
    """What a finished loop hands to the code that writes its outputs."""

    parts: Parts
    progress: Progress
    p: Any  # the params trained with (auto-fit's changes included)
    predicted: dict[str, Any]
    extra: dict[str, Any]  # figures for the metrics: the techniques' start-up ones, auto-fit's changes
    ctx: Context  # the process's place in the run, with the strategy trained with (auto-fit may change it)


def train(p: Any, paths: Paths, base: BaseParams, ctx: Context,
          device: torch.device) -> dict[str, Any] | None:
    """Train a language model on this process; the metrics on rank 0, None on the other ranks."""
    meta = read_typed(paths.tokens / "meta.json", TokensMeta)
    word2vec = np.load(paths.embed / "aligned.npy") if p.init_from_word2vec else None
    task = LanguageModelling(meta, paths.tokens, p.model.context, word2vec, base.seed)
    done = run_loop(p, task, meta, paths, base, ctx, device)
    return finish(done.parts, done.progress, done.p, paths, base, done.ctx, device, meta, done.predicted,
                  done.extra)


def run_loop(p: Any, task: Task, meta: TokensMeta, paths: Paths, base: BaseParams, ctx: Context,
             device: torch.device, stage: str = "train") -> Trained:
    """Plan, build, resume and step through `task`'s run on this process."""
    started = {k: v for t in REGISTRY for k, v in t.start(p, device).items()}
    if p.threads:
        torch.set_num_threads(p.threads)
    if (problem := world_problem(p, ctx.world)) is not None:  # torchrun's world may not be params'
        raise StageError(f"{stage}: {problem}")
    p, predicted, fitted = plan(p, task, meta, device, base.seed, ctx, stage)
    ctx = replace(ctx, strategy=p.distributed.strategy if ctx.enabled else ctx.strategy)
    parts = build(p, meta, device, base.seed, ctx=ctx, task=task)
    progress = Progress(np.random.default_rng(base.seed), metered=[{} for _ in range(ctx.world)])
    fingerprint = checkpoint.fingerprint(base, p, meta, file_digest(paths.tokens / "train.bin"),
                                         identity.code_identity())
    why_not = no_checkpoints(p, ctx) if p.checkpoint_every else None
    if why_not:
        log.info(why_not)
    saves = p.checkpoint_every > 0 and why_not is None
    start = resume(parts, progress, paths, fingerprint, ctx, p.steps) if saves else 0
    meter = TensorMeter(task.categories)
    parts.track(meter)
    timeline = ModuleTimeline(meter, ("activations", "temporaries"))  # which module made what, while metered
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if start >= p.meter_steps:
        meter.close()  # nothing left to meter
    else:
        timeline.__enter__()
    bar = tqdm(range(start, p.steps), desc=stage, unit=" steps", mininterval=2, initial=start, total=p.steps,
               disable=not ctx.main)
    try:
        for step in bar:
            record = one_step(parts, progress, p, device, step, ctx, meter)
            if (step + 1) % p.eval_every == 0 or step + 1 == p.steps:
                record.update(task.validate(parts.raw, p, device, lambda: forward_context(p, device)))
            progress.records.append(record)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}")
            if step + 1 == p.meter_steps:
                progress.metered = ctx.gather(meter.summary())
                progress.timeline = timeline.rows(meter.peak.step)
                timeline.__exit__()
                meter.close()  # its hooks off: the remaining steps run unobserved
            last = step + 1 == p.steps
            if saves and step + 1 >= p.meter_steps and ((step + 1) % p.checkpoint_every == 0 or last):
                save_checkpoint(parts, progress, paths, fingerprint, step, ctx)
    finally:
        timeline.__exit__()
        meter.close()
    return Trained(parts, progress, p, predicted, {**started, "auto_fit_changes": fitted}, ctx)


def plan(p: Any, task: Task, meta: TokensMeta, device: torch.device, seed: int, ctx: Context,
         stage: str = "train") -> tuple[Any, dict[str, Any], str]:
    """Rank 0's prediction and what fits the budget, shared with every rank (a refusal too,
    so that no rank waits for rank 0). Returns (params, prediction, auto-fit's changes)."""
    shared: tuple[Any, ...] | str | None = None
    if ctx.main:
        try:
            model = meta_model(p, meta, task)
            sequence = task.sequence_length(p)
            seconds = say_duration(p, model, device, sequence, stage)  # the first line: minutes or hours
            check_parameters_fit(p, model, device, sequence)  # at once, not after minutes of dry run
            if p.max_hours and seconds > p.max_hours * 3600:
                raise StageError(f"{stage}.max_hours: the run is expected to take about "
                                 f"{seconds / 3600:,.0f} hours "
                                 f"here, more than max_hours ({p.max_hours:g}): fewer steps, a smaller "
                                 f"batch or model, or a larger max_hours (0: no limit)")
            log.info("dry run: %d steps of the configured model on fake tensors, to predict its memory",
                     max(2, p.meter_steps))
            predicted = predict_memory(p, meta, device, seed, task)
            fitted_p, predicted, changes = fit_budget(p, meta, device, seed, predicted, task)
            shared = (fitted_p, predicted, describe(changes))
        except StageError as exc:
            shared = str(exc)
    shared = ctx.gather(shared)[0]
    if isinstance(shared, str):
        raise StageError(shared)
    return shared  # type: ignore[return-value]


def one_step(parts: Parts, progress: Progress, p: Any, device: torch.device, step: int, ctx: Context,
             meter: TensorMeter) -> dict[str, Any]:
    """One optimizer step on this rank's share of a seeded batch; returns the step's record."""
    metering = step < p.meter_steps
    started = time.perf_counter()
    lr = lr_at(step, p.lr, p.steps, p.warmup_steps, p.decay, p.min_lr_ratio)
    set_lr(parts.optimizer, lr)
    local = p.batch_size // ctx.world  # this rank's rows of each batch
    batch = parts.task.sample(progress.rng, p.batch_size)  # the whole batch, the same on every rank
    # not a view holding every rank's
    rows = batch[ctx.rank * local:(ctx.rank + 1) * local].to(device, copy=True)
    del batch
    losses = train_step(parts, rows, p, device, step, meter if metering else None)
    step_loss = ctx.mean(sum(loss.item() for loss in losses))
    del rows
    seconds = time.perf_counter() - started
    if not metering:
        progress.step_seconds.append(seconds)
    if not math.isfinite(step_loss):
        raise StageError(f"the loss became {step_loss} at step {step}: lower train.lr or use fp32/bf16")
    record: dict[str, Any] = {"step": step, "train_loss": step_loss, "lr": lr, "step_ms": seconds * 1000,
                              **parts.record(), "rss_mib": current_rss_mib()}
    if metering:  # the largest rank's
        record["tensor_peak_mib"] = max(ctx.gather(meter.step_peaks.get(step, 0))) / 2**20
    if device.type == "cuda":  # this step's allocator peak; the run's is the largest of them
        record["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        progress.cuda_peak = max(progress.cuda_peak, record["cuda_peak_mib"])
        progress.cuda_reserved = max(progress.cuda_reserved, torch.cuda.max_memory_reserved(device) / 2**20)
        torch.cuda.reset_peak_memory_stats(device)
    return record


def resume(parts: Parts, progress: Progress, paths: Paths, fingerprint: str, ctx: Context, steps: int) -> int:
    """Restore the latest checkpoint of this run, on every rank or none; the step to start at. A
    finished run's checkpoint (its last step) is not resumed: a rerun (`dvc repro -f`) trains and
    measures again rather than report a run of no steps."""
    found = checkpoint.peek(paths.checkpoints, fingerprint)
    if found is not None and found + 1 >= steps:
        log.info("the checkpoint in %s is of a finished run (step %d of %d): training again from the start",
                 paths.checkpoints, found + 1, steps)
        found = None
    if not ctx.agree(found) or found is None:  # every rank asks (a collective), every rank decides alike
        return 0
    resumed = checkpoint.load(paths.checkpoints, fingerprint, parts.raw, parts.optimizer, parts.scaler)
    if resumed is None:
        return 0
    progress.records, progress.metered = resumed["records"], resumed["metered"]
    columns, rows = resumed["timeline"]  # the peak step module by module: metered before any checkpoint
    progress.timeline = [dict(zip(columns, row, strict=True)) for row in rows]
    progress.rng.bit_generator.state = resumed["rng"]
    for name, state in parts.states.items():
        prefix = f"{name}."
        state.restore({k[len(prefix):]: v for k, v in resumed["extra"].items() if k.startswith(prefix)},
                      resumed["techniques"][name])
    return resumed["step"] + 1


def save_checkpoint(parts: Parts, progress: Progress, paths: Paths, fingerprint: str, step: int,
                    ctx: Context) -> None:
    if ctx.strategy == "zero1":
        parts.optimizer.consolidate_state_dict(to=0)  # every rank sends its shard of the state
    if not ctx.main:
        return
    extra = {f"{name}.{key}": t for name, state in parts.states.items() for key, t in state.tensors().items()}
    checkpoint.save(paths.checkpoints, parts.raw, parts.optimizer, parts.scaler,
                    {"fingerprint": fingerprint, "step": step, "rng": progress.rng.bit_generator.state,
                     "records": progress.records, "metered": progress.metered,
                     # columns and rows: state.json sorts a mapping's keys, and the columns' order is the
                     # chart's
                     "timeline": [list(progress.timeline[0]) if progress.timeline else [],
                                  [list(r.values()) for r in progress.timeline]],
                     "techniques": {name: state.record() for name, state in parts.states.items()}},
                    extra=extra or None)

