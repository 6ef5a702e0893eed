"""What passes between stages, defined once: each hand-off is one pydantic model, and the
memory categories and metric names are spelled here only (the evaluation's rows and
generation's categories in stages/common/core/eval_results.py, which only evaluate and the report read).

Writers build the model and write it (`write_json(path, model)`); readers call `read_typed`,
which stops with one line naming the file and the field when the file is missing or
malformed. Every reader of the tokens' meta.json and the training metrics' names goes through
this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.common.core.errors import StageError

M = TypeVar("M", bound=BaseModel)

# What the tensor meter counts, in the order every table and chart draws them.
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")


def mem_key(category: str, prefix: str = "mem_", at_peak: bool = False) -> str:
    """A metered figure's key: mem_<category>_peak_mib (its own peak) or, at_peak,
    mem_at_peak_<category>_mib (its share of the total's peak). prefix "est_" names the
    dry run's prediction, "est_error_" its relative error, "rank<r>_mem_" one rank's."""
    return f"{prefix}at_peak_{category}_mib" if at_peak else f"{prefix}{category}_peak_mib"


class Handoff(BaseModel):
    """Base of a stage's output metadata: unknown keys are refused, values are not changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SpecialIds(Handoff):
    pad: int = Field(ge=0)
    unk: int = Field(ge=0)
    bos: int = Field(ge=0)
    eos: int = Field(ge=0)


class TokensMeta(Handoff):
    """data/tokens/meta.json: how to read the id files (written by tokenize; read by embed,
    train, compress and evaluate)."""

    dtype: Literal["uint16", "uint32"]
    vocab_size: int = Field(ge=5)
    # label index -> the corpus label (ingest keeps them as text)
    labels: list[str] = Field(default_factory=list)
    special_tokens: dict[str, str]
    special_ids: SpecialIds
    docs: dict[str, int]
    tokens: dict[str, int]
    layout: str = "ids: each document's word ids then eos; offsets: uint64 document starts, n_docs + 1"


def load_json(path: Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"missing input {path}: run the stage that makes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageError(f"{path}: not a JSON file ({exc}); rerun the stage that writes it") from None


def _error(path: Path, exc: ValidationError, record: str = "") -> StageError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return StageError(f"{path}: {record}field {where}: {first['msg']}; rerun the stage that writes it")


def read_typed(path: Path, model: type[M]) -> M:
    """Read one hand-off file into its model; a missing, non-JSON or malformed file is one
    line that names the file and the first field at fault."""
    data = load_json(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _error(path, exc) from None


def read_rows(path: Path, model: type[M]) -> list[M]:
    """Read a JSON list of hand-off records (results.json), each validated the same way."""
    data = load_json(path)
    if not isinstance(data, list):
        raise StageError(f"{path}: field (top level): must be a list of records; rerun the stage that "
                         "writes it")
    out = []
    for i, item in enumerate(data):
        try:
            out.append(model.model_validate(item))
        except ValidationError as exc:
            raise _error(path, exc, f"record {i}, ") from None
    return out
