"""evaluate: the trained model and every compressed variant measured the same way, side by
side, each in a fresh process so that memory peaks do not mix.

Per model: validation and test perplexity and next-token top-1/top-5 accuracy on the same
fixed windows; load time; inference tensor peak (the tensor meter over one forward pass of
a batch) and process peak RSS (reset after imports); latency in ms per generated token at
batch 1 and at `latency_batch` (greedy, KV cache where the model has one; median of
`latency_repeats` after a warm-up); seeded sampled and greedy generations of the same
prompts, with the greedy ones' repetition (1 − distinct tokens / tokens); generation memory
(transformers models): greedy decoding with a KV cache metered over `generation_batches` ×
`generation_contexts`, the peak split into weights, KV cache, activations and logits, the
cache beside its closed form, and per context the largest batch within
`generation_budget_mib` (stages/common/modelling/generation.py); for the trained model, the int8 and
int4 KV caches of `kv_cache_bits` beside the exact one (the cache's bytes and the peak at the
grid's largest batch × context, the perplexity of a batch of validation windows read one
position at a time through the cache, and the batched latency with it); pruned variants with
their weights kept sparse in memory (stages/common/weights/sparse.py) beside their dense decoding:
weight bytes, tensor peaks, one sequence's generation peak, latency at batch 1; and, on a labelled
corpus, a sentiment probe: a logistic-regression head trained on the model's
mean-pooled last hidden states (train split, body frozen) and scored on the test split,
beside a bag-of-Word2Vec baseline with the same classifier.

Outputs in data/eval/: results.json (everything per model but the figures of the machine:
times, latency, RSS), table.csv (one row per model: the DVC plot of size against perplexity),
generations.md (prompts × models): the same bytes on any machine (base.portable). Every
figure, those of the machine too, as flat keys `<model>_<figure>` in data/metrics/evaluate.json. A variant that compress could not make,
or that fails here, is a row with its status and reason; the others go on.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from stages.common.core.artifacts import atomic_dir, read_json, size_on_disk, write_json, write_params
from stages.common.core.errors import StageError
from stages.common.core.eval_results import MEASURED, EvalRow
from stages.common.core.params import BaseParams, Section
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.harness.portable import pinned_threads
from stages.common.harness.stage import stage_main
from stages.common.harness.workers import cores, fresh_processes, share_cores
from stages.common.memory.rss_meter import peak_rss_mib, reset_peak_rss, start_rss_mib
from stages.common.memory.timeline import write_rows
from stages.common.modelling.classify import (Docs, fit_logistic, pooled_features, predict, probe_problem,
                                              scores)
from stages.common.modelling.generation import (forward_peak, generation_memory, generations, kv_quantization,
                                                metered_generation, ms_per_token, tiled)
from stages.common.modelling.halfmath import half_products_in_float
from stages.common.modelling.kvquant import BITS
from stages.common.modelling.loss import logits_in_chunks
from stages.common.modelling.models import LSTMLanguageModel
from stages.common.modelling.windows import Windows, check_ids
from stages.common.weights.loading import load_model_folder, weight_counts
from stages.common.weights.sparse import sparse_figures, sparsify
from stages.evaluate.metrics import row_metrics, tensor_peaks

log = logging.getLogger("lmmem.evaluate")

TRAINED = "model"  # the row of data/model, the reference of every ratio
TIMELINE_STEPS = 2  # decode steps of the trained model's generation timeline, after its prefill
LATENCY_PROMPT = 8  # tokens of validation text the latency's greedy generation starts from
TABLE = ("name", "status", "bytes_on_disk", "size_ratio", "params", "nonzero_params", "val_ppl", "test_ppl",
         "top1", "top5", "tensor_peak_mib", "greedy_repetition", "cls_accuracy", "cls_f1_macro")


class Params(Section):
    variants: list[str] = Field(
        default_factory=list, description="compressed variants to evaluate beside the trained model; [] = all of data/compressed")
    batch_size: int = Field(
        16, ge=1, description="windows per batch for perplexity, accuracy and the inference memory peak")
    eval_batches: int = Field(
        16, ge=1, description="batches of validation and of test windows (the same for every model)")
    loss_chunk_tokens: int = Field(256, ge=0, description=(
        "perplexity and accuracy over N positions' logits at a time (the full batch's never held); 0 = all at once"))
    latency_batch: int = Field(
        8, ge=1, description="the batched latency's batch size (batch 1 is always measured)")
    latency_new_tokens: int = Field(16, ge=1, description="greedy tokens generated per latency measurement")
    latency_repeats: int = Field(
        3, ge=1, description="timed repeats after one warm-up; the median is reported")
    prompts: list[str] = Field(
        default_factory=lambda: ["这 本书", "质量"], description="generation prompts, words separated by spaces (the tokenizer's pre-tokenization)")
    generate_tokens: int = Field(20, ge=1, description="sampled tokens per prompt and model")
    temperature: float = Field(
        0.8, gt=0.0, description="sampling temperature: lower = more conservative text")
    top_k: int = Field(20, ge=1, description="sample among the k most likely tokens")
    classify: bool = Field(
        True, description=("sentiment probe on labelled corpora (a head on each model's frozen body) and a Word2Vec "
        "baseline"))
    classify_train_docs: int = Field(
        2000, ge=10, description="labelled training documents for the probe: more = better head, slower (features of each)")
    classify_max_tokens: int = Field(64, ge=1, description="each document cut to its first N tokens")
    generation_batches: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=lambda: [1, 8], min_length=2, description=(
        "batch sizes of the metered generation; the largest batch within the budget is read off the line "
        "through the two largest"))
    generation_contexts: list[Annotated[int, Field(ge=2, le=65536)]] = Field(
        default_factory=lambda: [32, 128], min_length=1, description=(
        "tokens the KV cache holds when the metered generation ends: the cache grows linearly with them"))
    generation_prompt: int = Field(16, ge=1, le=65535, description="prompt tokens (validation text) the metered generation starts from")
    generation_budget_mib: float = Field(32.0, gt=0, description=(
        "the tensor memory (weights, KV cache, activations, logits) the largest batch per context must fit"))
    kv_cache_bits: list[int] = Field(default_factory=lambda: [8, 4], description=(
        "quantized KV caches (8: int8, 4: int4, one scale per token and head) the trained model's generation "
        "memory, perplexity and latency are measured with, beside the exact cache; [] = none"))
    sparse_runtime: bool = Field(True, description=(
        "pruned variants also measured with their weights kept sparse in memory (a bitmask and the non-zero "
        "values, decoded a layer at a time): tensor peaks, generation peak and latency beside the dense decoding"))
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


# ----------------------------------------------------------------------------- data


def windows(tokens: Path, split: str, dtype: str, context: int, batches: int, batch: int) -> list[torch.Tensor]:
    """The same consecutive non-overlapping windows of context + 1 ids for every model."""
    return list(Windows(tokens / f"{split}.bin", dtype, context).fixed_batches(batches, batch))


# ----------------------------------------------------------------------------- one model


@torch.no_grad()
def quality(model: torch.nn.Module, batches: list[torch.Tensor], chunk: int = 0) -> dict[str, float]:
    """Mean next-token loss (→ perplexity) and top-1/top-5 accuracy over the windows; the
    logits `chunk` positions at a time (0: a batch's at once)."""
    loss, top1, top5, count = 0.0, 0, 0, 0
    for rows in batches:
        for logits, target in logits_in_chunks(model, rows, chunk):
            loss += F.cross_entropy(logits, target, reduction="sum").item()
            best = logits.topk(5, dim=-1).indices
            top1 += int((best[:, 0] == target).sum())
            top5 += int((best == target[:, None]).any(-1).sum())
            count += target.numel()
            del logits
    return {"ppl": math.exp(loss / count), "top1": top1 / count, "top5": top5 / count}


def measure(name: str, folder: Path, params: Params, paths: Paths, context: int, seed: int,
            threads: int) -> dict[str, Any]:
    """Everything about one model but its latency; runs in a fresh process (beside another
    model's, each on its share of the cores)."""
    share_cores(threads)
    reset_peak_rss()  # the imports are the same for every model: leave them out
    torch.manual_seed(seed)
    meta = read_typed(paths.tokens / "meta.json", TokensMeta)
    started = time.perf_counter()
    model = load_model_folder(folder)
    result: dict[str, Any] = {"name": name, "status": "ok", "load_seconds": time.perf_counter() - started}
    phases: dict[str, float] = {}
    clock = time.perf_counter()
    result["params"], result["nonzero_params"] = weight_counts(model)
    for split in ("validation", "test"):
        with half_products_in_float():  # bf16 and fp16 products through the fp32 kernel: same figures, 4 × faster
            figures = quality(model, windows(paths.tokens, split, meta.dtype, context, params.eval_batches,
                                             params.batch_size), params.loss_chunk_tokens)
        prefix = "val" if split == "validation" else "test"
        result.update({f"{prefix}_ppl": figures["ppl"], f"{prefix}_top1": figures["top1"],
                       f"{prefix}_top5": figures["top5"]})
    result["top1"], result["top5"] = result["test_top1"], result["test_top5"]
    phases["quality"], clock = time.perf_counter() - clock, time.perf_counter()

    rows = windows(paths.tokens, "validation", meta.dtype, context, 1, params.batch_size)[0]
    summary = forward_peak(model, rows[:, :-1])[0]
    result["tensor_peak_mib"] = summary["total_peak_mib"]
    result["tensor_weights_mib"] = summary["parameters_peak_mib"]
    result.update(generations(model, folder, params, seed))
    if hasattr(model, "config") and not isinstance(model, LSTMLanguageModel):  # a KV cache to meter
        result.update(generation_memory(model, rows, params.generation_batches, params.generation_contexts,
                                        params.generation_prompt, params.generation_budget_mib))
        if name == TRAINED and params.kv_cache_bits:
            batch, context = max(params.generation_batches), max(params.generation_contexts)
            exact = next(p for p in result["generation"] if (p["batch"], p["context"]) == (batch, context))
            result["kv_quant"] = kv_quantization(model, rows, batch, context, params.generation_prompt,
                                                 params.kv_cache_bits, exact)
        if name == TRAINED:  # its largest generation again, module by module (data/eval/timeline.csv)
            batch, context = max(params.generation_batches), max(params.generation_contexts)
            result["timeline"] = metered_generation(model, tiled(rows[:, :params.generation_prompt], batch), context,
                                                    by_module=TIMELINE_STEPS)["timeline"]
    phases["inference peak and generation"], clock = time.perf_counter() - clock, time.perf_counter()
    if params.classify and meta.labels:
        with half_products_in_float():
            result.update(probe(model, paths, params, meta, seed))
        phases["probe"], clock = time.perf_counter() - clock, time.perf_counter()
    if params.sparse_runtime and hasattr(model, "config") and not isinstance(model, LSTMLanguageModel):
        result["sparse"] = sparse_figures(model, rows, max(params.generation_contexts), params.generation_prompt)
        phases["sparse at run time"] = time.perf_counter() - clock  # last: the model is sparse from here on
    result["rss_peak_mib"], result["rss_start_mib"] = peak_rss_mib(), start_rss_mib()
    result["rss_tensor_mib"] = max(tensor_peaks(result))
    result["seconds"] = time.perf_counter() - started
    log.info("%s: %.1f s (%s)", name, result["seconds"], ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    return result


def latency(folder: Path, params: Params, paths: Paths, context: int, threads: int, kv_bits: list[int],
            sparse: bool) -> dict[str, Any]:
    """ms per generated token at batch 1 and at latency_batch (greedy, median of the repeats
    after a warm-up), at latency_batch with each quantized KV cache of `kv_bits`, and, `sparse`,
    at batch 1 with the weights kept sparse, in a fresh process with the cores to itself: no
    other work runs meanwhile."""
    share_cores(threads)
    meta = read_typed(paths.tokens / "meta.json", TokensMeta)
    model = load_model_folder(folder)
    started = time.perf_counter()
    prompt = windows(paths.tokens, "validation", meta.dtype, context, 1, params.batch_size)[0][:1, :LATENCY_PROMPT]
    found = {"ms_per_token_b1": ms_per_token(model, prompt, 1, params.latency_new_tokens, params.latency_repeats),
             "ms_per_token_batch": ms_per_token(model, prompt, params.latency_batch, params.latency_new_tokens,
                                                params.latency_repeats)}
    for bits in kv_bits:
        found[f"kv{bits}_ms_per_token"] = ms_per_token(model, prompt, params.latency_batch, params.latency_new_tokens,
                                                       params.latency_repeats, bits)
    if sparse and sparsify(model)["swapped"]:
        found["sparse_ms_per_token_b1"] = ms_per_token(model, prompt, 1, params.latency_new_tokens,
                                                       params.latency_repeats)
    return {**found, "latency_seconds": time.perf_counter() - started}


def probe_docs(paths: Paths, params: Params, meta: TokensMeta, seed: int
               ) -> tuple[list[np.ndarray], list[int], list[np.ndarray], list[int]]:
    """The probe's training documents (a seeded sample of the train split) and all labelled
    test documents: the same for every model and for the baseline."""
    train = Docs(paths.tokens, "train", meta.dtype).labelled(params.classify_train_docs,
                                                               params.classify_max_tokens, seed)
    test = Docs(paths.tokens, "test", meta.dtype).labelled(10**9, params.classify_max_tokens, seed)
    return *train, *test


def probe(model: torch.nn.Module, paths: Paths, params: Params, meta: TokensMeta, seed: int) -> dict[str, Any]:
    train_docs, train_y, test_docs, test_y = probe_docs(paths, params, meta, seed)
    n = len(meta.labels)
    head = fit_logistic(pooled_features(model, train_docs), torch.tensor(train_y), n)
    result = scores(test_y, predict(head, pooled_features(model, test_docs)), n)
    return {f"cls_{k}": v for k, v in result.items()}


def word2vec_probe(paths: Paths, params: Params, meta: TokensMeta, seed: int) -> dict[str, Any]:
    """The baseline: each document as the mean of its words' Word2Vec vectors."""
    vectors = torch.from_numpy(np.load(paths.embed / "aligned.npy")).float()
    train_docs, train_y, test_docs, test_y = probe_docs(paths, params, meta, seed)
    n = len(meta.labels)
    head = fit_logistic(torch.stack([vectors[d].mean(0) for d in train_docs]), torch.tensor(train_y), n)
    result = scores(test_y, predict(head, torch.stack([vectors[d].mean(0) for d in test_docs])), n)
    return {"name": "word2vec-bow", "status": "ok", **{f"cls_{k}": v for k, v in result.items()}}


# ----------------------------------------------------------------------------- run


def models_to_evaluate(params: Params, paths: Paths) -> list[tuple[str, Path]]:
    made = sorted(d.name for d in paths.compressed.iterdir() if d.is_dir()) if paths.compressed.is_dir() else []
    unknown = [v for v in params.variants if v not in made]
    if unknown:
        raise StageError(f"evaluate.variants: no variant named {', '.join(map(repr, unknown))} in "
                         f"{paths.compressed} (there: {', '.join(made) or 'none'})")
    chosen = params.variants or made
    return [(TRAINED, paths.model)] + [(v, paths.compressed / v) for v in chosen]


def failure(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def run(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    if not (paths.model / "params.json").is_file():
        raise StageError(f"{paths.model} holds no trained model (no params.json): run the train stage first")
    context = read_json(paths.model / "params.json")["train"]["model"]["context"]
    prompt = max(len(p.split()) for p in params.prompts) if params.prompts else 0
    too_long = [c for c in params.generation_contexts if not params.generation_prompt <= c <= context]
    if unknown := [b for b in params.kv_cache_bits if b not in BITS]:
        raise StageError(f"evaluate.kv_cache_bits: {unknown} not a KV cache's bits; {' or '.join(map(str, BITS))}")
    if too_long or len(set(params.generation_batches)) < 2:
        raise StageError(f"evaluate.generation_contexts: {too_long} outside {params.generation_prompt} "
                         f"(the prompt) to {context} (the model's context)" if too_long else
                         f"evaluate.generation_batches: {params.generation_batches} needs two different sizes")
    for key, prompt_tokens, new_tokens in (("generate_tokens", prompt, params.generate_tokens),
                                           ("latency_new_tokens", LATENCY_PROMPT, params.latency_new_tokens)):
        if prompt_tokens + new_tokens > context:  # refused before any model is loaded
            raise StageError(f"evaluate.{key}: {new_tokens} new tokens after a {prompt_tokens}-token prompt exceed "
                             f"the model's context of {context}; at most {context - prompt_tokens}")
    meta = read_typed(paths.tokens / "meta.json", TokensMeta)
    for split in ("train", "validation", "test"):  # once here, not as a failure of every model
        check_ids(paths.tokens / f"{split}.bin", meta.dtype, meta.vocab_size)
    labels = np.fromfile(paths.tokens / "train.labels.bin", dtype=np.int32) if meta.labels else None
    if params.classify and labels is not None and (skip := probe_problem(labels, len(meta.labels),
                                                                          params.classify_train_docs)):
        log.warning("no sentiment probe: %s", skip)
        params = params.model_copy(update={"classify": False})
    reference = size_on_disk(paths.model)
    chosen = models_to_evaluate(params, paths)
    found: dict[str, dict[str, Any]] = {}
    for name, folder in chosen:
        if (folder / "unsupported.json").is_file():
            found[name] = {"name": name, "status": "unsupported",
                           "reason": read_json(folder / "unsupported.json")["reason"]}
    todo = [(name, folder) for name, folder in chosen if name not in found]
    workers = min(params.workers, len(todo)) or 1
    threads = max(1, (pinned_threads() or cores()) // workers)  # the figures depend on the count (base.portable)
    log.info("measuring %d models, %d at a time, each in a fresh process on %d threads ...", len(todo), workers,
             threads)
    with fresh_processes(workers) as pool:  # quality, inference peak, generations, probe
        futures = {name: pool.submit(measure, name, folder, params, paths, context, base.seed, threads)
                   for name, folder in todo}
        for name, future in futures.items():
            try:
                found[name] = future.result()
            except Exception as exc:  # a broken variant is a row, not the end of the evaluation
                found[name] = {"name": name, "status": "failed", "reason": failure(exc)}
                log.warning("%s failed: %s", name, found[name]["reason"])
    log.info("timing generation, one model at a time ...")
    with fresh_processes(1) as pool:
        for name, folder in todo:
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
    with atomic_dir(paths.out, "evaluate") as tmp:
        if timeline:
            write_rows(tmp / "timeline.csv", timeline)
        write_json(tmp / "results.json", [EvalRow.model_validate({k: v for k, v in row.items() if k not in MEASURED})
                                          for row in rows])  # the machine's figures: in the metrics
        with (tmp / "table.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TABLE, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        lines = ["# Generations", "", f"Sampled (seed {base.seed}, temperature {params.temperature}, "
                 f"top-k {params.top_k}), then greedy (its repetition per model in results.json); "
                 "prompt | continuation.", ""]
        for i, prompt in enumerate(params.prompts):
            lines += [f"## {prompt}", ""]
            for key, title in (("generations", "Sampled:"), ("greedy", "Greedy:")):
                lines += [title, "", *[f"- **{row['name']}**: {row[key][i]}" for row in rows if key in row], ""]
        (tmp / "generations.md").write_text("\n".join(lines), encoding="utf-8")
        write_params(tmp, base=base, evaluate=params)
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    metrics["failed"] = len(failed)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", Params, Paths, run, argv, doc=__doc__)

