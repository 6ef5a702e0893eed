"""The memory techniques of the train stage, one module each, found here by the registry.

Why it is built this way: docs/design-notes.md, `stages.train.techniques`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from stages.train.techniques.base import Move, State, Technique

__all__ = [
    "ORDER",
    "REGISTRY",
    "Move",
    "State",
    "Technique",
    "all_moves",
    "flops_factor",
    "no_checkpoints",
    "optimizer_family",
    "optimizer_names",
    "rows_at_once",
    "weight_shards",
    "world_problem",
]


# The registry's order, in one place: the loop calls the hooks in it, and auto-fit breaks ties
# between moves of the same measured cost by it. A technique not named here comes after these
# (by name): a new one needs no entry unless its hooks must run before another's.
ORDER = (
    "finetuning",  # first of the model changes: adapters go on the model as the task made it
    "distributed",  # the strategy and its refusals before anything sized per rank
    "chunked_loss",  # its move before bf16's: the same cost, far more memory saved
    "precision",
    "micro_batching",
    "activation_checkpointing",
    "tiled_mlp",
    "saved_activations",
    "torch_optimizers",  # the optimizers: the built-in ones, then the lean ones
    "adamw8bit",
    "adafactor",
    "galore",
    "adam_mini",
    "sparse_adam",
    "optimizer_in_backward",  # the fused step wraps whichever optimizer is chosen
    "pruning",
    "allocator",
)


def _discover() -> tuple[Technique, ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        technique = getattr(module, "TECHNIQUE", None)
        if isinstance(technique, Technique):
            found.append(technique)
    return tuple(sorted(found,
                        key=lambda t: (ORDER.index(t.name) if t.name in ORDER else len(ORDER), t.name)))


REGISTRY: tuple[Technique, ...] = _discover()


def optimizer_family(name: str) -> Technique:
    """The technique that provides train.optimizer `name`."""
    return next(t for t in REGISTRY if name in t.optimizers)


def optimizer_names() -> tuple[str, ...]:
    return tuple(name for t in REGISTRY for name in t.optimizers)


def rows_at_once(p: Any) -> int:
    """The most rows of a batch one forward and backward hold: the smallest bound a technique
    sets (micro-batching's), or the whole batch."""
    return min((r for t in REGISTRY if (r := t.rows_at_once(p)) is not None), default=p.batch_size)


def weight_shards(p: Any) -> int:
    """Over how many ranks each trained weight is split."""
    return max(t.weight_shards(p) for t in REGISTRY)


def flops_factor(p: Any) -> float:
    """A step's arithmetic against a plain step's, every technique's factor together."""
    factor = 1.0
    for t in REGISTRY:
        factor *= t.flops_factor(p)
    return factor


def no_checkpoints(p: Any, ctx: Any) -> str | None:
    """The first technique's reason this run saves no resume checkpoints, or None."""
    return next((found for t in REGISTRY if (found := t.no_checkpoints(p, ctx)) is not None), None)


def world_problem(p: Any, world: int) -> str | None:
    """The first technique's reason these params cannot run on `world` ranks, or None."""
    return next((found for t in REGISTRY if (found := t.world_problem(p, world)) is not None), None)


def all_moves(p: Any) -> list[Move]:
    """Every technique's moves, cheapest first (ties: registry order)."""
    moves = [(m.cost, i, j, m) for i, t in enumerate(REGISTRY) for j, m in enumerate(t.moves(p))]
    return [m for *_, m in sorted(moves, key=lambda item: item[:3])]
