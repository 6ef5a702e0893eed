"""finetune: the trained model (data/model) fine-tuned on a task, by one method of
`finetune.runs` per DVC stage (`finetune@<name>`, a foreach like the comparison's), with
what each method held in memory measured by category.

Why it is built this way: docs/design-notes.md, `stages.finetune`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, Section, merged, validate_section
from stages.common.harness.stage import stage_main
from stages.train.params import Params as TrainParams

log = logging.getLogger("lmmem.finetune")

# the keys the finetune section sets for every run: the same length and measurement for all
FIXED = ("steps", "warmup_steps", "batch_size", "meter_steps", "eval_every", "eval_batches",
         "checkpoint_every",
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


class RunsSection(Section):
    """What a section of fine-tuning runs holds (finetune, adapt): the run length and the
    measurement, the same for every run, the settings they share, and the runs."""

    steps: int = Field(150, ge=2,
                       description="optimizer steps of every run: more = better scores, longer runs")
    warmup_steps: int = Field(15, ge=0, description="linear warm-up of every run")
    batch_size: int = Field(16, ge=1, description="documents per optimizer step")
    meter_steps: int = Field(2, ge=1, description=(
        "the first N steps of each run under the tensor meter (slower, not timed); the rest give docs/s"))
    eval_batches: int = Field(8, ge=1, description=(
        "validation batches (of batch_size documents) after the last step; the test split is scored whole"))
    baseline: str = Field("full", description="the run the report measures the others against")
    shared: dict[str, Any] = Field(default_factory=lambda: dict(SHARED), description=(
        "train keys laid over the train section for every run, before its own (the settings the methods "
        "share)"))
    runs: dict[str, dict[str, Any]] = Field(default_factory=lambda: json.loads(json.dumps(RUNS)),
                                            description=(
        "name: train keys laid over the train section (tune, lora_*, frozen_weights, lr, ...); dvc.yaml "
        "makes one stage per name"))

    @field_validator("runs")
    @classmethod
    def _names(cls, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, overrides in runs.items():
            if not re.match(NAME, str(name)):
                raise ValueError(f"run name {name!r}: lowercase letters, digits and dashes only "
                                 "(it names a DVC stage and a folder)")
            fixed = [key for key in overrides or {} if key in FIXED]
            if fixed:
                raise ValueError(f"run {name!r} sets {', '.join(fixed)}: the section sets them for "
                                 "every run (or the trained model does)")
        return runs

    @field_validator("shared")
    @classmethod
    def _shared(cls, shared: dict[str, Any]) -> dict[str, Any]:
        fixed = [key for key in shared if key in FIXED]
        if fixed:
            raise ValueError(f"shared sets {', '.join(fixed)}: the section sets them for every run")
        return shared

    @model_validator(mode="after")
    def _checks(self) -> RunsSection:
        if self.runs and self.baseline not in self.runs:  # no runs: fine-tuning off (a corpus without labels)
            raise ValueError(f"baseline {self.baseline!r} is not one of the runs "
                             f"({', '.join(self.runs) or 'none'})")
        if self.meter_steps >= self.steps:
            raise ValueError(f"meter_steps ({self.meter_steps}) leaves no timed step of {self.steps}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is more than steps ({self.steps})")
        return self

    def fixed(self) -> dict[str, Any]:
        """The keys this section sets for every run (a task adds its own)."""
        return {"steps": self.steps, "warmup_steps": self.warmup_steps, "batch_size": self.batch_size,
                "meter_steps": self.meter_steps, "eval_every": self.steps, "eval_batches": self.eval_batches,
                "checkpoint_every": 0, "init_from_word2vec": False}


class Settings(RunsSection):
    """The `finetune` section."""

    task: Literal["classify"] = Field("classify", description=(
        "classify: sequence classification on the corpus labels (a head on the trained model)"))
    max_tokens: int = Field(64, ge=2, description=(
        "ids per document (its start; at most the model's context): activations grow with it"))

    def fixed(self) -> dict[str, Any]:
        return {**super().fixed(), "task": self.task, "max_tokens": self.max_tokens}


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
    stage: str = field(default="finetune", metadata={"cli": False})


def trained_shape(model_folder: Path) -> dict[str, Any]:
    """The trained model's shape (train.model of data/model's params.json)."""
    trained = model_folder / "params.json"
    try:
        return json.loads(trained.read_text(encoding="utf-8"))["train"]["model"]
    except FileNotFoundError:
        raise StageError(f"missing input {trained}: run the train stage first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{trained}: not a trained model's params ({exc})") from None


def configured(section: str, f: RunsSection, train: Any, name: str, shape: dict[str, Any],
               params_cls: Any) -> Any:
    """The params of run `name` of `section`: the train section, the trained model's shape, the
    run's keys, the section's run length; validated as `params_cls` (errors name the run)."""
    if name not in f.runs:
        raise StageError(f"{section}: no run {name!r} in {section}.runs ({', '.join(f.runs)})")
    overrides = merged(f.shared, f.runs[name] or {})
    data = merged(merged(train.model_dump(), overrides), {**f.fixed(), "model": shape})
    if "micro_batch_size" not in overrides:
        data["micro_batch_size"] = f.batch_size  # the run's batch whole, unless the run splits it
    return validate_section(f"{section}.runs.{name}", data, params_cls)


def run_params(p: Params, name: str, model_folder: Path) -> Any:
    """Run `name` of the finetune section, over the trained model in `model_folder`."""
    shape = trained_shape(model_folder)
    if p.finetune.max_tokens > shape.get("context", p.finetune.max_tokens):
        raise StageError(f"finetune.max_tokens ({p.finetune.max_tokens}) is more than the trained model's "
                         f"context ({shape['context']})")
    return configured("finetune", p.finetune, p.train, name, shape, RunParams)


def run_section(section: RunsSection, rp: Any, paths: Any, base: BaseParams, task: Any) -> dict[str, Any]:
    """Run `rp` (run `paths.run` of `section`) on `task`: the stage's metrics."""
    from stages.finetune.run import finetune

    if rp.distributed.world_size > 1:
        raise StageError(f"{paths.stage} runs in one process (train.distributed is for pre-training)")
    log.info("run %s: %s, %d steps", paths.run, json.dumps(section.runs[paths.run]), rp.steps)
    metrics = finetune(rp, paths, base, task)
    return {**metrics, "run": paths.run, "run_keys": json.dumps(section.runs[paths.run], sort_keys=True),
            "baseline": section.baseline}


def run(p: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    from stages.common.core.schema import TokensMeta, read_typed
    from stages.finetune.tasks import Classification

    rp = run_params(p, paths.run, paths.model)
    meta = read_typed(paths.tokens / "meta.json", TokensMeta)
    task = Classification(meta, paths.tokens, paths.model, rp.max_tokens)
    return run_section(p.finetune, rp, paths, base, task)


def main(argv: list[str] | None = None) -> int:
    return stage_main("finetune", Params, Paths, run, argv, doc=__doc__, section=("train", "finetune"))
