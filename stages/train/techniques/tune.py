"""`train.tune`, the fine-tuning methods (the finetune stage, which starts from a trained
model): which weights train, and how the frozen ones are held.

- `tune: all`: every weight trains (full fine-tuning): weights, gradients and optimizer
  state for all of them.
- `tune: head`: the task's head alone (the classifier's `score` layer); the body is frozen,
  so it has no gradients and no optimizer state, and backward stops at the head. A language
  model has no head of its own (its output layer is its vocabulary): refused there.
- `tune: lora`: low-rank adapters (peft's LoRA: W + B·A·alpha/rank, B zero at first) on the
  `lora_targets` layers, and the head if the task has one; the rest is frozen. Gradients and optimizer state
  exist for the adapters and the head only; activations are still kept through the body,
  for the gradient to reach the adapters of the first blocks.
- `frozen_weights: int8 | nf4` holds the frozen body quantized (stages.common.weights.frozen): QLoRA
  is `tune: lora` with `frozen_weights: nf4`.

The train stage trains from scratch: nothing there to freeze, so it refuses these keys.
"""

from __future__ import annotations

from typing import Any, Literal
from unittest import mock

import torch
from pydantic import Field

from stages.common.core.errors import StageError
from stages.common.core.params import Section
from stages.train.techniques.base import Move, Technique

HEADS = ("score",)  # the task heads a fine-tuning model adds (transformers' *ForSequenceClassification)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Fields(Section):
    tune: Literal["all", "head", "lora"] = Field("all", description=(
        "fine-tuning only (the finetune stage): which weights train: all = every weight | head = the task "
        "head alone, the body frozen (no gradients or optimizer state for it) | lora = low-rank adapters "
        "(peft) on lora_targets and the head, the body frozen"))
    lora_rank: int = Field(8, ge=1, le=4096, description=(
        "tune lora: the adapters' rank: higher = more capacity, more adapter weights, gradients and state"))
    lora_alpha: float = Field(16.0, gt=0.0,
                              description="tune lora: the adapters' scale is lora_alpha / lora_rank")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "tune lora: dropout on the adapters' input (regularisation; > 0 keeps a mask per adapter)"))
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1, description=(
        "tune lora: the Linear layers (by name) that get adapters; fewer = fewer adapter weights, less "
        "capacity"))
    frozen_weights: Literal["keep", "int8", "nf4"] = Field("keep", description=(
        "tune head or lora: how the frozen body is held: keep = as trained (4 bytes a weight) | int8 = 1 "
        "byte a weight | nf4 = QLoRA's 4-bit NormalFloat (about 4.5 bits): less memory, a slightly "
        "different forward"))


class Finetuning(Technique):
    name = "finetuning"
    Fields = Fields

    def refuse(self, p: Any) -> str | None:
        finetuning = getattr(p, "task", None) is not None  # the finetune stage's params have a task
        if not finetuning and (p.tune != "all" or p.frozen_weights != "keep"):
            return ("tune and frozen_weights are fine-tuning methods (the finetune stage): train starts from "
                    "scratch, with nothing trained to freeze")
        if p.frozen_weights != "keep" and p.tune == "all":
            return f"frozen_weights {p.frozen_weights} holds frozen weights, and tune all freezes none"
        if p.tune != "all" and p.model.family == "lstm":
            return (f"tune {p.tune}: the lstm baseline has no task head or Linear blocks to adapt "
                    "(use tune all)")
        if p.tune == "lora" and p.model.family != "llama":
            return "tune lora: adapters go on Linear layers; gpt2's blocks are Conv1D (use the llama family)"
        if p.tune != "all" and p.distributed.strategy == "fsdp" and p.distributed.world_size > 1:
            return f"tune {p.tune}: fsdp shards a model whose weights all train (use ddp with frozen weights)"
        return None

    def prepare(self, model: torch.nn.Module, p: Any, device: torch.device) -> None:
        if p.tune == "all":
            return None
        heads = [name for name, _ in model.named_children() if name in HEADS]
        if not heads and p.tune == "head":  # a language model's output head is its vocabulary, often tied
            raise StageError("tune head: this task's model has no head of its own to train (use tune all or "
                             "lora)")
        for param in model.parameters():
            param.requires_grad_(False)
        if p.tune == "lora":
            add_adapters(model, p)
        for name in heads:
            for param in getattr(model, name).parameters():
                param.requires_grad_(True)
        if p.frozen_weights != "keep":
            from stages.common.weights.frozen import freeze_quantized

            freeze_quantized(model, p.frozen_weights, keep=tuple(heads))
        return None

    def moves(self, p: Any) -> list[Move]:
        """bench/finetune on the default model (docs/BENCHMARKS.md), each against the run it
        changes: lora ran at 0.70 x full fine-tuning's docs/s with 1.04 x its test error (cost
        1.48); nf4 under lora at 0.82 x lora's docs/s with 0.96 x its error (cost 1.17)."""
        if getattr(p, "task", None) is None:  # training from scratch: nothing to freeze
            return []
        if p.tune == "all":
            return [Move({"tune": "lora"}, 1.48)]
        if p.tune == "lora" and p.frozen_weights == "keep":
            return [Move({"frozen_weights": "nf4"}, 1.17)]
        return []

    def metrics(self, p: Any, model: torch.nn.Module, ctx: Any) -> dict[str, Any]:
        if p.tune == "all":
            return {}
        adapters = sum(q.numel() for n, q in model.named_parameters() if "lora_" in n)
        return {"adapter_params": adapters}


def add_adapters(model: torch.nn.Module, p: Any) -> None:
    """peft's LoRA on `p.lora_targets`, checked first: each target a Linear layer of the model,
    the rank no larger than the smaller side of any of them."""
    from peft import LoraConfig, inject_adapter_in_model

    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not any(name.startswith(h) for h in HEADS)}
    present = sorted({name.rpartition(".")[2] for name in linears})
    missing = [t for t in p.lora_targets if t not in present]
    if missing:
        raise StageError(f"lora_targets: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a "
                         f"Linear layer of this model (it has {', '.join(present)})")
    for name, m in linears.items():
        if name.rpartition(".")[2] in p.lora_targets and p.lora_rank > min(m.in_features, m.out_features):
            raise StageError(f"lora_rank {p.lora_rank} is larger than {name} ({m.out_features} x "
                             f"{m.in_features}): "
                             f"at most {min(m.in_features, m.out_features)}")
    config = LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                        target_modules=list(p.lora_targets), bias="none")
    # the adapters are made where the model is, in its dtype (build's device context; fp32
    # weights), so peft's moves of each new layer to its base layer's device change nothing, but
    # on fake tensors (the dry run) a module's .to() swaps every tensor, which they refuse
    with mock.patch.object(torch.nn.Module, "to", lambda module, *args, **kwargs: module):
        inject_adapter_in_model(config, model)


TECHNIQUE = Finetuning()
