"""One question to the planner, answered by the same dry run as training, at real size: an
architecture (stages.plan.catalog), a workload and a stack of the training registry's
techniques, run on fake tensors (shapes and dtypes, no memory) under the tensor meter.

Why it is built this way: docs/design-notes.md, `stages.plan.dryrun`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from stages.common.core.errors import StageError
from stages.common.core.schema import TokensMeta, mem_key
from stages.plan.catalog import Architecture, hf_config
from stages.train.task import Task

WORKLOADS = ("pretrain", "finetune", "lora", "qlora", "inference")
TUNED = {"pretrain": {}, "finetune": {}, "lora": {"tune": "lora"},
         "qlora": {"tune": "lora", "frozen_weights": "nf4"}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Question:
    """What a user asks: an architecture, a workload, its shape and the stack (train keys)."""

    arch: Architecture
    workload: str = "pretrain"
    batch_size: int = 8  # sequences per optimizer step, over all ranks (inference: sequences decoded at once)
    micro_batch_size: int = 1
    context: int = 2048
    world_size: int = 1
    strategy: str = "ddp"
    train: dict[str, Any] = field(default_factory=dict)  # train keys of the stack (precision, optimizer, ...)
    prompt: int = 512  # inference: tokens prefilled at once
    dtype: str = "bf16"  # inference: the weights' and the cache's dtype
    kv_bits: int = 0  # inference: 8 or 4 quantizes the cache

    def __post_init__(self) -> None:
        check(self)  # no question that no run could answer


class Architecture_(Task):
    """Next-token prediction for a catalog architecture (the stock transformers class)."""

    name = "language modelling"

    def __init__(self, arch: Architecture, context: int, tuned: bool) -> None:
        self.arch, self.context = arch, context
        if tuned:  # the fine-tuning stage's categories: frozen weights apart from trained ones and adapters
            from stages.finetune.tasks import FINETUNE_CATEGORIES, param_category

            self.categories = FINETUNE_CATEGORIES
            self.param_category = param_category  # type: ignore[method-assign]

    def make_model(self, p: Any, dry_run: bool) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        config = hf_config(self.arch, tie_word_embeddings=p.model.tie_embeddings)  # the stack may untie them
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")

    def row_length(self, p: Any) -> int:
        return self.context + 1

    def loss(self, model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        from stages.common.modelling.windows import next_token_loss

        return next_token_loss(model, rows)


def shape(arch: Architecture, context: int) -> dict[str, Any]:
    """train.model's fields for `arch` (what techniques read of the model: its family and sizes)."""
    c = hf_config(arch)
    if arch.model_type == "gpt2":
        return {"family": "gpt2", "width": c.n_embd, "layers": c.n_layer, "heads": c.n_head,
                "ffn_width": c.n_inner or 4 * c.n_embd, "context": context,
                "tie_embeddings": c.tie_word_embeddings}
    return {"family": "llama", "width": c.hidden_size, "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads, "ffn_width": c.intermediate_size, "context": context,
            "tie_embeddings": c.tie_word_embeddings}


def train_params(q: Question, changes: dict[str, Any] | None = None) -> Any:
    """The train section (finetune's run params for the tuned workloads) of `q` with `changes`."""
    from stages.common.core.params import merged, validate_section
    from stages.finetune import RunParams
    from stages.train.params import Params as TrainParams

    data = merged({"model": shape(q.arch, q.context), "batch_size": q.batch_size,
                   "micro_batch_size": q.micro_batch_size, "meter_steps": 2, "init_from_word2vec": False,
                   "warmup_steps": 0, "distributed": {"nproc": q.world_size, "strategy": q.strategy}},
                  merged(q.train, {**TUNED[q.workload], **(changes or {})}))
    tuned = q.workload in ("lora", "qlora")
    return validate_section("plan.train", data, RunParams if tuned else TrainParams)


def meta_of(arch: Architecture) -> TokensMeta:
    """What the dry run reads of a tokenizer: the vocabulary's size."""
    ids = {"pad": 0, "unk": 0, "bos": 0, "eos": 0}
    return TokensMeta(dtype="uint32", vocab_size=hf_config(arch).vocab_size, special_tokens={},
                      special_ids=ids,
                      docs={}, tokens={})


def training(q: Question, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training workloads' dry run of `q` with `changes`: per rank, by category, in MiB."""
    from stages.train.estimate import predict_memory

    p = train_params(q, changes)
    task = Architecture_(q.arch, q.context, q.workload in ("lora", "qlora"))
    started = time.perf_counter()
    est = predict_memory(p, meta_of(q.arch), torch.device("cpu"), 0, task=task)
    return {"peak_mib": est[mem_key("total", "est_")], "phase": est["est_peak_phase"],
            "step": est["est_peak_step"],
            "by_category": {c: est[mem_key(c, "est_", at_peak=True)] for c in task.categories},
            "category_peaks": {c: est[mem_key(c, "est_")] for c in task.categories},  # each its own largest
            "per_rank": {k: v for k, v in est.items()
                         if k.startswith("rank")},  # rank<r>_est_<category>_peak_mib
            "seconds": time.perf_counter() - started}


def inference(q: Question) -> dict[str, Any]:
    """The inference workload's metered prefill and last decoding step (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    from stages.common.modelling.generation import kv_cache_bytes
    from stages.train.estimate import NeutralScalars

    if not 0 < q.prompt < q.context:
        raise StageError(f"plan: prompt ({q.prompt}) must be at least 1 and less than context ({q.context})")
    if q.kv_bits not in (0, 4, 8):
        raise StageError(f"plan: kv_bits {q.kv_bits}: 0 (the cache in the weights' dtype), 8 or 4")
    started = time.perf_counter()
    config = hf_config(q.arch, use_cache=True)
    with FakeTensorMode(), NeutralScalars():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 dtype=DTYPES[q.dtype]).eval()
        found = generation_peaks(model, q)
    return {**found,
            "kv_cache_predicted_mib": kv_cache_bytes(config, q.batch_size, q.context, DTYPES[q.dtype],
                                                     q.kv_bits) / 2**20,
            "seconds": time.perf_counter() - started}


def generation_peaks(model: torch.nn.Module, q: Question) -> dict[str, Any]:
    """`model`'s metered prefill of `q.prompt` tokens and its last decoding step (the cache full
    at `q.context`): the larger peak's figures, both peaks and the full cache (fake tensors or
    real ones)."""
    prefill = decode_peak(model, q.batch_size, q.prompt, q.prompt + 1, q.kv_bits)
    last = decode_peak(model, q.batch_size, q.context - 1, q.context, q.kv_bits, decode_only=True)
    worst = max((prefill, last), key=lambda r: r["peak_mib"])
    return {**worst, "prefill_peak_mib": prefill["peak_mib"], "decode_peak_mib": last["peak_mib"],
            "kv_cache_end_mib": last["kv_cache_end_mib"]}  # the cache once it holds the context


def decode_peak(model: torch.nn.Module, batch: int, held: int, context: int, kv_bits: int,
                decode_only: bool = False) -> dict[str, Any]:
    """Prefill `held` tokens, then decode until the cache holds `context`: the metered peak
    (stages.common.modelling.generation), by category."""
    from stages.common.core.eval_results import GEN_CATEGORIES
    from stages.common.modelling.generation import metered_generation

    found = metered_generation(model, torch.zeros(batch, held, dtype=torch.long), context, kv_bits,
                               decode_only=decode_only)
    return {"peak_mib": found["peak_mib"], "phase": found["peak_phase"], "step": found["peak_step"],
            "by_category": {c: found[f"{c}_mib"] for c in GEN_CATEGORIES},
            "kv_cache_end_mib": found["kv_cache_end_mib"]}


def estimate(q: Question, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dry run of `q` (and, training, the stack's `changes`)."""
    if q.workload not in WORKLOADS:
        raise StageError(f"plan: workload {q.workload!r}: one of {', '.join(WORKLOADS)}")
    return inference(q) if q.workload == "inference" else training(q, changes)


def check(q: Question) -> None:
    """One line for a question no run could answer: a context beyond the architecture's positions."""
    positions = max_positions(q.arch)
    if q.context > positions:
        raise StageError(f"plan: context {q.context:,} is longer than {q.arch.name}'s {positions:,} "
                         "positions (its config's "
                         f"{'n_positions' if q.arch.model_type == 'gpt2' else 'max_position_embeddings'}"
                         f"): ask for {positions:,} tokens or fewer")


def max_positions(arch: Architecture) -> int:
    """The longest sequence the architecture was made for (gpt2's learned positions end there)."""
    c = hf_config(arch)
    return int(c.n_positions if arch.model_type == "gpt2" else c.max_position_embeddings)


def parameter_count(arch: Architecture) -> int:
    """The architecture's parameters, each counted once (a tied head once), built on the meta device."""
    from stages.plan.catalog import meta_model

    return sum(p.numel() for p in {id(p): p for p in meta_model(arch).parameters()}.values())
