"""Where training runs: this process, or (train.distributed over several processes) workers
started through torch's elastic launcher, whose rank 0 returns the metrics."""

from __future__ import annotations

import logging
from typing import Any

import torch

from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams
from stages.common.harness.stage import seed_everything, setup_logging
from stages.common.memory.rss_meter import reset_peak_rss
from stages.train import distributed
from stages.train.distributed import Context
from stages.train.loop import train
from stages.train.params import Paths

log = logging.getLogger("lmmem.train")


def resolve_device(base: BaseParams) -> torch.device:
    if base.device == "cuda" and not torch.cuda.is_available():
        raise StageError("base.device is cuda but no CUDA device is available (use cpu or auto)")
    if base.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(base.device)


def rank_device(base: BaseParams, ctx: Context) -> torch.device:
    device = resolve_device(base)
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" and ctx.enabled else device


def run(p: Any, paths: Paths, base: BaseParams) -> dict[str, Any] | None:
    """Train here, or launch the workers that do and return rank 0's metrics; None on a node
    without rank 0, which writes nothing."""
    dp = p.distributed
    if distributed.in_worker():  # started by torchrun: one rank of its run
        with distributed.process_group(dp, resolve_device(base).type) as ctx:
            return train(p, paths, base, ctx, rank_device(base, ctx))
    if dp.world_size == 1:
        return train(p, paths, base, Context(), resolve_device(base))
    if resolve_device(base).type == "cuda" and dp.nproc > torch.cuda.device_count():
        raise StageError(f"train.distributed.nproc is {dp.nproc} but this machine has "
                         f"{torch.cuda.device_count()} "
                         f"CUDA device(s): one process per GPU")
    results = distributed.launch(dp, _worker, p, paths, base, logging.getLogger().level)
    for result in results.values():
        if isinstance(result, str):  # a StageError on every rank: the same line
            raise StageError(result)
    if 0 not in results:
        log.info("ranks %s done; the node with rank 0 writes the model and metrics", sorted(results))
        return None
    return results[0]


def _worker(p: Any, paths: Paths, base: BaseParams, log_level: int) -> dict[str, Any] | str | None:
    """One rank, in a process of torch's elastic launcher: the metrics on rank 0, None on the
    others, a StageError's message as a string."""
    setup_logging(logging.getLevelName(log_level))
    reset_peak_rss()
    seed_everything(base.seed)
    try:
        with distributed.process_group(p.distributed, resolve_device(base).type) as ctx:
            return train(p, paths, base, ctx, rank_device(base, ctx))
    except StageError as exc:
        return str(exc)
