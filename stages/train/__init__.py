"""train: a language model from scratch on data/tokens, each memory technique a unit of the
registry (stages.train.techniques), and what the run held in memory measured category by
category.

Why it is built this way: docs/design-notes.md, `stages.train`.
"""

from __future__ import annotations

from typing import Any

from stages.common.core.params import BaseParams
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.harness.stage import stage_main
from stages.train.launch import resolve_device, run
from stages.train.params import Params, Paths

__all__ = ["Params", "Paths", "estimate", "main", "run"]


def estimate(p: Any, paths: Paths, base: BaseParams) -> dict[str, Any]:
    """`python -m stages.train --estimate`: the prediction for params.yaml, without training."""
    from stages.train.estimate import predict_memory

    return predict_memory(p, read_typed(paths.tokens / "meta.json", TokensMeta), resolve_device(base),
                          base.seed)


def main(argv: list[str] | None = None) -> int:
    return stage_main("train", Params, Paths, run, argv, doc=__doc__, estimate=estimate)
