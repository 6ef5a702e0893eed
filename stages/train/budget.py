"""The memory budget: the dry run's estimate against train.memory_budget_mib, and auto-fit's
search through the techniques' moves (stages.train.techniques.all_moves), cheapest first."""

from __future__ import annotations

import logging
from typing import Any

import torch

from stages.common.errors import StageError
from stages.common.schema import TokensMeta
from stages.train.estimate import predict_memory
from stages.train.params import with_changes
from stages.train.techniques import all_moves

log = logging.getLogger("lmmem.train")


def describe(changes: dict[str, Any]) -> str:
    return ",".join(f"{k}={str(v).lower()}" for k, v in changes.items()) or "none"


def fit_budget(p: Any, meta: TokensMeta, device: torch.device, seed: int,
               predicted: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Over budget: with auto_fit, apply the moves cumulatively, cheapest first, until the
    estimate fits, and train with that; without, stop with the moves that would fit. Returns
    (params, prediction, changes)."""
    budget = p.memory_budget_mib
    if not budget or predicted["est_total_peak_mib"] <= budget:
        return p, predicted, {}
    need = f"train.memory_budget_mib={budget:g}: the estimated tensor peak is {predicted['est_total_peak_mib']:.1f} MiB"
    changes: dict[str, Any] = {}
    tried: list[str] = []
    for move in all_moves(p):
        changes = {**changes, **move.changes}
        candidate = with_changes(p, changes)
        estimate = predict_memory(candidate, meta, device, seed)
        estimate_mib = estimate["est_total_peak_mib"]
        tried.append(f"{describe(changes)} {estimate_mib:.1f} MiB")
        if estimate_mib > budget:
            continue
        if p.auto_fit:
            log.info("%s; auto_fit trains with %s (%.1f MiB)", need, describe(changes), estimate_mib)
            return candidate, estimate, changes
        raise StageError(f"{need}; it fits with {describe(changes)} ({estimate_mib:.1f} MiB), "
                         f"or set train.auto_fit: true")
    raise StageError(f"{need}; nothing fits: {'; '.join(tried) or 'no memory technique left to apply'}")
