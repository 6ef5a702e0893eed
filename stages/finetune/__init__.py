"""finetune: the trained model (data/model) fine-tuned on a task, by one method of
`finetune.runs` per DVC stage (`finetune@<name>`, a foreach like the comparison's), with
what each method held in memory measured by category.

A run is the train section of params.yaml, the trained model's shape (data/model's
params.json), the run's keys over both (a method is the training registry's `finetuning`
technique: `tune: all | head | lora`, `frozen_weights: keep | int8 | nf4`; any other train
key too: precision, checkpointing, micro-batches, optimizers), and the finetune section's
run length over all: `finetune.steps` steps of `finetune.batch_size` documents. The loop,
the dry run, the memory budget and auto-fit are the train package's.

Task `classify` (stages.finetune.tasks): sequence classification on the corpus labels.
Memory categories: frozen weights, trainable weights, adapters, gradients, optimizer state,
activations, temporaries; the dry run predicts each.

Outputs in data/finetune/<name>/: `classifier/` (tune all or head: what
`AutoModelForSequenceClassification.from_pretrained` loads, with the tokenizer), or
`adapter/` (tune lora: peft's format, `PeftModel.from_pretrained(base, path)` over the
classifier made from data/model) and `merged/` (the adapters merged into that base by peft's
`merge_and_unload`: a stock classifier again); `steps.csv`; and
data/metrics/finetune/<name>.json with the test split's accuracy, macro precision, recall
and F1 and the confusion matrix.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from stages.common.errors import StageError
from stages.common.params import BaseParams, Section, merged, validate_section
from stages.common.stage import stage_main
from stages.train.params import Params as TrainParams

log = logging.getLogger("lmmem.finetune")

# the keys the finetune section sets for every run: the same length and measurement for all
FIXED = ("steps", "warmup_steps", "batch_size", "meter_steps", "eval_every", "eval_batches", "checkpoint_every",
         "init_from_word2vec", "model", "task", "max_tokens")
RUNS: dict[str, dict[str, Any]] = {
    "full": {"lr": 0.0003},
    "head": {"tune": "head", "lr": 0.003},
    "lora": {"tune": "lora", "lr": 0.002},
    "qlora": {"tune": "lora", "frozen_weights": "nf4", "lr": 0.002},
}
SHARED: dict[str, Any] = {"activation_checkpointing": True, "micro_batch_size": 8}
NAME = r"^[a-z0-9][a-z0-9-]*$"  # a DVC stage name (finetune@<name>) and a folder name

RunParams = create_model(
    "RunParams", __base__=TrainParams, __module__=__name__,
    task=(Literal["classify"], Field("classify", description="what the run learns")),
    max_tokens=(int, Field(64, ge=2, description="ids per document (its start)")))
RunParams.__doc__ = "One fine-tuning run: the train section's keys and the task's."


class Settings(Section):
    """The `finetune` section."""

    task: Literal["classify"] = Field("classify", description=(
        "classify: sequence classification on the corpus labels (a head on the trained model)"))
    steps: int = Field(150, ge=2, description="optimizer steps of every run: more = better scores, longer runs")
    warmup_steps: int = Field(15, ge=0, description="linear warm-up of every run")
    batch_size: int = Field(16, ge=1, description="documents per optimizer step")
    max_tokens: int = Field(64, ge=2, description=(
        "ids per document (its start; at most the model's context): activations grow with it"))
    meter_steps: int = Field(2, ge=1, description=(
        "the first N steps of each run under the tensor meter (slower, not timed); the rest give docs/s"))
    eval_batches: int = Field(8, ge=1, description=(
        "validation batches (of batch_size documents) after the last step; the test split is scored whole"))
    baseline: str = Field("full", description="the run the report measures the others against")
    shared: dict[str, Any] = Field(default_factory=lambda: dict(SHARED), description=(
        "train keys laid over the train section for every run, before its own (the settings the methods share)"))
    runs: dict[str, dict[str, Any]] = Field(default_factory=lambda: json.loads(json.dumps(RUNS)), description=(
        "name: train keys laid over the train section (tune, lora_*, frozen_weights, lr, ...); dvc.yaml makes "
        "one stage per name"))

    @field_validator("runs")
    @classmethod
    def _names(cls, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, overrides in runs.items():
            if not re.match(NAME, str(name)):
                raise ValueError(f"run name {name!r}: lowercase letters, digits and dashes only "
                                 "(it names a DVC stage and a folder)")
            fixed = [key for key in overrides or {} if key in FIXED]
            if fixed:
                raise ValueError(f"run {name!r} sets {', '.join(fixed)}: the finetune section sets them for "
                                 "every run (or the trained model does)")
        return runs

    @field_validator("shared")
    @classmethod
    def _shared(cls, shared: dict[str, Any]) -> dict[str, Any]:
        fixed = [key for key in shared if key in FIXED]
        if fixed:
            raise ValueError(f"shared sets {', '.join(fixed)}: the finetune section sets them for every run")
        return shared

    @model_validator(mode="after")
    def _checks(self) -> Settings:
        if self.runs and self.baseline not in self.runs:  # no runs: fine-tuning off (a corpus without labels)
            raise ValueError(f"baseline {self.baseline!r} is not one of the runs ({', '.join(self.runs) or 'none'})")
        if self.meter_steps >= self.steps:
            raise ValueError(f"meter_steps ({self.meter_steps}) leaves no timed step of {self.steps}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is more than steps ({self.steps})")
        return self


class Params(Section):
    """What the stage reads: the train section (every run starts from it) and its own."""

    train: TrainParams = Field(default_factory=TrainParams)  # type: ignore[valid-type]
    finetune: Settings = Field(default_factory=Settings)


@dataclass(frozen=True)
class Paths:
    run: str = "full"  # which run of finetune.runs
    tokens: Path = Path("data/tokens")
    model: Path = Path("data/model")
    out: Path = Path("data/finetune/full")


def configured(p: Params, name: str, model_folder: Path) -> Any:
    """The params of run `name`: the train section, the trained model's shape, the run's keys,
    the finetune section's run length; validated (errors name the run)."""
    if name not in p.finetune.runs:
        raise StageError(f"finetune: no run {name!r} in finetune.runs ({', '.join(p.finetune.runs)})")
    trained = model_folder / "params.json"
    try:
        shape = json.loads(trained.read_text(encoding="utf-8"))["train"]["model"]
    except FileNotFoundError:
        raise StageError(f"missing input {trained}: run the train stage first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{trained}: not a trained model's params ({exc})") from None
    f = p.finetune
    if f.max_tokens > shape.get("context", f.max_tokens):
        raise StageError(f"finetune.max_tokens ({f.max_tokens}) is more than the trained model's context "
                         f"({shape['context']})")
    fixed = {"steps": f.steps, "warmup_steps": f.warmup_steps, "batch_size": f.batch_size,
             "meter_steps": f.meter_steps, "eval_every": f.steps, "eval_batches": f.eval_batches,
             "checkpoint_every": 0, "init_from_word2vec": False, "model": shape, "task": f.task,
             "max_tokens": f.max_tokens}
    overrides = merged(f.shared, f.runs[name] or {})
    data = merged(merged(p.train.model_dump(), overrides), fixed)
    if "micro_batch_size" not in overrides:
        data["micro_batch_size"] = f.batch_size  # the run's batch whole, unless the run splits it
    return validate_section(f"finetune.runs.{name}", data, RunParams)


def run(p: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    from stages.finetune.run import finetune

    rp = configured(p, paths.run, paths.model)
    if rp.distributed.world_size > 1:
        raise StageError("finetune runs in one process (train.distributed is for pre-training)")
    log.info("run %s: %s, %d steps", paths.run, json.dumps(p.finetune.runs[paths.run]), rp.steps)
    metrics = finetune(rp, paths, base)
    return {**metrics, "run": paths.run, "run_keys": json.dumps(p.finetune.runs[paths.run], sort_keys=True),
            "baseline": p.finetune.baseline}


def main(argv: list[str] | None = None) -> int:
    return stage_main("finetune", Params, Paths, run, argv, doc=__doc__, section=("train", "finetune"))
