"""adapt: the trained model (data/model) trained on, as a language model, on another domain
(data/domain, the domain stage's corpus in the model's vocabulary), by one method of
`adapt.runs` per DVC stage (`adapt@<name>`, a foreach like finetune's), with what each
method held in memory measured by category and predicted by the dry run.

Why it is built this way: docs/design-notes.md, `stages.adapt`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, create_model

from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, Section
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.harness.stage import stage_main
from stages.common.modelling.models import build_model
from stages.common.modelling.windows import Windows, next_token_loss
from stages.finetune import RunsSection, configured, run_section, trained_shape
from stages.finetune.tasks import FINETUNE_CATEGORIES, param_category
from stages.train.params import Params as TrainParams
from stages.train.task import LanguageModelling

RUNS: dict[str, dict[str, Any]] = {
    "full": {"lr": 0.0003},
    "lora": {"tune": "lora", "lr": 0.002},
    "qlora": {"tune": "lora", "frozen_weights": "nf4", "lr": 0.002},
}

SHARED: dict[str, Any] = {"activation_checkpointing": True, "loss_chunk_tokens": 256}

RunParams = create_model(
    "AdaptRunParams", __base__=TrainParams, __module__=__name__,
    task=(Literal["domain"], Field("domain", description="what the run learns")))
RunParams.__doc__ = "One run of the adapt section: the train section's keys and the task's."


class Settings(RunsSection):
    """The `adapt` section."""

    steps: int = Field(100, ge=2,
                       description="optimizer steps of every run: more = lower new-domain perplexity, "
                       "longer runs, more forgetting")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up of every run")
    batch_size: int = Field(8, ge=1, description="windows (of the model's context) per optimizer step")
    eval_batches: int = Field(8, ge=1,
                              description="validation batches (of batch_size windows) after the last step")
    test_windows: int = Field(256, ge=1, description=(
        "windows of each test split (the new domain's, the original's) the perplexities are taken on"))
    shared: dict[str, Any] = Field(default_factory=lambda: dict(SHARED), description=(
        "train keys laid over the train section for every run, before its own (the settings the methods "
        "share)"))
    runs: dict[str, dict[str, Any]] = Field(default_factory=lambda: {k: dict(v) for k, v in RUNS.items()},
                                            description=(
        "name: train keys laid over the train section (tune, lora_*, frozen_weights, lr, ...); dvc.yaml "
        "makes one stage per name; {} = no adaptation"))

    def fixed(self) -> dict[str, Any]:
        return {**super().fixed(), "task": "domain"}


class Params(Section):
    """What the stage reads: the train section (every run starts from it) and its own."""

    train: TrainParams = Field(default_factory=TrainParams)  # type: ignore[valid-type]
    adapt: Settings = Field(default_factory=Settings)


@dataclass(frozen=True)
class Paths:
    run: str = "full"  # which run of adapt.runs
    tokens: Path = Path("data/tokens")
    domain: Path = Path("data/domain")
    model: Path = Path("data/model")
    out: Path = Path("data/adapt/full")
    stage: str = field(default="adapt", metadata={"cli": False})


class DomainModelling(LanguageModelling):
    """Continued language-model training on data/domain from the trained model: its windows,
    the model made from data/model, the perplexities on both domains' test splits."""

    name = "domain"
    categories = FINETUNE_CATEGORIES
    auto_class, peft_task, folder = "AutoModelForCausalLM", "CAUSAL_LM", "model"

    def __init__(self, meta: TokensMeta, domain: Path, tokens: Path, model_folder: Path, context: int,
                 test_windows: int) -> None:
        super().__init__(meta, domain, context)
        self.model_folder, self.test_windows = model_folder, test_windows
        self.tests = {"domain": Windows(domain / "test.bin", meta.dtype, context, meta.vocab_size),
                      "original": Windows(tokens / "test.bin", meta.dtype, context, meta.vocab_size)}

    def make_model(self, p: Any, dry_run: bool) -> torch.nn.Module:
        model = build_model(p.model, self.meta.vocab_size, self.meta.special_ids.model_dump())
        if not dry_run:
            model.load_state_dict(self.stock_model().state_dict())
        return model

    def param_category(self, name: str, param: torch.Tensor) -> str:
        return param_category(name, param)

    def stock_model(self) -> torch.nn.Module:
        """data/model as `AutoModelForCausalLM.from_pretrained` loads it."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.model_folder))

    @torch.no_grad()
    def perplexity(self, model: torch.nn.Module, windows: Windows, p: Any, device: torch.device,
                   forward: Any) -> float:
        """exp(mean next-token loss) over the first `test_windows` non-overlapping windows."""
        model.eval()
        total, count = 0.0, 0
        for rows in windows.fixed_batches(1, self.test_windows):
            for part in rows.split(p.micro_batch_size):
                with forward():
                    total += next_token_loss(model, part.to(device)).item() * part.size(0)
                count += part.size(0)
        model.train()
        return math.exp(total / count)

    def test_scores(self, model: torch.nn.Module, p: Any, device: torch.device,
                    forward: Any) -> dict[str, Any]:
        return {f"{name}_ppl": self.perplexity(model, windows, p, device, forward)
                for name, windows in self.tests.items()}

    def reference_scores(self, p: Any, device: torch.device, forward: Any) -> dict[str, Any]:
        """The trained model's own figures, before any step on the new domain."""
        before = self.test_scores(self.stock_model().to(device), p, device, forward)
        return {f"base_{name}": value for name, value in before.items()}

    def summary(self, metrics: dict[str, Any]) -> str:
        return (f"perplexity on the new domain {metrics['base_domain_ppl']:.2f} -> "
                f"{metrics['domain_ppl']:.2f}, "
                f"on the original {metrics['base_original_ppl']:.2f} -> {metrics['original_ppl']:.2f}")


def run_params(p: Params, name: str, model_folder: Path) -> Any:
    """Run `name` of the adapt section, over the trained model in `model_folder`."""
    shape = trained_shape(model_folder)
    if shape.get("family") == "lstm":
        raise StageError("adapt: the lstm baseline is not a transformers model (its outputs could not load "
                         "with AutoModelForCausalLM): adapt a llama or gpt2 model")
    return configured("adapt", p.adapt, p.train, name, shape, RunParams)


def run(p: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    rp = run_params(p, paths.run, paths.model)
    meta = read_typed(paths.domain / "meta.json", TokensMeta)
    original = read_typed(paths.tokens / "meta.json", TokensMeta)
    if (meta.vocab_size, meta.special_ids) != (original.vocab_size, original.special_ids):
        raise StageError(f"{paths.domain} was not made with {paths.tokens}'s vocabulary: rerun the domain "
                         "stage")
    task = DomainModelling(meta, paths.domain, paths.tokens, paths.model, rp.model.context,
                           p.adapt.test_windows)
    return run_section(p.adapt, rp, paths, base, task)


def main(argv: list[str] | None = None) -> int:
    return stage_main("adapt", Params, Paths, run, argv, doc=__doc__, section=("train", "adapt"))


if __name__ == "__main__":
    raise SystemExit(main())
