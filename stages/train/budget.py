"""The memory budget: the dry run's estimate against the smaller of train.memory_budget_mib
and the memory this machine (or its GPU) has available, and auto-fit's search through the
techniques' moves (stages.train.techniques.all_moves), cheapest first. A model whose
parameters alone, or a micro-batch whose token ids and block inputs alone, cannot fit is
refused before the dry run, which would take minutes or hours for it."""

from __future__ import annotations

import logging
from typing import Any

import torch

from stages.common.core.errors import StageError
from stages.common.core.schema import TokensMeta
from stages.common.memory.rss_meter import available_mib
from stages.train.estimate import predict_memory
from stages.train.params import with_changes
from stages.train.task import LanguageModelling, Task
from stages.train.techniques import all_moves, rows_at_once, weight_shards

log = logging.getLogger("lmmem.train")

PARAM_BYTES_FLOOR = 2  # no technique here trains weights in fewer than 16 bits
SAVED_BYTES_FLOOR = 1  # nor keeps a block's input for backward in fewer than 8 bits (saved_activations: int8)


def describe(changes: dict[str, Any]) -> str:
    return ",".join(f"{k}={str(v).lower()}" for k, v in changes.items()) or "none"


def machine_limit(p: Any, device: torch.device) -> tuple[float, str] | None:
    """What one rank may hold: the GPU's free memory, or the machine's available memory
    shared by this machine's ranks; None where the OS does not say."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free / 2**20, f"the free memory of {device} ({free / 2**20:,.0f} MiB)"
    found = available_mib()
    if found is None:
        return None
    mib, source = found
    ranks = p.distributed.nproc
    share = f", shared by {ranks} processes" if ranks > 1 else ""
    return mib / ranks, f"this machine's available memory ({mib:,.0f} MiB, {source}{share})"


def limit(p: Any, device: torch.device) -> tuple[float, str] | None:
    """The budget a run must fit: the smaller of train.memory_budget_mib and the machine's."""
    found = machine_limit(p, device)
    if p.memory_budget_mib and (found is None or p.memory_budget_mib <= found[0]):
        return p.memory_budget_mib, f"train.memory_budget_mib={p.memory_budget_mib:g}"
    return found


def meta_model(p: Any, meta: TokensMeta, task: Task | None = None) -> torch.nn.Module:
    """The task's model on the meta device: its shapes, no memory."""
    with torch.device("meta"):
        return (task or LanguageModelling(meta)).make_model(p, dry_run=True)


def trained_weights_floor_mib(count: int, shards: int) -> float:
    """The fewest MiB a rank's share of `count` trained weights can take: 2 bytes each, split
    over `shards` ranks (techniques.weight_shards: fsdp's world, 1 where each rank holds them whole)."""
    return count * PARAM_BYTES_FLOOR / shards / 2**20


def check_parameters_fit(p: Any, model: torch.nn.Module, device: torch.device, sequence: int = 0) -> None:
    """Refuse at once a run that cannot fit whatever its techniques: a model (on the meta
    device) whose parameters alone, at 2 bytes each per rank, exceed what the machine can hold,
    or a micro-batch whose token ids (8 bytes each) and block inputs (1 byte an element, kept
    for backward even under full checkpointing) alone do. No memory and no dry run spent on
    it. (Against train.memory_budget_mib the dry run decides, and names the moves it tried.)
    `sequence`: positions a row holds (default the model's context)."""
    found = machine_limit(p, device)
    if found is None:
        return
    count = sum(q.numel() for q in {id(q): q for q in model.parameters()}.values())
    floor_mib = trained_weights_floor_mib(count, weight_shards(p))
    if floor_mib > found[0]:
        raise StageError(f"train.model: {count / 1e6:,.1f} M parameters need at least {floor_mib:,.0f} MiB "
                         "per process (2 bytes each) before any gradient or activation, more than "
                         f"{found[1]}: "
                         f"choose fewer layers or a smaller width")
    m, sequence = p.model, sequence or p.model.context
    rows = rows_at_once(p)
    tokens = rows * sequence
    floor_mib = (rows * (sequence + 1) * 8 + tokens * m.width * m.layers * SAVED_BYTES_FLOOR) / 2**20
    if floor_mib > found[0]:
        raise StageError(f"train.micro_batch_size: {rows:,} sequences of {sequence:,} tokens need at "
                         f"least {floor_mib:,.0f} MiB for their token ids and each block's input before "
                         f"anything else, more than {found[1]}: choose a smaller micro_batch_size "
                         f"(batch_size can stay larger: the micro-batches accumulate)")


def fit_budget(p: Any, meta: TokensMeta, device: torch.device, seed: int, predicted: dict[str, Any],
               task: Task | None = None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Over budget (the smaller of train.memory_budget_mib and the machine's available
    memory): with auto_fit, apply the moves cumulatively, cheapest first, until the estimate
    fits, and train with that; without, stop with the moves that would fit. Returns
    (params, prediction, changes)."""
    found = limit(p, device)
    if found is None or predicted["est_total_peak_mib"] <= found[0]:
        return p, predicted, {}
    budget, what = found
    need = f"the estimated tensor peak is {predicted['est_total_peak_mib']:,.1f} MiB, more than {what}"
    changes: dict[str, Any] = {}
    tried: list[str] = []
    for move in all_moves(p):
        try:
            candidate = with_changes(p, {**changes, **move.changes})
        except ValueError:  # a technique refuses this move with the ones made so far: go on without it
            continue
        changes = {**changes, **move.changes}
        estimate = predict_memory(candidate, meta, device, seed, task)
        estimate_mib = estimate["est_total_peak_mib"]
        tried.append(f"{describe(changes)} {estimate_mib:,.1f} MiB")
        if estimate_mib > budget:
            continue
        if p.auto_fit:
            log.info("%s; auto_fit trains with %s (%.1f MiB)", need, describe(changes), estimate_mib)
            return candidate, estimate, changes
        raise StageError(f"{need}; it fits with {describe(changes)} ({estimate_mib:,.1f} MiB), "
                         f"or set train.auto_fit: true")
    raise StageError(f"{need}; nothing fits: {'; '.join(tried) or 'no memory technique left to apply'}")
