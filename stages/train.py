"""train: a language model from scratch on data/tokens, each memory technique a switch, and
what the run held in memory measured category by category.

The loop, top to bottom: sample `batch_size` windows of `context + 1` token ids from the
training split (a seeded generator, so the same params see the same batches); split them
into micro-batches of `micro_batch_size` (gradient accumulation: the effective batch stays
`batch_size`); forward under autocast when `precision` is bf16/fp16; cross-entropy on the
next token; backward (recomputing each layer's activations when `activation_checkpointing`
is on); clip; optimizer step with the scheduled learning rate; gradients freed
(`set_to_none`); when pruning, the pruned weights zeroed again (stages.common.pruning). The first `meter_steps` optimizer steps run under the tensor meter
(stages.common.meter) — exact bytes by category, but slower — and throughput is timed on
the steps after them. Every `checkpoint_every` steps the whole state goes to
data/checkpoints/train (stages.common.checkpoint): a killed run started again resumes
there and ends with the same metrics as a run never stopped.

Outputs: data/model/ (`save_pretrained` in safetensors with the tokenizer, so stock
transformers loads it; the LSTM baseline in its own format), data/plots/train/steps.csv
(loss, learning rate and step time per step) and data/metrics/train.json.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from stages.common import checkpoint
from stages.common.artifacts import atomic_dir, read_json, write_params
from stages.common.errors import StageError
from stages.common.memory import current_rss_mib
from stages.common.meter import TensorMeter
from stages.common.models import TOKENIZER_FILES, ModelParams, build_model, count_parameters, logits_of
from stages.common.params import BaseParams, Section
from stages.common.pruning import Pruner, PruneParams, zero_fraction
from stages.common.stage import stage_main

log = logging.getLogger("lmmem.train")

# keys PYTORCH_CUDA_ALLOC_CONF understands (torch 2.x CUDA caching allocator)
CUDA_ALLOC_KEYS = ("backend", "max_split_size_mb", "max_non_split_rounding_mb", "roundup_power2_divisions",
                   "garbage_collection_threshold", "expandable_segments", "release_lock_on_cudamalloc",
                   "pinned_use_cuda_host_register", "pinned_num_register_threads", "pinned_use_background_threads",
                   "pinned_max_cached_size_mb", "pinned_max_round_threshold_mb", "per_process_memory_fraction",
                   "graph_capture_record_stream_reuse")


class Params(Section):
    model: ModelParams = Field(default_factory=ModelParams)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    micro_batch_size: int = Field(16, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    activation_checkpointing_every: int = Field(1, ge=1)
    optimizer: Literal["sgd", "adam", "adamw", "adagrad", "rmsprop", "adafactor", "adamw8bit",
                       "sparse_adam"] = "adamw"
    lr: float = Field(3e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.1, ge=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    warmup_steps: int = Field(20, ge=0)
    decay: Literal["cosine", "linear", "none"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)
    meter_steps: int = Field(2, ge=0)
    checkpoint_every: int = Field(50, ge=0)
    init_from_word2vec: bool = False
    memory_budget_mib: float = Field(0.0, ge=0.0)
    auto_fit: bool = False
    prune: PruneParams = Field(default_factory=PruneParams)
    cuda_alloc_conf: str = ""
    threads: int = Field(0, ge=0, le=256)

    @model_validator(mode="after")
    def _combinations(self) -> Params:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size}): the effective batch must stay the same")
        if self.activation_checkpointing and self.model.family == "lstm":
            raise ValueError("activation_checkpointing: the lstm baseline runs as one cuDNN/ATen op, "
                             "there are no layers to checkpoint; use llama or gpt2")
        if self.optimizer == "sparse_adam" and self.model.tie_embeddings:
            raise ValueError("optimizer sparse_adam needs model.tie_embeddings: false: a tied embedding is "
                             "also the output layer, whose gradient is dense")
        if self.prune.enabled and self.prune.end_step >= self.steps:
            raise ValueError(f"prune.end_step ({self.prune.end_step}) must be below steps ({self.steps}): "
                             f"the final sparsity would never be reached")
        for item in filter(None, self.cuda_alloc_conf.split(",")):
            key, sep, value = item.partition(":")
            if not sep or not value or key.strip() not in CUDA_ALLOC_KEYS:
                raise ValueError(f"cuda_alloc_conf: {item!r} is not key:value with a key of "
                                 f"{', '.join(CUDA_ALLOC_KEYS)}")
        return self


@dataclass(frozen=True)
class Paths:
    tokens: Path = Path("data/tokens")
    embed: Path = Path("data/embed")
    out: Path = Path("data/model")
    plots: Path = Path("data/plots/train")
    checkpoints: Path = Path("data/checkpoints/train")


# ----------------------------------------------------------------------------- data


class Windows:
    """Windows of context + 1 ids from a memory-mapped split (input: the first context ids,
    target: the last context)."""

    def __init__(self, path: Path, dtype: str, context: int) -> None:
        self.ids = np.memmap(path, dtype=dtype, mode="r")
        self.context = context
        if len(self.ids) < context + 2:
            raise StageError(f"{path}: {len(self.ids)} tokens, fewer than train.model.context + 2 "
                             f"({context + 2}); lower the context or use a larger corpus")

    def batch(self, starts: np.ndarray) -> torch.Tensor:
        rows = np.stack([self.ids[s:s + self.context + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows)  # (batch, context + 1)

    def random_starts(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, len(self.ids) - self.context - 1, size=n)

    def fixed_batches(self, n_batches: int, batch: int) -> Iterator[torch.Tensor]:
        """Consecutive non-overlapping windows from the start: the same every evaluation."""
        stride = self.context + 1
        starts = np.arange(0, len(self.ids) - stride + 1, stride)[: n_batches * batch]
        for i in range(0, len(starts), batch):
            yield self.batch(starts[i:i + batch])


# ----------------------------------------------------------------------------- pieces


class SparseDenseAdam(torch.optim.Optimizer):
    """Adam for a model whose input embedding has sparse gradients: SparseAdam updates only
    the embedding rows the batch used (moments of the others are not decayed; no weight
    decay), AdamW everything else. One optimizer to the loop, the scaler and checkpoints:
    both inner optimizers share its parameter groups and state."""

    def __init__(self, dense_groups: list[dict[str, Any]], sparse: list[torch.nn.Parameter], lr: float) -> None:
        self.dense = torch.optim.AdamW(dense_groups, lr=lr)
        self.sparse = torch.optim.SparseAdam(sparse, lr=lr)
        super().__init__(self.dense.param_groups + self.sparse.param_groups, {})
        self._link()

    def _link(self) -> None:
        n = len(self.dense.param_groups)
        self.dense.param_groups, self.sparse.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.dense.state = self.sparse.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()  # loading replaced the groups and state objects

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.dense.step()
        self.sparse.step()


def make_optimizer(params: Params, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer; weight decay applies to matrices only (not norms, biases)."""
    sparse = [model.get_input_embeddings().weight] if params.optimizer == "sparse_adam" else []
    trainable = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in sparse)]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": params.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    lr = params.lr
    match params.optimizer:
        case "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=params.momentum)
        case "adam":
            return torch.optim.Adam(groups, lr=lr)
        case "adamw":
            return torch.optim.AdamW(groups, lr=lr)
        case "adagrad":
            return torch.optim.Adagrad(groups, lr=lr)
        case "rmsprop":
            return torch.optim.RMSprop(groups, lr=lr, momentum=params.momentum)
        case "adafactor":
            return torch.optim.Adafactor(groups, lr=lr)
        case "adamw8bit":
            logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # 4-bit kernels: unused
            import bitsandbytes

            return bitsandbytes.optim.AdamW8bit(groups, lr=lr)
        case "sparse_adam":
            return SparseDenseAdam(groups, sparse, lr)
    raise StageError(f"train.optimizer: unknown optimizer {params.optimizer}")  # pragma: no cover


def clip_gradients(model: torch.nn.Module, max_norm: float) -> None:
    """Scale all gradients so their global L2 norm is at most max_norm. torch's
    clip_grad_norm_ does it when every gradient is dense; a sparse one (sparse_adam's
    embedding) has its norm taken on a coalesced copy, so that repeated rows add up first."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norms = []
    for p in params:
        if p.grad.is_sparse:
            norms.append(torch.linalg.vector_norm(p.grad.coalesce()._values()))
        else:
            norms.append(torch.linalg.vector_norm(p.grad))
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(scale)


def lr_at(step: int, params: Params) -> float:
    """Linear warm-up, then cosine or linear decay to min_lr_ratio × lr at the last step."""
    if step < params.warmup_steps:
        return params.lr * (step + 1) / params.warmup_steps
    if params.decay == "none" or params.steps <= params.warmup_steps:
        return params.lr
    progress = (step - params.warmup_steps) / max(1, params.steps - 1 - params.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if params.decay == "cosine" else 1 - progress
    return params.lr * (params.min_lr_ratio + (1 - params.min_lr_ratio) * shape)


def code_identity() -> dict[str, str]:
    """What the training code is: this module, stages/common, torch and transformers. A
    checkpoint made by other code is not resumed (the stage reruns because the code changed)."""
    import transformers

    here = Path(__file__).resolve().parent
    sources = [here / "train.py", *sorted((here / "common").glob("*.py"))]
    return {"sources": checkpoint.fingerprint(*(f.read_text(encoding="utf-8") for f in sources)),
            "torch": torch.__version__, "transformers": transformers.__version__}


def resolve_device(base: BaseParams) -> torch.device:
    if base.device == "cuda" and not torch.cuda.is_available():
        raise StageError("base.device is cuda but no CUDA device is available (use cpu or auto)")
    if base.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(base.device)


def autocast(params: Params, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if params.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if params.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def next_token_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's next token; rows are (batch, context + 1)."""
    logits = logits_of(model, rows[:, :-1])  # (batch, context, vocab); autocast computes the loss in fp32
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: Windows, params: Params, device: torch.device) -> float:
    """Mean next-token loss on fixed validation windows: eval_batches × batch_size of them,
    the same whatever the micro-batch, run micro_batch_size at a time (its memory bound)."""
    model.eval()
    total, count = 0.0, 0
    for batch in windows.fixed_batches(params.eval_batches, params.batch_size):
        for rows in batch.split(params.micro_batch_size):
            with autocast(params, device):
                loss = next_token_loss(model, rows.to(device))
            total += loss.item() * rows.size(0)
            count += rows.size(0)
    model.train()
    if count == 0:
        raise StageError("the validation split is shorter than one window: lower train.model.context")
    return total / count


# ----------------------------------------------------------------------------- one step


@dataclass
class Parts:
    """What a training run holds: the model, its optimizer, the gradient scaler (a no-op
    unless fp16) and the pruner (None unless pruning)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    pruner: Pruner | None

    def track(self, meter: TensorMeter) -> None:
        meter.track_model(self.model)
        meter.track_optimizer(self.optimizer)
        if self.pruner is not None:
            meter.track(self.pruner.masks, "parameters")  # model state, one byte per prunable weight


def build(params: Params, meta: dict[str, Any], device: torch.device, seed: int, scale: bool = True) -> Parts:
    """Model (seeded), optimizer, gradient scaler and pruner as the params ask."""
    torch.manual_seed(seed)
    with device:  # made where it trains: no copy, and fake tensors cannot be moved
        model = build_model(params.model, meta["vocab_size"], meta["special_ids"])
        pruner = Pruner(params.prune, model) if params.prune.enabled else None
    if params.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=params.activation_checkpointing_every)
    if params.optimizer == "sparse_adam":
        model.get_input_embeddings().sparse = True  # gradient: only the rows the batch used
    model.train()
    optimizer = make_optimizer(params, model)
    scaler = torch.amp.GradScaler(device.type, enabled=scale and params.precision == "fp16")
    return Parts(model, optimizer, scaler, pruner)


def init_embedding_from_word2vec(model: torch.nn.Module, aligned: np.ndarray, seed: int) -> None:
    """Copy Word2Vec's vectors (row i = token id i) into the input embedding. A different width
    goes through a fixed random projection; either way rows are rescaled to the standard
    deviation of the embedding they replace, so the rest of the initialisation stays in scale."""
    weight = model.get_input_embeddings().weight
    if aligned.shape[0] != weight.shape[0]:
        raise StageError(f"data/embed/aligned.npy has {aligned.shape[0]} rows for a vocabulary of "
                         f"{weight.shape[0]}: rerun the embed stage on these tokens")
    vectors = torch.from_numpy(aligned).float()
    if vectors.shape[1] != weight.shape[1]:
        g = torch.Generator().manual_seed(seed)
        projection = torch.randn(vectors.shape[1], weight.shape[1], generator=g) / math.sqrt(vectors.shape[1])
        vectors = vectors @ projection
    with torch.no_grad():
        vectors *= weight.std() / vectors.std().clamp_min(1e-12)
        weight.copy_(vectors.to(weight.device, weight.dtype))


def train_step(parts: Parts, rows: torch.Tensor, params: Params, device: torch.device, step: int,
               meter: TensorMeter | None) -> list[torch.Tensor]:
    """One optimizer step over `rows` (batch_size, context + 1), in micro-batches; the meter,
    when given, watches each phase. Returns the micro-batches' (scaled-down) losses."""
    model, optimizer, scaler = parts.model, parts.optimizer, parts.scaler

    def phase(name: str) -> contextlib.AbstractContextManager[Any]:
        return meter.phase(step, name) if meter is not None else contextlib.nullcontext()

    accumulation = params.batch_size // params.micro_batch_size
    losses = []
    for micro in rows.split(params.micro_batch_size):
        with phase("forward"):
            if meter is not None:
                meter.track(micro, "activations")
            with autocast(params, device):
                loss = next_token_loss(model, micro) / accumulation
        with phase("backward"):
            scaler.scale(loss).backward()
        losses.append(loss.detach())
        del loss
    with phase("optimizer"):
        if params.grad_clip:
            scaler.unscale_(optimizer)
            clip_gradients(model, params.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if parts.pruner is not None:
            parts.pruner.after_step(step)
    return losses


class _NeutralScalars(TorchDispatchMode):
    """Fake tensors have no values, yet some optimizers (Adafactor's step size) read a scalar
    out of a tensor. In a dry run those reads get a neutral answer (1 for floats, 0 for
    integers and flags): it steers no allocation. Sizes that depend on values take their
    upper bound, which is also what a real run has here: a boolean mask (the sparse embedding
    gradient drops padding positions with one; training windows hold no padding) selects
    every element, and a sparse tensor keeps all its rows when copied or coalesced (the fake
    kernels would report none)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0 if args[0].dtype.is_floating_point else 0
        if func in (torch.ops.aten.clone.default, torch.ops.aten._coalesce.default) and args[0].is_sparse:
            source = args[0]
            return torch.sparse_coo_tensor(source._indices().clone(), source._values().clone(), source.shape,
                                           is_coalesced=func is torch.ops.aten._coalesce.default)
        if func is torch.ops.aten.sparse_mask.default:  # a dense tensor's rows at a sparse one's indices
            dense, mask = args
            values = dense.new_empty((mask._nnz(), *dense.shape[mask.sparse_dim():]))
            return torch.sparse_coo_tensor(mask._indices().clone(), values, dense.shape, is_coalesced=True)
        if func is torch.ops.aten.index.Tensor:
            source, indices = args
            if len(indices) == 1 and indices[0] is not None and indices[0].dtype == torch.bool:
                mask = indices[0]
                return source.reshape(mask.numel(), *source.shape[mask.dim():]).clone()
        return func(*args, **(kwargs or {}))


def estimate(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    """`python -m stages.train --estimate`: the prediction for params.yaml, without training."""
    return predict_memory(params, read_json(paths.tokens / "meta.json"), resolve_device(base), base.seed)


def predict_memory(params: Params, meta: dict[str, Any], device: torch.device, seed: int) -> dict[str, Any]:
    """Tensor memory by category, predicted before training by a dry run: the configured
    model, optimizer and technique run `max(2, meter_steps)` steps on fake tensors (shapes and
    dtypes, no data, no memory) under the same meter. Exact up to kernels that allocate
    differently on fake inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), _NeutralScalars():
        # without the gradient scaler (a few bytes): its overflow check would need values
        parts = build(params, meta, device, seed, scale=False)
        meter = TensorMeter()
        parts.track(meter)
        for step in range(max(2, params.meter_steps)):
            rows = torch.zeros(params.batch_size, params.model.context + 1, dtype=torch.long, device=device)
            train_step(parts, rows, params, device, step, meter)
            del rows
        meter.close()
    return meter.summary(prefix="est_")


# ----------------------------------------------------------------------------- budget

# Moves that lower memory, with the slowdown each is expected to cost (rules of thumb, roughly
# what bench/train_grid.py measured: bf16 and a leaner optimizer cost about nothing, 8-bit
# AdamW included; each halving of the micro-batch ~10 % from smaller matrix products;
# checkpointing ~30 % from recomputation).
SLOWDOWN = {"precision": 1.0, "optimizer": 1.0, "micro_batch_size": 1.1, "activation_checkpointing": 1.3}


def memory_moves(p: Params) -> list[dict[str, Any]]:
    """The changes that could shrink this configuration, cheapest expected slowdown first."""
    moves: list[dict[str, Any]] = []
    if p.precision == "fp32":
        moves.append({"precision": "bf16"})
    if p.optimizer in ("adam", "adamw"):
        moves.append({"optimizer": "adamw8bit"})  # the same update with 8-bit moments: a quarter of the state
    if p.optimizer in ("adam", "adamw", "adamw8bit", "adagrad", "rmsprop"):
        moves.append({"optimizer": "adafactor"})
    micro = p.micro_batch_size
    while micro > 1 and micro % 2 == 0:
        micro //= 2
        moves.append({"micro_batch_size": micro})
    if not p.activation_checkpointing and p.model.family != "lstm":
        moves.append({"activation_checkpointing": True})
    return sorted(moves, key=lambda m: SLOWDOWN[next(iter(m))])


def describe(changes: dict[str, Any]) -> str:
    return ",".join(f"{k}={str(v).lower()}" for k, v in changes.items()) or "none"


def fit_budget(params: Params, meta: dict[str, Any], device: torch.device, seed: int,
               predicted: dict[str, Any]) -> tuple[Params, dict[str, Any], dict[str, Any]]:
    """Check the dry-run estimate against train.memory_budget_mib. Over budget: with auto_fit,
    apply the moves cumulatively, cheapest first, until the estimate fits, and train with
    that; without, stop with the moves that would fit. Returns (params, prediction, changes)."""
    budget = params.memory_budget_mib
    if not budget or predicted["est_total_peak_mib"] <= budget:
        return params, predicted, {}
    need = f"train.memory_budget_mib={budget:g}: the estimated tensor peak is {predicted['est_total_peak_mib']:.1f} MiB"
    changes: dict[str, Any] = {}
    tried: list[str] = []
    for move in memory_moves(params):
        changes = {**changes, **move}
        candidate = params.model_copy(update=changes)
        estimate_mib = predict_memory(candidate, meta, device, seed)
        tried.append(f"{describe(changes)} {estimate_mib['est_total_peak_mib']:.1f} MiB")
        if estimate_mib["est_total_peak_mib"] <= budget:
            if params.auto_fit:
                log.info("%s; auto_fit trains with %s (%.1f MiB)", need, describe(changes),
                         estimate_mib["est_total_peak_mib"])
                return candidate, estimate_mib, changes
            raise StageError(f"{need}; it fits with {describe(changes)} "
                             f"({estimate_mib['est_total_peak_mib']:.1f} MiB), or set train.auto_fit: true")
    raise StageError(f"{need}; nothing fits: {'; '.join(tried) or 'no memory technique left to apply'}")


# ----------------------------------------------------------------------------- run


def apply_cuda_alloc_conf(conf: str, device: torch.device) -> str:
    """Hand train.cuda_alloc_conf to the CUDA caching allocator (through the environment
    before CUDA starts, through torch once it has); returns the settings in force ("" for
    the defaults), which the metrics record. On CPU nothing is applied."""
    if device.type != "cuda":
        if conf:
            log.info("train.cuda_alloc_conf %r has no effect on %s", conf, device)
        return ""
    if conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
        if torch.cuda.is_initialized():
            torch.cuda.memory._set_allocator_settings(conf)
    return os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")


def run(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    device = resolve_device(base)
    alloc_conf = apply_cuda_alloc_conf(params.cuda_alloc_conf, device)
    if params.threads:
        torch.set_num_threads(params.threads)
    meta = read_json(paths.tokens / "meta.json")
    context = params.model.context
    train_windows = Windows(paths.tokens / "train.bin", meta["dtype"], context)
    val_windows = Windows(paths.tokens / "validation.bin", meta["dtype"], context)

    predicted = predict_memory(params, meta, device, base.seed)
    params, predicted, fitted = fit_budget(params, meta, device, base.seed, predicted)
    parts = build(params, meta, device, base.seed)
    model, optimizer = parts.model, parts.optimizer
    if params.init_from_word2vec:
        init_embedding_from_word2vec(model, np.load(paths.embed / "aligned.npy"), base.seed)
    rng = np.random.default_rng(base.seed)
    accumulation = params.batch_size // params.micro_batch_size
    meter = TensorMeter()
    parts.track(meter)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    records: list[dict[str, Any]] = []
    cuda_peak = cuda_reserved = 0.0
    step_seconds: list[float] = []
    metered_figures: dict[str, Any] = {}
    identity = checkpoint.fingerprint(base, params, meta, checkpoint.file_digest(paths.tokens / "train.bin"), code_identity())
    start = 0
    resumed = checkpoint.load(paths.checkpoints, identity, model, optimizer, parts.scaler)
    if resumed is not None:
        start = resumed["step"] + 1
        records, metered_figures = resumed["records"], resumed["metered"]
        rng.bit_generator.state = resumed["rng"]
        if parts.pruner is not None:
            parts.pruner.restore(resumed["extra"], resumed["sparsity"])
    if start >= params.meter_steps:
        meter.close()  # nothing left to meter
    bar = tqdm(range(start, params.steps), desc="train", unit=" steps", mininterval=2, initial=start,
               total=params.steps)
    for step in bar:
        metered = step < params.meter_steps
        started = time.perf_counter()
        lr = lr_at(step, params)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = train_windows.batch(train_windows.random_starts(rng, params.batch_size)).to(device)
        losses = train_step(parts, rows, params, device, step, meter if metered else None)
        step_loss = sum(loss.item() for loss in losses)
        del rows
        seconds = time.perf_counter() - started
        if not metered:
            step_seconds.append(seconds)
        if not math.isfinite(step_loss):
            raise StageError(f"the loss became {step_loss} at step {step}: lower train.lr or use fp32/bf16")
        record: dict[str, Any] = {"step": step, "train_loss": step_loss, "lr": lr, "step_ms": seconds * 1000,
                                  "sparsity": parts.pruner.sparsity if parts.pruner is not None else 0.0,
                                  "rss_mib": current_rss_mib()}
        if metered:
            record["tensor_peak_mib"] = meter.step_peaks.get(step, 0) / 2**20
        if device.type == "cuda":  # this step's allocator peak; the run's is the largest of them
            record["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            cuda_peak = max(cuda_peak, record["cuda_peak_mib"])
            cuda_reserved = max(cuda_reserved, torch.cuda.max_memory_reserved(device) / 2**20)
            torch.cuda.reset_peak_memory_stats(device)
        if (step + 1) % params.eval_every == 0 or step + 1 == params.steps:
            record["val_loss"] = evaluate(model, val_windows, params, device)
        records.append(record)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        if step + 1 == params.meter_steps:
            metered_figures = meter.summary()
            meter.close()  # its hooks off: the remaining steps run unobserved
        last = step + 1 == params.steps
        if params.checkpoint_every and step + 1 >= params.meter_steps and \
                ((step + 1) % params.checkpoint_every == 0 or last):
            pruner = parts.pruner
            checkpoint.save(paths.checkpoints, model, optimizer, parts.scaler,
                            {"fingerprint": identity, "step": step, "rng": rng.bit_generator.state,
                             "records": records, "metered": metered_figures,
                             "sparsity": pruner.sparsity if pruner is not None else 0.0},
                            extra=pruner.masks if pruner is not None else None)
    meter.close()

    final_val = records[-1]["val_loss"]  # the last step always evaluates
    timed = step_seconds[1:] or step_seconds  # the first unmetered step warms caches up
    tokens_per_step = params.batch_size * context
    metrics: dict[str, Any] = {
        **count_parameters(model),
        "steps": params.steps, "tokens_seen": params.steps * tokens_per_step,
        "train_loss": statistics.fmean(r["train_loss"] for r in records[-10:]),
        "val_loss": final_val, "val_ppl": math.exp(final_val),
        "accumulation_steps": accumulation,
        "auto_fit_changes": describe(fitted),
        "prune_sparsity": zero_fraction(model),
        "cuda_alloc_conf": alloc_conf,
    }
    if timed:
        median = statistics.median(timed)
        metrics.update({"step_ms_median": median * 1000, "tokens_per_sec": tokens_per_step / median})
    metrics.update(metered_figures)
    metrics.update(predicted)
    for key, value in predicted.items():  # relative error of the prediction, per category
        measured = metered_figures.get(key.replace("est_", "mem_", 1))
        if key.endswith("_peak_mib") and measured:
            metrics[key.replace("est_", "est_error_", 1)] = (value - measured) / measured
    if device.type == "cuda":
        metrics["cuda_max_allocated_mib"] = max(cuda_peak, torch.cuda.max_memory_allocated(device) / 2**20)
        metrics["cuda_max_reserved_mib"] = max(cuda_reserved, torch.cuda.max_memory_reserved(device) / 2**20)

    if hasattr(model, "generation_config"):  # trained without a KV cache; generation wants one
        model.config.use_cache = model.generation_config.use_cache = True
    with atomic_dir(paths.out) as tmp:
        model.save_pretrained(str(tmp))
        for name in TOKENIZER_FILES:
            shutil.copy(paths.tokens / name, tmp / name)
        write_params(tmp, base=base, train=params)
        metrics["size_on_disk_mib"] = sum(f.stat().st_size for f in tmp.iterdir()
                                          if f.suffix == ".safetensors") / 2**20
    with atomic_dir(paths.plots) as tmp:
        with (tmp / "steps.csv").open("w", newline="") as f:
            fields = ["step", "train_loss", "val_loss", "lr", "step_ms", "sparsity", "rss_mib", "tensor_peak_mib"]
            writer = csv.DictWriter(f, fieldnames=fields + (["cuda_peak_mib"] if device.type == "cuda" else []))
            writer.writeheader()
            for r in records:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    log.info("trained %d steps: val loss %.4f (ppl %.1f), %s tokens/s", params.steps, final_val,
             math.exp(final_val), f"{metrics.get('tokens_per_sec', 0):.0f}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("train", Params, Paths, run, argv, doc=__doc__, estimate=estimate)


if __name__ == "__main__":
    raise SystemExit(main())
