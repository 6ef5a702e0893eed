"""What passes between stages, defined once: each hand-off is one pydantic model, and the
memory categories and metric names are spelled here only.

Writers build the model and write it (`write_json(path, model)`); readers call `read_typed`,
which stops with one line naming the file and the field when the file is missing or
malformed. Every reader of the tokens' meta.json, the evaluation's results.json and the
training metrics' names goes through this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.common.errors import StageError

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
    labels: list[str] = Field(default_factory=list)  # label index -> the corpus label (ingest keeps them as text)
    special_tokens: dict[str, str]
    special_ids: SpecialIds
    docs: dict[str, int]
    tokens: dict[str, int]
    layout: str = "ids: each document's word ids then eos; offsets: uint64 document starts, n_docs + 1"


# figures of the machine a model was measured on, not of the model: data/metrics/evaluate.json
# holds them (`<name>_<figure>`); results.json, a cached output, the same bytes on any machine
MEASURED = ("load_seconds", "ms_per_token_b1", "ms_per_token_batch", "latency_seconds", "rss_peak_mib", "seconds")


class GenerationPoint(Handoff):
    """One batch × context of evaluate's metered generation (stages/common/generation.py):
    the peak's tensor MiB by category, when it happened, and the KV cache at the end beside its
    closed form."""

    batch: int
    context: int
    prompt: int
    peak_mib: float
    weights_mib: float
    kv_cache_mib: float  # at the peak: the cache, and a layer's tensor while concatenation grows it
    activations_mib: float
    logits_mib: float
    peak_phase: str
    peak_step: int
    kv_cache_end_mib: float
    kv_cache_predicted_mib: float


class BatchFit(Handoff):
    """The largest batch whose generation peak fits the budget at one context: read off the
    line through the two largest metered batches (an upper bound), then metered (None: not run)."""

    context: int
    budget_mib: float
    batch: int  # the line's, or one fewer for each metered batch over the budget
    line_batch: int
    line_mib: float  # the line's peak at line_batch
    checked_mib: float | None = None  # the metered peak of `batch`


class EvalRow(Handoff):
    """One model's row of data/eval/results.json (written by evaluate, read by the report); the
    MEASURED figures are in data/metrics/evaluate.json, and `eval_rows` joins them again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    status: Literal["ok", "unsupported", "failed"]
    reason: str | None = None
    load_seconds: float | None = None
    params: int | None = None
    nonzero_params: int | None = None
    val_ppl: float | None = None
    val_top1: float | None = None
    val_top5: float | None = None
    test_ppl: float | None = None
    test_top1: float | None = None
    test_top5: float | None = None
    top1: float | None = None
    top5: float | None = None
    tensor_peak_mib: float | None = None
    tensor_weights_mib: float | None = None
    ms_per_token_b1: float | None = None
    ms_per_token_batch: float | None = None
    latency_seconds: float | None = None
    generations: list[str] | None = None  # sampled, one per prompt: "prompt | continuation"
    greedy: list[str] | None = None  # greedy, one per prompt
    greedy_repetition: float | None = None  # the greedy ones' mean 1 − distinct tokens / tokens
    cls_accuracy: float | None = None
    cls_precision_macro: float | None = None
    cls_recall_macro: float | None = None
    cls_f1_macro: float | None = None
    cls_confusion: list[list[int]] | None = None
    rss_peak_mib: float | None = None
    seconds: float | None = None
    bytes_on_disk: int | None = None
    size_ratio: float | None = None
    generation: list[GenerationPoint] | None = None
    max_batch: list[BatchFit] | None = None
    kv_cache_error: float | None = None  # the largest |KV cache − closed form| / closed form over the grid

    def figures(self) -> dict[str, object]:
        """The row as a mapping of the figures it has (None left out)."""
        return self.model_dump(exclude_none=True)


def _load(path: Path) -> object:
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
    data = _load(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _error(path, exc) from None


def eval_rows(results: Path, metrics: Path) -> list[dict[str, Any]]:
    """The evaluation's rows (results.json) with each model's MEASURED figures from its metrics
    file (missing there: left out, as results.json leaves out what a row has not)."""
    loaded = _load(metrics) if metrics.is_file() else {}
    measured: dict[str, Any] = loaded if isinstance(loaded, dict) else {}
    rows = []
    for row in read_rows(results, EvalRow):
        figures = row.figures()
        figures.update({k: measured[f"{row.name}_{k}"] for k in MEASURED if f"{row.name}_{k}" in measured})
        rows.append(figures)
    return rows


def read_rows(path: Path, model: type[M]) -> list[M]:
    """Read a JSON list of hand-off records (results.json), each validated the same way."""
    data = _load(path)
    if not isinstance(data, list):
        raise StageError(f"{path}: field (top level): must be a list of records; rerun the stage that writes it")
    out = []
    for i, item in enumerate(data):
        try:
            out.append(model.model_validate(item))
        except ValidationError as exc:
            raise _error(path, exc, f"record {i}, ") from None
    return out
