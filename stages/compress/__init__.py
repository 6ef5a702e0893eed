"""compress: smaller variants of the trained model (data/model), each in its own folder of
data/compressed/, with its real size on disk and what making it cost.

Why it is built this way: docs/design-notes.md, `stages.compress`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, TypeAdapter, model_validator
from torch import nn

from stages.common.core.artifacts import atomic_dir, size_on_disk, write_json, write_params
from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, Section
from stages.common.harness.stage import stage_main
from stages.common.memory.rss_meter import peak_rss_mib, reset_peak_rss, start_rss_mib
from stages.common.modelling.models import TOKENIZER_FILES, LSTMLanguageModel, output_head
from stages.common.weights import quant, storage
from stages.common.weights.loading import VARIANT_FILE, VARIANT_WEIGHTS, load_model_folder, weight_counts
from stages.common.weights.pruning import magnitude_mask, prunable
from stages.compress.distill import Distill, train_student

log = logging.getLogger("lmmem.compress")

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class Cast(Section):
    method: Literal["cast"]
    dtype: Literal["float16", "bfloat16"] = "float16"
    base: str = ""


class Quantize(Section):
    method: Literal["int8_weight_only", "int8_dynamic", "int4_weight_only"]
    embeddings: bool = True
    group_size: Literal[32, 64, 128, 256] = 32
    base: str = ""


class PruneMagnitude(Section):
    method: Literal["prune_magnitude"]
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    scope: Literal["layer", "global"] = "layer"
    embeddings: bool = False
    base: str = ""


class PruneStructured(Section):
    method: Literal["prune_structured"]
    heads: float = Field(0.25, ge=0.0, lt=1.0)
    neurons: float = Field(0.25, ge=0.0, lt=1.0)
    base: str = ""


Variant = Annotated[Cast | Quantize | PruneMagnitude | PruneStructured | Distill, Field(
    discriminator="method")]


def shipped_variants() -> dict[str, Any]:
    """The variants params.yaml ships (its comments say what each one trades)."""
    int8 = {"method": "int8_weight_only", "embeddings": True}
    return TypeAdapter(dict[str, Variant]).validate_python({
        "fp16": {"method": "cast", "dtype": "float16"},
        "bf16": {"method": "cast", "dtype": "bfloat16"},
        "int8": int8,
        "int8-dynamic": {"method": "int8_dynamic", "embeddings": True},
        "int4": {"method": "int4_weight_only", "group_size": 32, "embeddings": True},
        "prune50": {"method": "prune_magnitude", "sparsity": 0.5, "scope": "layer", "embeddings": False},
        "prune50-int8": {**int8, "base": "prune50"},
        "prune50-all": {"method": "prune_magnitude", "sparsity": 0.5, "scope": "layer", "embeddings": True},
        "prune50-all-int8": {**int8, "base": "prune50-all"},
        "prune40-all": {"method": "prune_magnitude", "sparsity": 0.4, "scope": "layer", "embeddings": True},
        "prune40-all-int8": {**int8, "base": "prune40-all"},
        "structured25": {"method": "prune_structured", "heads": 0.5, "neurons": 0.125},
        "distill-half": {"method": "distill", "layers": 0, "steps": 200, "batch_size": 16, "lr": 0.003,
                         "warmup_steps": 20, "temperature": 2.0, "alpha": 0.5, "init_from_teacher": True,
                         "loss_chunk_tokens": 256},
    })


class Params(Section):
    variants: dict[str, Variant] = Field(default_factory=shipped_variants, description=(
        "name: {method, its params; base: another variant to start from instead of the trained model}"))

    @model_validator(mode="after")
    def _names_and_bases(self) -> Params:
        for name, spec in self.variants.items():
            if not NAME.match(name):
                raise ValueError(f"variant name {name!r}: use lowercase letters, digits, '_' and '-'")
            if spec.base and spec.base not in self.variants:
                raise ValueError(f"variants.{name}.base: no variant named {spec.base!r} "
                                 f"(variants: {', '.join(self.variants)})")
        self.order()  # refuses cycles
        return self

    def order(self) -> list[str]:
        """Variant names, each after its base."""
        done: list[str] = []
        for name in self.variants:
            chain: list[str] = []
            while name and name not in done:
                if name in chain:
                    raise ValueError(f"variants: {' -> '.join([*chain, name])} is a cycle of bases")
                chain.append(name)
                name = self.variants[name].base
            done.extend(reversed(chain))
        return done


@dataclass(frozen=True)
class Paths:
    model: Path = Path("data/model")
    tokens: Path = Path("data/tokens")
    out: Path = Path("data/compressed")


class Unsupported(Exception):
    """This variant cannot be made here; the message says why."""


@dataclass
class Made:
    """A variant in memory: the model, how its weights are stored, what was quantized."""

    model: nn.Module
    lmmem_format: bool = False
    quantized: dict[str, dict[str, Any]] | None = None
    figures: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- methods


def cast(made: Made, spec: Cast) -> Made:
    if made.quantized:
        raise Unsupported("cast applies to float weights; this base is quantized")
    model = made.model.to(getattr(torch, spec.dtype))
    return Made(model, made.lmmem_format, None, {})


def quantize(made: Made, spec: Quantize) -> Made:
    if made.quantized:
        raise Unsupported("the base is already quantized")
    scheme: quant.Scheme = {"int8_weight_only": "int8", "int8_dynamic": "int8_dynamic",
                            "int4_weight_only": "int4"}[spec.method]  # type: ignore[assignment]
    model = made.model.float()
    try:
        record = quant.quantize_model(model, scheme, spec.embeddings, spec.group_size)
    except (RuntimeError, ValueError) as exc:  # a kernel this CPU or build lacks, a shape it refuses
        raise Unsupported(f"{spec.method}: {str(exc).splitlines()[0]}") from None
    if not record:
        raise Unsupported(f"{spec.method}: the model has no Linear or Conv1D layer to quantize")
    fallbacks = [entry["fallback"] for entry in record.values() if "fallback" in entry]
    if scheme == "int4" and not any(entry["kind"] == "int4" for entry in record.values()):
        raise Unsupported(f"{spec.method}: no layer fits the int4 kernel ({fallbacks[0]})")
    return Made(model, True, record,
                {"layers_quantized": len(record), "layers_int8_fallback": len(fallbacks)})


def prune_magnitude(made: Made, spec: PruneMagnitude) -> Made:
    if made.quantized:
        raise Unsupported("prune before quantizing (base: the pruned variant), not after")
    model = made.model
    targets = [p for _, p in prunable(model)]
    if spec.embeddings:
        seen = {id(p) for p in targets}
        targets += [m.weight for m in model.modules() if isinstance(m, nn.Embedding)
                    and id(m.weight) not in seen]
        head = output_head(model)
        if head is not None and all(head.weight is not p for p in targets):
            targets.append(head.weight)
    with torch.no_grad():
        if spec.scope == "layer":
            for p in targets:
                p.mul_(magnitude_mask(p, spec.sparsity))
        else:  # one threshold for all: round(sparsity × total) smallest magnitudes anywhere
            flat = torch.cat([p.detach().abs().flatten().float() for p in targets])
            mask = magnitude_mask(flat, spec.sparsity)
            start = 0
            for p in targets:
                p.mul_(mask[start:start + p.numel()].view_as(p))
                start += p.numel()
    total = sum(p.numel() for p in targets)
    zeros = sum(int((p == 0).sum()) for p in targets)
    return Made(model, True, None, {"pruned_weights": total, "sparsity": zeros / total if total else 0.0})


def prune_structured(made: Made, spec: PruneStructured) -> Made:
    """Remove the same number of heads and MLP neurons from every llama block, those with the
    smallest L2 norm of their weights (in and out), and rebuild the Linear layers smaller."""
    model = made.model
    if made.quantized or getattr(model.config, "model_type", "") != "llama":
        raise Unsupported("prune_structured rebuilds llama blocks; this model is "
                          f"{'quantized' if made.quantized else type(model).__name__}")
    config = model.config
    n_heads, head_dim = config.num_attention_heads, model.model.layers[0].self_attn.head_dim
    if config.num_key_value_heads != n_heads:
        raise Unsupported("prune_structured: grouped-query attention (fewer key/value heads) is not handled")
    keep_heads = n_heads - round(spec.heads * n_heads)
    keep_neurons = config.intermediate_size - round(spec.neurons * config.intermediate_size)
    if keep_heads < 1 or keep_neurons < 1:
        raise Unsupported("prune_structured: nothing would be left of the attention or the MLP")
    if config.hidden_size % keep_heads:  # transformers' LlamaConfig refuses other head counts
        allowed = [f"{1 - k / n_heads:g}" for k in range(1, n_heads) if config.hidden_size % k == 0]
        raise Unsupported(f"prune_structured: {keep_heads} heads left of {n_heads}, but stock llama needs "
                          f"the width ({config.hidden_size}) to be a multiple of the head count; heads "
                          f"fractions that work: {', '.join(allowed) or 'none'}")

    def rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
        out = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None)
        out.weight.data = linear.weight.data[index].clone()
        if linear.bias is not None:
            out.bias.data = linear.bias.data[index].clone()
        return out

    def cols(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
        out = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None)
        out.weight.data = linear.weight.data[:, index].clone()
        if linear.bias is not None:
            out.bias.data = linear.bias.data.clone()
        return out

    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            per_head = [w.view(n_heads, head_dim, -1).pow(2).sum((1, 2))
                        for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)]
            per_head.append(attn.o_proj.weight.view(-1, n_heads, head_dim).pow(2).sum((0, 2)))
            heads = torch.sort(torch.stack(per_head).sum(0).sqrt().topk(keep_heads).indices).values
            index = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
            attn.q_proj, attn.k_proj, attn.v_proj = (rows(attn.q_proj, index), rows(attn.k_proj, index),
                                                     rows(attn.v_proj, index))
            attn.o_proj = cols(attn.o_proj, index)
            attn.num_heads = attn.num_key_value_heads = keep_heads  # for code that still reads them
            importance = (mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1)
                          + mlp.down_proj.weight.pow(2).sum(0)).sqrt()
            neurons = torch.sort(importance.topk(keep_neurons).indices).values
            mlp.gate_proj, mlp.up_proj = rows(mlp.gate_proj, neurons), rows(mlp.up_proj, neurons)
            mlp.down_proj = cols(mlp.down_proj, neurons)
    config.num_attention_heads = config.num_key_value_heads = keep_heads
    config.head_dim = head_dim
    config.intermediate_size = keep_neurons
    return Made(model, made.lmmem_format, None, {"heads_kept": keep_heads, "neurons_kept": keep_neurons})


def distill(made: Made, spec: Distill, tokens: Path, seed: int) -> Made:
    if made.quantized or getattr(made.model.config, "model_type", "") != "llama":
        raise Unsupported("distill trains a llama student from a float llama teacher")
    student, figures = train_student(made.model, spec, tokens, seed)
    return Made(student, False, None, figures)


# ----------------------------------------------------------------------------- run


def save(made: Made, folder: Path, model_dir: Path, name: str, spec: Any) -> dict[str, Any]:
    """Write the variant; returns its size figures."""
    folder.mkdir(parents=True)
    model = made.model
    if made.lmmem_format:
        encodings = storage.save_state(model.state_dict(), folder / VARIANT_WEIGHTS)
        if isinstance(model, LSTMLanguageModel):
            shutil.copy(model_dir / "lstm_config.json", folder / "lstm_config.json")
        else:
            model.config.save_pretrained(str(folder))
        (folder / VARIANT_FILE).write_text(json.dumps({"name": name, "quantized": made.quantized or {}},
                                                      indent=1, sort_keys=True) + "\n")
    else:
        model.save_pretrained(str(folder))
        encodings = {"dense": len(model.state_dict())}
    for tokenizer_file in TOKENIZER_FILES:
        if (model_dir / tokenizer_file).is_file():
            shutil.copy(model_dir / tokenizer_file, folder / tokenizer_file)
    write_json(folder / "params.json", {"variant": name, **spec.model_dump()})
    weights, nonzero = weight_counts(model)
    on_disk = size_on_disk(folder)
    return {"params": weights, "nonzero_params": nonzero, "bytes_on_disk": on_disk,
            "bytes_per_param": on_disk / weights if weights else math.nan,
            **{f"tensors_{kind}": count for kind, count in encodings.items()}}


def make(spec: Any, base: Made, paths: Paths, seed: int) -> Made:
    made = Made(copy.deepcopy(base.model), base.lmmem_format, copy.deepcopy(base.quantized))
    match spec:
        case Cast():
            return cast(made, spec)
        case Quantize():
            return quantize(made, spec)
        case PruneMagnitude():
            return prune_magnitude(made, spec)
        case PruneStructured():
            return prune_structured(made, spec)
        case Distill():
            return distill(made, spec, paths.tokens, seed)
    raise StageError(f"unknown method {spec.method}")  # pragma: no cover


def run(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    if not params.variants:
        raise StageError("compress.variants is empty: name at least one variant")
    try:
        trained = load_model_folder(paths.model)
    except ValueError as exc:
        raise StageError(f"{exc} (run the train stage first)") from None
    reference = size_on_disk(paths.model)
    metrics: dict[str, Any] = {"reference_bytes_on_disk": reference, "variants": len(params.variants)}
    made: dict[str, Made | None] = {}
    peak, start = peak_rss_mib(), start_rss_mib()
    with atomic_dir(paths.out, "compress") as tmp:
        for name in params.order():
            spec = params.variants[name]
            reset_peak_rss()
            started = time.perf_counter()
            source = made[spec.base] if spec.base else Made(trained)
            try:
                if source is None:
                    raise Unsupported(f"its base {spec.base!r} is unsupported")
                torch.manual_seed(base.seed)
                result = make(spec, source, paths, base.seed)
                figures = save(result, tmp / name, paths.model, name, spec)
                figures.update(result.figures or {})
                figures["size_ratio"] = figures["bytes_on_disk"] / reference
                figures["status"] = "ok"
                made[name] = result
                log.info("%s: %.2f MiB on disk (%.3f x the trained model)", name,
                         figures["bytes_on_disk"] / 2**20,
                         figures["size_ratio"])
            except Unsupported as exc:
                made[name] = None
                (tmp / name).mkdir(exist_ok=True)
                write_json(tmp / name / "unsupported.json", {"variant": name, "reason": str(exc)})
                figures = {"status": "unsupported"}
                log.warning("%s: unsupported: %s", name, exc)
            figures["seconds"] = time.perf_counter() - started
            figures["peak_rss_mib"] = peak_rss_mib()
            if figures["peak_rss_mib"] > peak:
                peak, start = figures["peak_rss_mib"], start_rss_mib()
            metrics.update({f"{name}_{key}": value for key, value in figures.items()})
        write_params(tmp, base=base, compress=params)
    metrics["unsupported"] = sum(1 for m in made.values() if m is None)
    # the largest of the per-variant peaks (each reset at its start), and the RSS at that start
    metrics["peak_rss_mib"], metrics["rss_start_mib"] = peak, start
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("compress", Params, Paths, run, argv, doc=__doc__)

