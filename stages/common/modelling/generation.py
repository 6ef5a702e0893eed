"""Generation: text from a model (sampled or greedy, timed per token), and its memory: greedy
decoding with a KV cache, metered by category, and the KV cache's bytes in closed form.

Why it is built this way: docs/design-notes.md, `stages.common.modelling.generation`.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stages.common.core.eval_results import GEN_CATEGORIES
from stages.common.memory.tensor_meter import Peak, TensorMeter, _storage
from stages.common.memory.timeline import ModuleTimeline
from stages.common.modelling.kvquant import QuantizedKVCache
from stages.common.modelling.models import LSTMLanguageModel, logits_of


def new_cache(model: torch.nn.Module, bits: int = 0) -> Any:
    """An empty KV cache for `model`: transformers' DynamicCache (bits 0, the model's dtype) or
    the int8 / int4 one of stages/common/modelling/kvquant.py."""
    from transformers import DynamicCache

    return QuantizedKVCache(model.config.num_hidden_layers, bits) if bits else DynamicCache()


@torch.no_grad()
def generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, sample: bool,
             temperature: float = 1.0, top_k: int = 0, kv_bits: int = 0) -> torch.Tensor:
    """ids (batch, time) → (batch, new_tokens) continuations, exactly new_tokens long; a
    transformers model with a KV cache of `kv_bits` (0: its own dtype)."""
    if not isinstance(model, LSTMLanguageModel):
        kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": new_tokens,
                                  "min_new_tokens": new_tokens,
                                  "cache": new_cache(model, kv_bits)}
        if sample:
            kwargs.update(temperature=temperature, top_k=top_k)
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[:, ids.shape[1]:]
    out = ids
    for _ in range(new_tokens):  # no cache: the LSTM reruns the prefix
        logits = model(out)[:, -1].float()
        if sample:
            values, index = (logits / temperature).topk(top_k)
            pick = index.gather(1, torch.multinomial(values.softmax(-1), 1))
        else:
            pick = logits.argmax(-1, keepdim=True)
        out = torch.cat([out, pick], dim=1)
    return out[:, ids.shape[1]:]


def ms_per_token(model: torch.nn.Module, prompt: torch.Tensor, batch: int, new_tokens: int, repeats: int,
                 kv_bits: int = 0) -> float:
    ids = prompt.expand(batch, -1).contiguous()
    generate(model, ids, new_tokens, sample=False, kv_bits=kv_bits)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        generate(model, ids, new_tokens, sample=False, kv_bits=kv_bits)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000 / (batch * new_tokens)


def repetition(ids: list[int]) -> float:
    """1 − distinct tokens / tokens of a continuation: 0 when no token comes twice, (n − 1) / n
    when one token fills all n."""
    return 1 - len(set(ids)) / len(ids) if ids else 0.0


def generations(model: torch.nn.Module, folder: Path, params: Any, seed: int) -> dict[str, Any]:
    """Per prompt of `params.prompts` a sampled continuation (seeded; evaluate's
    generate_tokens, temperature, top_k) and the greedy one; the greedy ones' mean repetition."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    sampled, greedy, repeats = [], [], []
    for prompt in params.prompts:
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids])
        torch.manual_seed(seed)
        new = generate(model, ids, params.generate_tokens, sample=True, temperature=params.temperature,
                       top_k=params.top_k)
        sampled.append(prompt + " | " + tokenizer.decode(new[0].tolist(), skip_special_tokens=False))
        best = generate(model, ids, params.generate_tokens, sample=False)[0].tolist()
        greedy.append(prompt + " | " + tokenizer.decode(best, skip_special_tokens=False))
        repeats.append(repetition(best))
    return {"generations": sampled, "greedy": greedy,
            "greedy_repetition": sum(repeats) / len(repeats) if repeats else None}


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head size) of a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_cache_bytes(config: Any, batch: int, context: int, dtype: torch.dtype, bits: int = 0) -> int:
    """The keys and values of `context` tokens for `batch` sequences in every layer: in
    `dtype`, or (bits 8 or 4) a byte or half a byte a value plus a 4-byte scale per token and head."""
    layers, kv_heads, head_dim = kv_shape(config)
    per_head = head_dim * bits // 8 + 4 if bits else head_dim * torch.empty((), dtype=dtype).element_size()
    return 2 * layers * batch * context * kv_heads * per_head


def activation_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in, hence its KV cache's: its config's (a quantized
    variant's layers compute in it too)."""
    dtype = getattr(model.config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor a cache's layers hold: DynamicLayer's keys and values, a quantized layer's
    codes and scales (in its attributes, or in dicts, lists and tuples of them)."""
    found: list[torch.Tensor] = []
    todo: list[Any] = [vars(layer) for layer in getattr(cache, "layers", ())]
    while todo:  # no recursive closure: its reference cycle would keep the tensors alive until a collection
        value = todo.pop()
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            todo += value.values()
        elif isinstance(value, (list, tuple)):
            todo += value
    return found


class GenerationMeter(TensorMeter):
    """The tensor meter with generation's categories. Before every op it reads the cache and
    moves the storages it now holds to kv_cache; the head's output is moved to logits as it is
    made. A storage moved so soon after it was made may have set the peak while it was still
    counted as an activation: the peak's split is corrected then, so its categories are the
    ones each storage ends up in."""

    def __init__(self) -> None:
        super().__init__(GEN_CATEGORIES)
        self.cache: Any = None
        self._fresh: set[int] = set()  # storages made since the cache was last read
        self._peak_fresh: dict[int, Any] = {}  # those of them alive at the peak: id -> weak reference

    def _add(self, storage: torch.UntypedStorage, category: str) -> None:
        self._fresh.add(id(storage))
        super()._add(storage, category)

    def _update_peaks(self) -> None:
        before = self.peak
        super()._update_peaks()
        if self.peak is not before:
            self._peak_fresh = {key: self._live[key][0] for key in self._fresh if key in self._live}

    def claim(self, tensor: torch.Tensor, category: str) -> None:
        """Count a tensor just made in `category`, at the peak too if it was part of it."""
        storage = _storage(tensor)
        if storage is None or id(storage) not in self._live:
            return
        _, size, old = self._live[id(storage)]
        if old == category:
            return
        at_peak = self._peak_fresh.pop(id(storage), None)
        if at_peak is not None and at_peak() is storage:  # the same storage, not a later one with its id
            split = dict(self.peak.by_category)
            split[old] -= size
            split[category] += size
            self.peak = Peak(self.peak.total, split, self.peak.step, self.peak.phase)
        self._move(storage, category)

    def read_cache(self) -> None:
        if self.cache is not None:
            for tensor in cache_tensors(self.cache):
                self.claim(tensor, "kv_cache")
        self._fresh.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.read_cache()
        return super().__torch_dispatch__(func, types, args, kwargs)


@torch.no_grad()
def metered_generation(model: torch.nn.Module, prompt: torch.Tensor, context: int, kv_bits: int = 0,
                       by_module: int = 0, decode_only: bool = False) -> dict[str, Any]:
    """Prefill `prompt` (batch, tokens), then decode greedily until the cache (of `kv_bits`; 0:
    the model's dtype) holds `context` tokens. The peak's bytes by category, where it
    happened, and the cache at the end; `by_module` > 0: also `timeline`, the prefill and the
    last `by_module` decode steps block by block (stages.common.memory.timeline). `decode_only`: the
    peak of the decoding alone, the prefill only filling the cache it starts from."""
    batch, prompt_tokens = prompt.shape
    if not 0 < prompt_tokens <= context:
        raise ValueError(f"a {prompt_tokens}-token prompt cannot fill a {context}-token context")
    meter = GenerationMeter()
    meter.track_model(model, lambda name, tensor: "weights")
    meter.cache = cache = new_cache(model, kv_bits)
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, inputs, output: meter.claim(output, "logits"))
    meter.track(prompt, "activations")
    timeline = ModuleTimeline(meter, ("activations", "kv_cache", "logits"), by="group")
    try:
        if by_module:
            timeline.__enter__()
        with meter.phase(0, "prefill"):
            out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
        if decode_only:  # what the prefill left (weights, cache, logits) is where decoding starts
            meter.read_cache()
            meter.peak = Peak(sum(meter.current.values()), dict(meter.current), 0, "prefill")
        step = 0
        while cache.get_seq_length() < context:
            step += 1
            with meter.phase(step, "decode"):
                pick = out.logits[:, -1].argmax(-1, keepdim=True)
                del out
                out = model(input_ids=pick, cache=cache, use_cache=True, logits_to_keep=1)
        meter.read_cache()
        held = sum({id(s): s.nbytes() for s in map(_storage, cache_tensors(cache)) if s is not None}.values())
    finally:
        timeline.__exit__()
        hook.remove()
        meter.close()
    mib = 2**20
    kept = [r for r in timeline.rows() if r["step"] == 0 or r["step"] > step - by_module]
    return {"batch": batch, "context": context, "prompt": prompt_tokens,
            **({"timeline": [{**r, "sample": i} for i, r in enumerate(kept)]} if by_module else {}),
            "peak_mib": meter.peak.total / mib,
            **{f"{c}_mib": meter.peak.by_category[c] / mib for c in GEN_CATEGORIES},
            "peak_phase": meter.peak.phase, "peak_step": meter.peak.step,
            "kv_cache_end_mib": held / mib}


def forward_peak(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """The tensor meter over one forward pass of `ids` (batch, tokens): its summary (total
    and parameters peaks) and the logits."""
    meter = TensorMeter()
    meter.track_model(model)
    with torch.no_grad(), meter.phase(0, "forward"):
        logits = logits_of(model, ids)
    meter.close()
    return meter.summary(prefix=""), logits


def tiled(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """`batch` prompts from `rows`, repeated in turn when there are fewer (decoding memory
    does not depend on which tokens they are), in a storage of their own: the meter counts
    the prompt's storage whole."""
    return rows[torch.arange(batch) % rows.size(0)].contiguous()


def largest_batch(points: list[dict[str, Any]], budget_mib: float) -> tuple[int, float]:
    """The largest batch whose peak fits `budget_mib` on the line through the two largest
    batches' peaks at one context, and the line's peak at that batch. Every live tensor is
    either the same for any batch or proportional to it, so each op's bytes are a line in the
    batch and the peak, their maximum, is convex: beyond the two batches it lies on or above
    this line, and the line's batch is an upper bound of the true one."""
    (b1, p1), (b2, p2) = sorted((p["batch"], p["peak_mib"]) for p in points)[-2:]
    slope = (p2 - p1) / (b2 - b1)
    fixed = p1 - slope * b1
    batch = max(0, int((budget_mib - fixed) // slope)) if slope > 0 else 0
    return batch, fixed + slope * batch


def generation_memory(model: torch.nn.Module, rows: torch.Tensor, batches: list[int], contexts: list[int],
                      prompt_tokens: int, budget_mib: float, check_up_to: int = 256) -> dict[str, Any]:
    """The metered generation over batches × contexts, each point beside the KV cache's closed
    form; per context the largest batch within the budget on the line, and at the largest
    context that batch metered, then one fewer while the metered peak is over the budget
    (the line's batch is an upper bound), when the line's batch is at most `check_up_to`."""
    dtype = activation_dtype(model)
    points, fits = [], []
    for context in contexts:
        here = []
        for batch in batches:
            point = metered_generation(model, tiled(rows[:, :prompt_tokens], batch), context)
            point["kv_cache_predicted_mib"] = kv_cache_bytes(model.config, batch, context, dtype) / 2**20
            here.append(point)
        points += here
        batch, line = largest_batch(here, budget_mib)
        fits.append({"context": context, "budget_mib": budget_mib, "batch": batch, "line_batch": batch,
                     "line_mib": line, "checked_mib": None})
    last = fits[-1]
    # checked_mib: the peak of `batch` (over the budget after 8 tries)
    while 0 < last["batch"] <= check_up_to:
        peak = metered_generation(model, tiled(rows[:, :prompt_tokens], last["batch"]),
                                  last["context"])["peak_mib"]
        last["checked_mib"] = peak
        if peak <= budget_mib or last["line_batch"] - last["batch"] >= 8:
            break
        last["batch"] -= 1
    error = max(abs(p["kv_cache_end_mib"] - p["kv_cache_predicted_mib"]) / p["kv_cache_predicted_mib"]
                for p in points)
    return {"generation": points, "max_batch": fits, "kv_cache_error": error}


@torch.no_grad()
def cached_perplexity(model: torch.nn.Module, rows: torch.Tensor, kv_bits: int = 0) -> tuple[float, int]:
    """The perplexity of `rows` (batch, tokens + 1) read one position at a time through a KV
    cache of `kv_bits` (0: the exact cache, equal to one forward pass over the windows), and
    the positions it averages over."""
    cache = new_cache(model, kv_bits)
    loss, count = 0.0, 0
    for t in range(rows.size(1) - 1):
        logits = model(input_ids=rows[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1].float()
        loss += F.cross_entropy(logits, rows[:, t + 1], reduction="sum").item()
        count += rows.size(0)
    return math.exp(loss / count), count


def kv_quantization(model: torch.nn.Module, rows: torch.Tensor, batch: int, context: int, prompt_tokens: int,
                    bits: list[int], exact: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The exact cache (bits 0) and each of `bits` side by side: generation metered at `batch` ×
    `context` (the cache at the end beside its closed form, the peak; `exact`: the exact cache's
    point already metered there, reused) and the perplexity of `rows` through the cache."""
    dtype = activation_dtype(model)
    points = []
    for kv_bits in [0, *bits]:
        metered = exact if kv_bits == 0 and exact is not None else \
            metered_generation(model, tiled(rows[:, :prompt_tokens], batch), context, kv_bits)
        ppl, tokens = cached_perplexity(model, rows, kv_bits)
        points.append({"bits": kv_bits, "batch": batch, "context": context,
                       "kv_cache_end_mib": metered["kv_cache_end_mib"],
                       "kv_cache_predicted_mib": kv_cache_bytes(model.config, batch, context, dtype,
                                                                kv_bits) / 2**20,
                       "peak_mib": metered["peak_mib"], "activations_mib": metered["activations_mib"],
                       "ppl": ppl, "tokens": tokens})
    return points
