"""The planner: given a device's memory, the stacks of memory techniques that fit, ordered by
their expected slowdown.

Why it is built this way: docs/design-notes.md, `stages.plan.planner`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

from stages.plan.dryrun import Question, estimate, train_params

log = logging.getLogger("lmmem.plan")

COST_SOURCE = ("each move's measured slowdown x perplexity ratio on this project's 2-core CPU "
               "(bench/train_grid, bench/distributed, bench/lean_optimizers; docs/BENCHMARKS.md), "
               "multiplied: a CPU's ratios, not a GPU's")
KV_COSTS = {0: 1.0, 8: 0.90, 4: 1.04}  # ms per token against the exact cache (bench.kv_cache --quantized)


def describe(changes: dict[str, Any]) -> str:
    return ", ".join(f"{k}={str(v).lower()}" for k, v in changes.items()) or "as asked"


class Search:
    """The dry runs of one question, shared by every device asked about (each stack once)."""

    def __init__(self, q: Question, max_seconds: float) -> None:
        self.q, self.deadline = q, time.monotonic() + max_seconds
        self.tried: dict[str, dict[str, Any]] = {}  # describe(changes) -> the stack and its figures
        self.failed: dict[str, str] = {}  # a stack whose dry run raised: why (it is not a plan's answer)
        self.out_of_time = False

    def run(self, changes: dict[str, Any], costs: dict[str, float]) -> dict[str, Any] | None:
        key = describe(changes)
        if key in self.tried or key in self.failed:
            return self.tried.get(key)
        if time.monotonic() > self.deadline:
            self.out_of_time = True
            return None
        try:
            train_params(self.q, changes)  # a technique refuses this combination: not a stack
        except Exception as exc:  # StageError from the params' check
            log.debug("stack %s refused: %s", key, exc)
            return None
        try:
            found = estimate(self.q, changes)
        except Exception as exc:  # a technique that cannot run on this architecture: said, skipped
            self.failed[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            log.warning("  %-60s the dry run failed: %s", key, self.failed[key])
            return None
        cost = math.prod(costs.get(k, 1.0) for k in changes)
        self.tried[key] = {"stack": key, "changes": changes, "cost": cost, **found}
        log.info("  %-60s %10.1f MiB (%.1f s)", key, found["peak_mib"], found["seconds"])
        return self.tried[key]


def fits(result: dict[str, Any], device_mib: float, reserve_mib: float) -> bool:
    return result["peak_mib"] + reserve_mib <= device_mib


def training_plan(search: Search, device_mib: float, reserve_mib: float) -> None:
    """Auto-fit's path to the first stack that fits `device_mib`, then its unneeded moves dropped."""
    from stages.train.techniques import all_moves

    q = search.q
    changes: dict[str, Any] = {}
    costs: dict[str, float] = {}
    found = search.run(changes, costs)
    if found is not None and fits(found, device_mib, reserve_mib):
        return
    for move in all_moves(train_params(q)):
        trial, trial_costs = {**changes, **move.changes}, {**costs, **dict.fromkeys(move.changes, move.cost)}
        found = search.run(trial, trial_costs)
        if found is None:
            if search.out_of_time:
                return
            continue
        changes, costs = trial, trial_costs
        if fits(found, device_mib, reserve_mib):
            break
    else:
        return
    for key in sorted(changes, key=lambda k: -costs[k]):  # drop what the fit did not need, dearest first
        trial = {k: v for k, v in changes.items() if k != key}
        found = search.run(trial, costs)
        if found is not None and fits(found, device_mib, reserve_mib):
            changes = trial


def inference_plan(search: Search) -> None:
    for bits in (0, 8, 4):
        if search.out_of_time:
            return
        q = dataclasses.replace(search.q, kv_bits=bits)
        key = f"kv_bits={bits}" if bits else "as asked"
        if key not in search.tried:
            found = estimate(q)
            search.tried[key] = {"stack": key, "changes": {"kv_bits": bits} if bits else {},
                                 "cost": KV_COSTS[bits],
                                 **found}
            log.info("  %-60s %10.1f MiB (%.1f s)", key, found["peak_mib"], found["seconds"])


def weights_floor(q: Question, count: int) -> tuple[float, str]:
    """The fewest MiB per rank `count` weights can take under any stack the planner tries, and
    how that is counted: trained, training's floor (stages.train.budget: 2 bytes, split by
    fsdp's ranks); frozen, 4 bits (QLoRA's NormalFloat); inference, the asked dtype."""
    from stages.plan.dryrun import DTYPES
    from stages.train.budget import PARAM_BYTES_FLOOR, trained_weights_floor_mib

    billions = f"{count / 1e9:,.2f} B weights at"
    if q.workload == "inference":
        return count * DTYPES[
            q.dtype].itemsize / 2**20, f"{billions} {DTYPES[q.dtype].itemsize} bytes each in {q.dtype}"
    if q.workload in ("lora", "qlora"):
        return count * 0.5 / 2**20, f"{billions} 4 bits each, frozen in NormalFloat"
    sharded = f", split over {q.world_size} fsdp ranks" if q.strategy == "fsdp" and q.world_size > 1 else ""
    from stages.plan.dryrun import train_params
    from stages.train.techniques import weight_shards

    return (trained_weights_floor_mib(count, weight_shards(train_params(q))),
            f"{billions} {PARAM_BYTES_FLOOR} bytes each{sharded}")


def plan(q: Question, devices: dict[str, float], reserve_mib: float, max_seconds: float) -> dict[str, Any]:
    """Every device's answer to `q`: the stacks that fit, by cost, and every stack tried. A
    device that the weights alone overflow is answered at once, without a dry run."""
    from stages.plan.dryrun import parameter_count

    search = Search(q, max_seconds)
    answers: dict[str, Any] = {}
    count = parameter_count(q.arch)
    floor, counted = weights_floor(q, count)
    # the largest first: the fewest moves
    for device, gib in sorted(devices.items(), key=lambda item: -item[1]):
        mib = gib * 1024
        if floor + reserve_mib > mib:
            answers[device] = {"device_mib": mib, "fits": False, "stacks": [],
                               "cannot_fit": (f"the weights alone need at least {floor:,.0f} MiB a rank "
                                              f"({counted}), more than {mib:,.0f} MiB less "
                                              f"{reserve_mib:,.0f} held back")}
            continue
        if q.workload == "inference":
            inference_plan(search)
        else:
            training_plan(search, mib, reserve_mib)
        fitting = sorted((r for r in search.tried.values() if fits(r, mib, reserve_mib)),
                         key=lambda r: (r["cost"], r["peak_mib"]))
        answers[device] = {"device_mib": mib, "fits": bool(fitting),
                           "stacks": [{"stack": r["stack"], "cost": r["cost"], "peak_mib": r["peak_mib"]}
                                      for r in fitting]}
    from stages.plan.others import others

    return {"question": question_record(q), "parameters": count, "devices": answers,
            "tried": list(search.tried.values()),
            "others": others(q) if q.workload != "inference" else {},
            "failed": search.failed,
            "reserve_mib": reserve_mib, "cost_source": COST_SOURCE if q.workload != "inference" else
            "ms per token against the exact cache, bench.kv_cache --quantized on this CPU",
            "out_of_time": search.out_of_time}


def question_record(q: Question) -> dict[str, Any]:
    out = {k: v for k, v in dataclasses.asdict(q).items() if k != "arch"}
    return {"architecture": q.arch.name, **out}
