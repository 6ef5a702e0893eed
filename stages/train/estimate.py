"""The dry run: tensor memory by category, predicted before training by running the
configured steps on fake tensors (shapes and dtypes, no data, no memory) under the same
meter, and per rank for a distributed run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stages.common.core.schema import TokensMeta, mem_key
from stages.common.memory.tensor_meter import TensorMeter
from stages.train import distributed
from stages.train.build import build
from stages.train.distributed import Context
from stages.train.step import train_step
from stages.train.task import Task
from stages.train.techniques import REGISTRY, rows_at_once


class NeutralScalars(TorchDispatchMode):
    """Fake tensors have no values, yet optimizers read scalars out of tensors (a step count,
    Adafactor's step size). In a dry run those reads get a neutral answer (1 for floats, 0
    for integers and flags): it steers no allocation."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0 if args[0].dtype.is_floating_point else 0
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def rows_unpacked() -> Iterator[None]:
    """transformers looks at the position ids for several sequences packed into one row; from
    real ids it sees that a window is one sequence and lets attention run causal without a
    mask, from fake ones it cannot tell and builds a (batch, 1, context, context) mask per
    block. A training window is always one sequence: the dry run says so, so that it takes
    the real run's path."""
    try:
        from transformers import masking_utils
    except ImportError:  # the lstm baseline runs without transformers' masks
        yield
        return
    saved = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = saved


# A step of more micro-batches is dry-run on its first two: the first makes the gradients, the
# second adds to them, and each later one repeats the second's allocations but for its kept
# loss (a 0-d tensor), whose bytes are added. The batch is made whole (its rows are held
# through the step): only the micro-batches run are fewer.
DRY_RUN_MICRO_BATCHES = 2


def dry_run(p: Any, meta: TokensMeta, device: torch.device, seed: int, ctx: Context = Context(),
            batch: int = 0, task: Task | None = None, mesh: Any = None) -> dict[str, Any]:
    """The configured model, optimizer and techniques run `max(2, meter_steps)` steps of
    `batch` windows (default batch_size) on fake tensors under the meter. Exact up to kernels
    that allocate differently on fake inputs. `ctx` reshapes it to one rank of a distributed
    run (see `predict_memory`); fsdp's is sharded over a fake process group's `mesh`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rows_per_step = batch or p.batch_size
    micro_batches = -(-rows_per_step // rows_at_once(p))
    run = min(micro_batches, DRY_RUN_MICRO_BATCHES)
    with contextlib.ExitStack() as stack:
        stack.enter_context(FakeTensorMode())
        stack.enter_context(NeutralScalars())
        stack.enter_context(rows_unpacked())
        for technique in REGISTRY:
            for mode in technique.dry_run_modes(p):
                stack.enter_context(mode)
        parts = build(p, meta, device, seed, ctx=ctx, dry_run=True, task=task, mesh=mesh)
        meter = TensorMeter(parts.task.categories)
        parts.track(meter)
        kept = 0  # bytes of one micro-batch's kept loss
        for step in range(max(2, p.meter_steps)):
            rows = parts.task.fake_rows(rows_per_step, p, device)  # the whole batch's storage, counted once
            losses = train_step(parts, rows[:run * rows_at_once(p)], p, device, step, meter)
            kept = losses[-1].untyped_storage().nbytes()
            del rows, losses
        meter.close()
    out = meter.summary(prefix="est_")
    # the losses of the micro-batches not run, held to the step's end
    more = (micro_batches - run) * kept / 2**20
    for key in (mem_key("activations", "est_"), mem_key("activations", "est_", at_peak=True),
                mem_key("total", "est_")):
        out[key] += more
    if ctx.strategy in ("ddp", "zero1"):  # DDP's first step copies each new gradient into its bucket, which
        # holds them all already: for a moment the largest is there twice
        out[mem_key("gradients", "est_")] += meter.largest_gradient / 2**20
    return out


def predict_memory(p: Any, meta: TokensMeta, device: torch.device, seed: int,
                   task: Task | None = None) -> dict[str, Any]:
    """The dry run's prediction; distributed, per rank (the largest rank's figures as est_*,
    every rank's total and optimizer state as rank<r>_est_*). Each rank trains on
    batch_size / ranks windows. ddp: gradients stay allocated between steps (DDP's
    buckets). zero1: besides, the optimizer holds the state of this rank's ZeRO partition
    only. fsdp: FSDP2 itself shards and gathers the fake tensors (`fsdp_dry_run`)."""
    d = p.distributed
    if d.world_size == 1:
        return dry_run(p, meta, device, seed, task=task)
    world, local = d.world_size, p.batch_size // d.world_size
    ddp = dry_run(p, meta, device, seed, Context(0, world, 0, "ddp"), local, task)
    if d.strategy == "ddp":
        per_rank = [ddp] * world
    elif d.strategy == "zero1":
        per_rank = [dry_run(p, meta, device, seed, Context(r, world, r, "zero1"), local, task)
                    for r in range(world)]
    else:  # rank 0's shards are the largest (FSDP2 splits each weight's rows, the first ranks' rounded up)
        per_rank = [fsdp_dry_run(p, meta, device, seed, world, local, task)] * world
    total = mem_key("total", "est_")
    out = dict(max(per_rank, key=lambda e: e[total]))
    for rank, e in enumerate(per_rank):
        for cat in ("total", "optimizer", "gradients", "parameters"):
            out[mem_key(cat, f"rank{rank}_est_")] = e[mem_key(cat, "est_")]
    out["dist_ddp_est_total_peak_mib"] = ddp[total]
    return out


def fsdp_dry_run(p: Any, meta: TokensMeta, device: torch.device, seed: int, world: int, local: int,
                 task: Task | None = None) -> dict[str, Any]:
    """Rank 0 of an fsdp run: the model sharded by FSDP2 over a fake process group of `world`
    ranks, each gather and free as the real run makes them. In a process that is a rank of a
    run already, in a fresh process of its own (the task sent without its corpus)."""
    if not torch.distributed.is_initialized():
        with distributed.fake_process_group(world) as mesh:
            return dry_run(p, meta, device, seed, Context(0, world, 0, "fsdp"), local, task, mesh)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    light = task.without_data() if task is not None else None
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fsdp_dry_run, p, meta, device, seed, world, local, light).result()
