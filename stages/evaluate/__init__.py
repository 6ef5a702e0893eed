"""evaluate: the trained model and every compressed variant measured the same way, side by
side, each in a fresh process so that memory peaks do not mix.

Per model (stages/evaluate/): quality (perplexity, top-1/top-5 accuracy on the same windows),
load time and inference memory, sampled and greedy generations, generation memory with a KV
cache over a grid of batches × contexts and the quantized caches (generation.py), the
sentiment probe on a labelled corpus (probe.py), pruned weights kept sparse at run time, the
process's peak RSS (measure.py), then latency one model at a time (latency.py). Outputs in
data/eval (outputs.py): the same bytes on any machine; every figure, those of the machine
too, as `<model>_<figure>` in data/metrics/evaluate.json (metrics.py). A variant that
compress could not make, or that fails here, is a row with its status and reason; the others
go on. The params' descriptions (params.yaml) say what each setting trades.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from stages.common.core.artifacts import read_json, size_on_disk
from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, Section
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.harness.portable import pinned_threads
from stages.common.harness.stage import stage_main
from stages.common.harness.workers import cores, fresh_processes
from stages.common.modelling.classify import probe_problem
from stages.common.modelling.kvquant import BITS
from stages.common.modelling.windows import check_ids
from stages.evaluate.latency import LATENCY_PROMPT, latency
from stages.evaluate.measure import TRAINED, measure
from stages.evaluate.metrics import row_metrics
from stages.evaluate.outputs import write_outputs
from stages.evaluate.probe import word2vec_probe

log = logging.getLogger("lmmem.evaluate")


class Params(Section):
    variants: list[str] = Field(
        default_factory=list,
        description="compressed variants to evaluate beside the trained model; [] = all of data/compressed")
    batch_size: int = Field(
        16, ge=1, description="windows per batch for perplexity, accuracy and the inference memory peak")
    eval_batches: int = Field(
        16, ge=1, description="batches of validation and of test windows (the same for every model)")
    loss_chunk_tokens: int = Field(256, ge=0, description=(
        "perplexity and accuracy over N positions' logits at a time (the full batch's never held); 0 = all "
        "at once"))
    latency_batch: int = Field(
        8, ge=1, description="the batched latency's batch size (batch 1 is always measured)")
    latency_new_tokens: int = Field(16, ge=1, description="greedy tokens generated per latency measurement")
    latency_repeats: int = Field(
        3, ge=1, description="timed repeats after one warm-up; the median is reported")
    prompts: list[str] = Field(
        default_factory=lambda: ["这 本书", "质量"],
        description="generation prompts, words separated by spaces (the tokenizer's pre-tokenization)")
    generate_tokens: int = Field(20, ge=1, description="sampled tokens per prompt and model")
    temperature: float = Field(
        0.8, gt=0.0, description="sampling temperature: lower = more conservative text")
    top_k: int = Field(20, ge=1, description="sample among the k most likely tokens")
    classify: bool = Field(
        True, description=("sentiment probe on labelled corpora (a head on each model's frozen body) and a "
                           "Word2Vec baseline"))
    classify_train_docs: int = Field(
        2000, ge=10, description="labelled training documents for the probe: more = better head, slower "
                                 "(features of each)")
    classify_max_tokens: int = Field(64, ge=1, description="each document cut to its first N tokens")
    generation_batches: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=lambda: [1, 8], min_length=2, description=(
        "batch sizes of the metered generation; the largest batch within the budget is read off the line "
        "through the two largest"))
    generation_contexts: list[Annotated[int, Field(ge=2, le=65536)]] = Field(
        default_factory=lambda: [32, 128], min_length=1, description=(
        "tokens the KV cache holds when the metered generation ends: the cache grows linearly with them"))
    generation_prompt: int = Field(16, ge=1, le=65535, description="prompt tokens (validation text) the "
                                                                   "metered generation starts from")
    generation_budget_mib: float = Field(32.0, gt=0, description=(
        "the tensor memory (weights, KV cache, activations, logits) the largest batch per context must fit"))
    kv_cache_bits: list[int] = Field(default_factory=lambda: [8, 4], description=(
        "quantized KV caches (8: int8, 4: int4, one scale per token and head) the trained model's generation "
        "memory, perplexity and latency are measured with, beside the exact cache; [] = none"))
    sparse_runtime: bool = Field(True, description=(
        "pruned variants also measured with their weights kept sparse in memory (a bitmask and the non-zero "
        "values, decoded a layer at a time): tensor peaks, generation peak and latency beside the dense "
        "decoding"))
    workers: int = Field(2, ge=1, le=64, description=(
        "models measured at once, each in its own process on its share of the cores; latency is timed "
        "one model at a time"))


@dataclass(frozen=True)
class Paths:
    model: Path = Path("data/model")
    compressed: Path = Path("data/compressed")
    tokens: Path = Path("data/tokens")
    embed: Path = Path("data/embed")
    out: Path = Path("data/eval")


def models_to_evaluate(params: Params, paths: Paths) -> list[tuple[str, Path]]:
    made = sorted(d.name for d in paths.compressed.iterdir()
                  if d.is_dir()) if paths.compressed.is_dir() else []
    unknown = [v for v in params.variants if v not in made]
    if unknown:
        raise StageError(f"evaluate.variants: no variant named {', '.join(map(repr, unknown))} in "
                         f"{paths.compressed} (there: {', '.join(made) or 'none'})")
    chosen = params.variants or made
    return [(TRAINED, paths.model)] + [(v, paths.compressed / v) for v in chosen]


def failure(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def context_of(params: Params, paths: Paths) -> int:
    """The trained model's context, once every setting that must fit in it is checked: refused
    before any model is loaded."""
    if not (paths.model / "params.json").is_file():
        raise StageError(f"{paths.model} holds no trained model (no params.json): run the train stage first")
    context = read_json(paths.model / "params.json")["train"]["model"]["context"]
    prompt = max(len(p.split()) for p in params.prompts) if params.prompts else 0
    too_long = [c for c in params.generation_contexts if not params.generation_prompt <= c <= context]
    if unknown := [b for b in params.kv_cache_bits if b not in BITS]:
        raise StageError(f"evaluate.kv_cache_bits: {unknown} not a KV cache's bits; "
                         f"{' or '.join(map(str, BITS))}")
    if too_long or len(set(params.generation_batches)) < 2:
        raise StageError(f"evaluate.generation_contexts: {too_long} outside {params.generation_prompt} "
                         f"(the prompt) to {context} (the model's context)" if too_long else
                         f"evaluate.generation_batches: {params.generation_batches} needs two different "
                         "sizes")
    for key, prompt_tokens, new_tokens in (("generate_tokens", prompt, params.generate_tokens),
                                           ("latency_new_tokens", LATENCY_PROMPT, params.latency_new_tokens)):
        if prompt_tokens + new_tokens > context:
            raise StageError(f"evaluate.{key}: {new_tokens} new tokens after a {prompt_tokens}-token prompt "
                             f"exceed the model's context of {context}; at most {context - prompt_tokens}")
    return context


def checked_tokens(params: Params, paths: Paths) -> tuple[TokensMeta, Params]:
    """The tokens' meta, every split's ids checked once here (not as a failure of every model),
    and the params without the probe where the labels cannot train one."""
    meta = read_typed(paths.tokens / "meta.json", TokensMeta)
    for split in ("train", "validation", "test"):
        check_ids(paths.tokens / f"{split}.bin", meta.dtype, meta.vocab_size)
    labels = np.fromfile(paths.tokens / "train.labels.bin", dtype=np.int32) if meta.labels else None
    if params.classify and labels is not None and (skip := probe_problem(labels, len(meta.labels),
                                                                         params.classify_train_docs)):
        log.warning("no sentiment probe: %s", skip)
        params = params.model_copy(update={"classify": False})
    return meta, params


def measure_each(chosen: list[tuple[str, Path]], params: Params, paths: Paths, context: int,
                 seed: int) -> dict[str, dict[str, Any]]:
    """Every model's row: `workers` at a time, each in a fresh process on its share of the
    cores; a variant compress could not make, or one that fails, is a row with its reason."""
    found: dict[str, dict[str, Any]] = {}
    for name, folder in chosen:
        if (folder / "unsupported.json").is_file():
            found[name] = {"name": name, "status": "unsupported",
                           "reason": read_json(folder / "unsupported.json")["reason"]}
    todo = [(name, folder) for name, folder in chosen if name not in found]
    workers = min(params.workers, len(todo)) or 1
    # the figures depend on the count (base.portable)
    threads = max(1, (pinned_threads() or cores()) // workers)
    log.info("measuring %d models, %d at a time, each in a fresh process on %d threads ...", len(todo),
             workers,
             threads)
    with fresh_processes(workers) as pool:  # quality, inference peak, generations, probe
        futures = {name: pool.submit(measure, name, folder, params, paths, context, seed, threads)
                   for name, folder in todo}
        for name, future in futures.items():
            try:
                found[name] = future.result()
            except Exception as exc:  # a broken variant is a row, not the end of the evaluation
                found[name] = {"name": name, "status": "failed", "reason": failure(exc)}
                log.warning("%s failed: %s", name, found[name]["reason"])
    return found


def time_each(found: dict[str, dict[str, Any]], chosen: list[tuple[str, Path]], params: Params, paths: Paths,
              context: int) -> None:
    """Each measured model's latency, one at a time with the cores to itself, and its size on
    disk against the trained model's."""
    log.info("timing generation, one model at a time ...")
    reference = size_on_disk(paths.model)
    with fresh_processes(1) as pool:
        for name, folder in chosen:
            if found[name]["status"] != "ok":
                continue
            try:
                kv_bits = params.kv_cache_bits if found[name].get("kv_quant") else []
                found[name].update(pool.submit(latency, folder, params, paths, context, cores(), kv_bits,
                                               bool(found[name].get("sparse"))).result())
            except Exception as exc:
                found[name] = {"name": name, "status": "failed", "reason": failure(exc)}
                log.warning("%s failed: %s", name, found[name]["reason"])
                continue
            on_disk = size_on_disk(folder)
            found[name].update(bytes_on_disk=on_disk, size_ratio=on_disk / reference)


def run(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    context = context_of(params, paths)
    meta, params = checked_tokens(params, paths)
    chosen = models_to_evaluate(params, paths)
    found = measure_each(chosen, params, paths, context, base.seed)
    time_each(found, chosen, params, paths, context)
    timeline = found[TRAINED].pop("timeline", [])  # not a figure: data/eval/timeline.csv
    rows = [found[name] for name, _ in chosen]
    if not any(row["status"] == "ok" for row in rows):  # keep the previous results: these say nothing
        reasons = "; ".join(f"{row['name']}: {row.get('reason', row['status'])}" for row in rows[:3])
        raise StageError(f"no model could be measured ({len(rows)} tried; {reasons})")
    if params.classify and meta.labels:
        rows.append(word2vec_probe(paths, params, meta, base.seed))
    metrics: dict[str, Any] = {"models": len(rows)}
    for row in rows:
        metrics.update(row_metrics(row, base.allocator))
    write_outputs(paths.out, rows, timeline, params, base)
    metrics["failed"] = sum(r["status"] == "failed" for r in rows)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", Params, Paths, run, argv, doc=__doc__)
