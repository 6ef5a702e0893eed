"""warmstart: the Word2Vec vectors the train stage starts its input embedding from, or none.

With `train.init_from_word2vec: true` it copies data/embed/aligned.npy (row i = token id i)
into data/warmstart; with false it writes only its params. Train depends on this folder,
not on data/embed, so a Word2Vec param changes what train reads (and reruns it) only when
train starts from the vectors: otherwise this stage's output stays the same bytes and DVC
leaves train alone.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stages.common.core.artifacts import atomic_dir, write_params
from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams
from stages.common.harness.stage import stage_main

VECTORS = "aligned.npy"


class Params(BaseModel):
    """The one key of the train section this stage reads (train validates the others)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    init_from_word2vec: bool = Field(False, description=(
        "start the input embedding from data/embed's Word2Vec vectors (projected to width)"))


@dataclass(frozen=True)
class Paths:
    embed: Path = Path("data/embed")
    out: Path = Path("data/warmstart")


def run(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    source = paths.embed / VECTORS
    if params.init_from_word2vec and not source.is_file():
        raise StageError(f"missing input {source}: run the embed stage first (train.init_from_word2vec is "
                         "true)")
    with atomic_dir(paths.out, "warmstart") as tmp:
        if params.init_from_word2vec:
            shutil.copy(source, tmp / VECTORS)
        write_params(tmp, train=params)
    return {"init_from_word2vec": params.init_from_word2vec,
            "bytes": source.stat().st_size if params.init_from_word2vec else 0}


def main(argv: list[str] | None = None) -> int:
    return stage_main("warmstart", Params, Paths, run, argv, doc=__doc__, section="train")


if __name__ == "__main__":
    raise SystemExit(main())
