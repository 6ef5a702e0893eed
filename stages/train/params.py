"""The `train` section of params.yaml: the run itself (model, steps, batch, schedule,
evaluation, metering, checkpoints, budget) plus the fields of every memory technique in the
registry (stages.train.techniques), joined into one flat section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from stages.common.core.params import Section
from stages.common.modelling.models import ModelParams
from stages.train.techniques import REGISTRY, optimizer_names

Optimizer = Literal[optimizer_names()]  # type: ignore[valid-type]


class Core(Section):
    model: ModelParams = Field(default_factory=ModelParams,
                               description="the language model trained from scratch")
    steps: int = Field(500, ge=1, description="optimizer steps; tokens seen = steps x batch_size x context")
    batch_size: int = Field(8, ge=1, description="sequences per optimizer step (the effective batch)")
    optimizer: Optimizer = Field("adamw", description=(
        "sgd (momentum: 1 state/param) | adam, adamw (2) | adagrad, rmsprop (1-2) | adafactor (factored: "
        "~0) | adamw8bit (bitsandbytes: 2 bytes/param) | galore_adamw (low-rank projected moments) | "
        "adam_mini (one second moment per block: ~4 bytes/param) | sparse_adam (untied only: sparse "
        "embedding gradient)"))
    lr: float = Field(3e-3, gt=0.0, le=10.0, description="peak learning rate after warm-up")
    weight_decay: float = Field(0.1, ge=0.0, le=1.0,
                                description="decoupled decay on matrices (not norms or biases)")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up from 0 to lr")
    decay: Literal["cosine", "linear", "none"] = Field(
        "cosine",
        description="cosine | linear | none: schedule from lr down to min_lr_ratio x lr at the last step")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final learning rate as a fraction of lr")
    grad_clip: float = Field(1.0, ge=0.0, description="clip the global gradient norm; 0 = off")
    eval_every: int = Field(50, ge=1, description="validation loss every N steps (and at the last)")
    eval_batches: int = Field(16, ge=1, description=(
        "batches of batch_size windows per evaluation: the same windows every time, whatever the "
        "micro-batch"))
    meter_steps: int = Field(2, ge=0, description=(
        "the first N steps run under the exact tensor meter (slower, so not timed)"))
    init_from_word2vec: bool = Field(True, description=(
        "start the input embedding from data/embed's Word2Vec vectors (projected to width)"))
    memory_budget_mib: float = Field(0.0, ge=0.0, description=(
        "tensor budget; over it (by the dry-run estimate) the run stops before training and names what fits; "
        "0 = none"))
    auto_fit: bool = Field(False, description=(
        "over budget: apply the registry's memory techniques, cheapest measured cost first (shard more, "
        "bf16, smaller micro-batches, 8-bit AdamW, checkpointing, Adafactor), until it fits"))
    checkpoint_every: int = Field(100, ge=0, description=(
        "save everything to resume from every N steps (and at the end); 0 = never"))
    threads: int = Field(0, ge=0, le=256, description="torch CPU threads; 0 = torch's default")
    max_hours: float = Field(720.0, ge=0.0, description=(
        "refuse, before it starts, a run expected to take longer (the duration said in its first log line); "
        "0 = no limit"))

    @model_validator(mode="after")
    def _combinations(self) -> Core:
        """Every technique's refusals, before anything runs."""
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is more than steps ({self.steps}): "
                             "the learning rate would never reach lr")
        for technique in REGISTRY:
            if (problem := technique.refuse(self)) is not None:
                raise ValueError(problem)
        return self


Params = create_model("Params", __base__=(Core, *(t.Fields for t in REGISTRY if t.Fields is not None)),
                      __module__=__name__)
Params.__doc__ = "The train section: the run's own keys and every technique's (see stages.train.techniques)."


def with_changes(p: Any, changes: dict[str, Any]) -> Any:
    """params with auto-fit's changes ("distributed.strategy" inside its section), validated."""
    data = p.model_dump()
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (data[section] if section else data)[name] = value
    return type(p).model_validate(data)  # train's Params, or a stage's that extends it


@dataclass(frozen=True)
class Paths:
    tokens: Path = Path("data/tokens")
    embed: Path = Path("data/embed")  # aligned.npy, read when init_from_word2vec (dvc.yaml: data/warmstart)
    out: Path | None = Path("data/model")  # None: the trained model is not saved (the compare stage)
    plots: Path = Path("data/plots/train")
    checkpoints: Path = Path("data/checkpoints/train")
    writer: str = field(default="train", metadata={"cli": False})  # the stage that owns out and plots
    # steps.csv with each step's time and RSS: true where plots is a DVC plot (cache: false),
    # false where it is a cached output, whose bytes must not depend on the machine's speed
    step_timings: bool = field(default=True, metadata={"cli": False})
