"""The memory techniques of the train stage, one module each, found here by the registry.

A technique is a subclass of `Technique` in a module of this package, registered by the
module's `TECHNIQUE = ...` instance. It declares
- `Fields`: its params, a pydantic section whose fields join the `train` section of
  params.yaml (flat: `train.precision`, not `train.precision.precision`), each field's
  description saying what it trades;
- `refuse(p)`: the combinations it cannot run, as one line (checked before anything runs);
- how it changes the run, through the hooks below (the loop calls every technique's hook
  in registry order; a hook left alone does nothing);
- what it does in the dry run (`dry_run_modes`, and the `dry_run` flag its hooks get);
- `moves(p)`: its auto-fit moves, each with the cost a benchmark measured.

Adding a technique: a new module here with its `TECHNIQUE`, its keys in params.yaml (and
tests/params.tiny.yaml) with the same comments as the fields' descriptions, and its test.
The loop, the estimator, auto-fit, the report and the benchmark grid need no change.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from stages.train.techniques.base import Move, State, Technique

__all__ = ["REGISTRY", "Move", "State", "Technique", "all_moves", "optimizer_family", "optimizer_names"]


def _discover() -> tuple[Technique, ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        technique = getattr(module, "TECHNIQUE", None)
        if isinstance(technique, Technique):
            found.append(technique)
    return tuple(sorted(found, key=lambda t: (t.order, t.name)))


REGISTRY: tuple[Technique, ...] = _discover()


def optimizer_family(name: str) -> Technique:
    """The technique that provides train.optimizer `name`."""
    return next(t for t in REGISTRY if name in t.optimizers)


def optimizer_names() -> tuple[str, ...]:
    return tuple(name for t in REGISTRY for name in t.optimizers)


def all_moves(p: Any) -> list[Move]:
    """Every technique's moves, cheapest first (ties: registry order)."""
    moves = [(m.cost, i, j, m) for i, t in enumerate(REGISTRY) for j, m in enumerate(t.moves(p))]
    return [m for *_, m in sorted(moves, key=lambda item: item[:3])]
