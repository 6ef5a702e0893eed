"""compare: the default model trained under one memory-technique configuration of
`compare.configs`, for `compare.steps` optimizer steps, so that every configuration is
measured the same way and the report can set them side by side.

Why it is built this way: docs/design-notes.md, `stages.compare`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, Section, merged, validate_section
from stages.common.harness.stage import stage_main
from stages.train.params import Params as TrainParams
from stages.train.params import Paths as TrainPaths

log = logging.getLogger("lmmem.compare")

# the keys the comparison sets itself: the same run length and measurement for every configuration
FIXED = ("steps", "warmup_steps", "meter_steps", "eval_every", "eval_batches", "checkpoint_every")

CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "bf16": {"precision": "bf16"},
    "micro-batch-4": {"micro_batch_size": 4},
    "checkpointing": {"activation_checkpointing": True},
    "checkpointing-keep-attention": {"activation_checkpointing": True,
                                     "activation_checkpointing_policy": "save_attention"},
    "checkpointing-keep-matmuls": {"activation_checkpointing": True,
                                   "activation_checkpointing_policy": "save_matmuls"},
    "chunked-loss": {"loss_chunk_tokens": 256},
    "mlp-tiles-4": {"mlp_tiles": 4},
    "saved-bf16": {"saved_activations": "bf16"},
    "saved-int8": {"saved_activations": "int8"},
    "sgd": {"optimizer": "sgd"},
    "adamw-8bit": {"optimizer": "adamw8bit"},
    "adafactor": {"optimizer": "adafactor"},
    "galore": {"optimizer": "galore_adamw"},
    "adam-mini": {"optimizer": "adam_mini"},
    "multi-query": {"model": {"kv_heads": 1}},
    "step-in-backward": {"optimizer_in_backward": True, "grad_clip": 0.0},
    "lean": {"loss_chunk_tokens": 256, "activation_checkpointing": True, "optimizer": "adamw8bit",
             "optimizer_in_backward": True, "grad_clip": 0.0},
    "lean-micro-batch-4": {"loss_chunk_tokens": 256, "activation_checkpointing": True, "micro_batch_size": 4,
                           "optimizer": "adamw8bit"},
    "lean-tiled": {"loss_chunk_tokens": 256, "activation_checkpointing": True, "mlp_tiles": 4,
                   "optimizer": "adamw8bit",
                   "optimizer_in_backward": True, "grad_clip": 0.0},
}
NAME = r"^[a-z0-9][a-z0-9-]*$"  # a DVC stage name (compare@<name>) and a folder name


class Settings(Section):
    """The `compare` section."""

    steps: int = Field(12, ge=2, description=(
        "optimizer steps per configuration, the same for all: more = perplexities further apart, "
        "each configuration proportionally longer"))
    warmup_steps: int = Field(2, ge=0,
                              description="linear warm-up of each configuration's run (its schedule's shape)")
    meter_steps: int = Field(2, ge=1, description=(
        "the first N steps of each run under the tensor meter (slower, not timed); the rest give tokens/s"))
    eval_batches: int = Field(8, ge=1, description=(
        "validation batches after the last step: the same windows for every configuration"))
    baseline: str = Field("baseline", description="the configuration the report measures the others against")
    configs: dict[str, dict[str, Any]] = Field(default_factory=lambda: json.loads(json.dumps(CONFIGS)),
                                               description=(
        "name: train keys laid over the train section; dvc.yaml makes one stage per name"))

    @field_validator("configs")
    @classmethod
    def _names(cls, configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, overrides in configs.items():
            if not re.match(NAME, str(name)):
                raise ValueError(f"configuration name {name!r}: lowercase letters, digits and dashes only "
                                 "(it names a DVC stage and a folder)")
            fixed = [key for key in overrides or {} if key in FIXED]
            if fixed:
                raise ValueError(f"configuration {name!r} sets {', '.join(fixed)}: the comparison sets "
                                 f"{', '.join(FIXED)} for every configuration (compare.steps and the rest)")
        return configs

    @model_validator(mode="after")
    def _checks(self) -> Settings:
        if self.baseline not in self.configs:
            raise ValueError(f"baseline {self.baseline!r} is not one of the configurations "
                             f"({', '.join(self.configs) or 'none'})")
        if self.meter_steps >= self.steps:
            raise ValueError(f"meter_steps ({self.meter_steps}) leaves no timed step of {self.steps}: "
                             "tokens/s needs at least one")
        return self


class Params(Section):
    """What the stage reads: the train section (the run every configuration starts from) and its own."""

    train: TrainParams = Field(default_factory=TrainParams)  # type: ignore[valid-type]
    compare: Settings = Field(default_factory=Settings)


@dataclass(frozen=True)
class Paths:
    config: str = "baseline"  # which configuration of compare.configs
    tokens: Path = Path("data/tokens")
    embed: Path = Path("data/warmstart")
    out: Path = Path("data/compare/baseline")


def configured(p: Params, name: str) -> Any:
    """The train params of configuration `name`: the train section, the configuration's keys
    over it, the comparison's run length over both; validated (errors name the configuration)."""
    if name not in p.compare.configs:
        raise StageError(f"compare: no configuration {name!r} in compare.configs "
                         f"({', '.join(p.compare.configs)})")
    c = p.compare
    fixed = {"steps": c.steps, "warmup_steps": c.warmup_steps, "meter_steps": c.meter_steps,
             "eval_every": c.steps, "eval_batches": c.eval_batches, "checkpoint_every": 0}
    data = merged(merged(p.train.model_dump(), c.configs[name] or {}), fixed)
    return validate_section(f"compare.configs.{name}", data, TrainParams)


def run(p: Params, paths: Paths, base: BaseParams) -> dict[str, Any] | None:
    from stages.train.launch import run as train_run

    tp = configured(p, paths.config)
    log.info("configuration %s: %s, %d steps", paths.config, json.dumps(p.compare.configs[paths.config]),
             tp.steps)
    # out=None: the weights are not kept; checkpoint_every is 0, so nothing goes to checkpoints
    metrics = train_run(tp, TrainPaths(tokens=paths.tokens, embed=paths.embed, out=None, plots=paths.out,
                                       checkpoints=paths.out / "checkpoints", writer="compare",
                                       step_timings=False), base)  # data/compare/<name>: cached
    if metrics is None:  # a node without rank 0 of a configuration on several machines
        return None
    return {**metrics, "config": paths.config, "config_keys": json.dumps(p.compare.configs[paths.config],
                                                                         sort_keys=True),
            "baseline": p.compare.baseline}


def main(argv: list[str] | None = None) -> int:
    return stage_main("compare", Params, Paths, run, argv, doc=__doc__, section=("train", "compare"))


if __name__ == "__main__":
    raise SystemExit(main())
