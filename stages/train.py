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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from stages.common import checkpoint, distributed
from stages.common.artifacts import atomic_dir, read_json, write_params
from stages.common.distributed import Context, DistributedParams
from stages.common.errors import StageError
from stages.common.memory import current_rss_mib, peak_rss_mib, reset_peak_rss
from stages.common.meter import CATEGORIES, TensorMeter
from stages.common.models import TOKENIZER_FILES, ModelParams, build_model, count_parameters, logits_of
from stages.common.params import BaseParams, Section
from stages.common.pruning import Pruner, PruneParams, zero_fraction
from stages.common.stage import seed_everything, setup_logging, stage_main

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
    distributed: DistributedParams = Field(default_factory=DistributedParams)

    @model_validator(mode="after")
    def _combinations(self) -> Params:
        self._distributed_combinations()
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

    def _distributed_combinations(self) -> None:
        d = self.distributed
        world = d.world_size
        if world == 1:
            return
        if (problem := batch_split_problem(self, world)) is not None:
            raise ValueError(problem)
        if self.optimizer == "sparse_adam":
            raise ValueError("optimizer sparse_adam cannot be distributed: DDP reduces dense gradients only")
        if d.strategy == "fsdp" and self.prune.enabled:
            raise ValueError("distributed.strategy fsdp shards the weights that prune masks; prune with ddp or zero1")
        if d.strategy == "fsdp" and self.precision == "fp16":
            raise ValueError("distributed.strategy fsdp: fp16's gradient scaler cannot see sharded gradients; "
                             "use bf16")


def batch_split_problem(params: Params, world: int) -> str | None:
    """Why `world` ranks cannot share each batch in whole micro-batches, or None."""
    if params.batch_size % (world * params.micro_batch_size) == 0:
        return None
    return (f"batch_size ({params.batch_size}) must be a multiple of distributed.nproc x nnodes x "
            f"micro_batch_size ({world} x {params.micro_batch_size}): each rank takes an equal share of the "
            f"batch in whole micro-batches")


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


def optimizer_class(params: Params) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer's class and keyword arguments (sparse_adam aside: see make_optimizer)."""
    lr = params.lr
    match params.optimizer:
        case "sgd":
            return torch.optim.SGD, {"lr": lr, "momentum": params.momentum}
        case "adam":
            return torch.optim.Adam, {"lr": lr}
        case "adamw":
            return torch.optim.AdamW, {"lr": lr}
        case "adagrad":
            return torch.optim.Adagrad, {"lr": lr}
        case "rmsprop":
            return torch.optim.RMSprop, {"lr": lr, "momentum": params.momentum}
        case "adafactor":
            return torch.optim.Adafactor, {"lr": lr}
        case "adamw8bit":
            logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # 4-bit kernels: unused
            import bitsandbytes

            return bitsandbytes.optim.AdamW8bit, {"lr": lr}
    raise StageError(f"train.optimizer: unknown optimizer {params.optimizer}")  # pragma: no cover


def make_optimizer(params: Params, model: torch.nn.Module, ctx: Context = Context(),
                   dry_run: bool = False) -> torch.optim.Optimizer:
    """The optimizer; weight decay applies to matrices only (not norms, biases). Under zero1
    it is a ZeroRedundancyOptimizer; a dry run builds what this rank's shard of it holds."""
    sparse = [model.get_input_embeddings().weight] if params.optimizer == "sparse_adam" else []
    trainable = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in sparse)]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": params.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if params.optimizer == "sparse_adam":
        return SparseDenseAdam(groups, sparse, params.lr)
    cls, kwargs = optimizer_class(params)
    if ctx.strategy == "zero1" and dry_run:
        return cls(distributed.zero_partition(groups, ctx.world)[ctx.rank], **kwargs)
    if ctx.strategy == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **kwargs)
    return cls(groups, **kwargs)


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
    """What a training run holds: the model (wrapped by the distributed strategy, if any),
    its optimizer, the gradient scaler (a no-op unless fp16) and the pruner (None unless
    pruning). `raw` is the model without DDP's wrapper (FSDP shards the model in place, so
    there it is the model itself: what evaluation runs and rank 0 saves). `keep_grads`: gradients stay
    allocated between steps (DDP's gradient buckets)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    pruner: Pruner | None
    raw: torch.nn.Module
    keep_grads: bool = False

    def track(self, meter: TensorMeter) -> None:
        meter.track_model(self.model)
        meter.track_optimizer(self.optimizer)
        if self.pruner is not None:
            meter.track(self.pruner.masks, "parameters")  # model state, one byte per prunable weight


def build(params: Params, meta: dict[str, Any], device: torch.device, seed: int, scale: bool = True,
          ctx: Context = Context(), dry_run: bool = False, word2vec: np.ndarray | None = None) -> Parts:
    """Model (seeded; its input embedding from `word2vec` when given), optimizer, gradient
    scaler and pruner as the params ask, the model wrapped for the distributed strategy (a
    dry run only reshapes what one rank holds)."""
    torch.manual_seed(seed)
    with device:  # made where it trains: no copy, and fake tensors cannot be moved
        model = build_model(params.model, meta["vocab_size"], meta["special_ids"])
    if word2vec is not None:
        init_embedding_from_word2vec(model, word2vec, seed)
    with device:
        pruner = Pruner(params.prune, model) if params.prune.enabled else None
    if params.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=params.activation_checkpointing_every)
    if params.optimizer == "sparse_adam":
        model.get_input_embeddings().sparse = True  # gradient: only the rows the batch used
    model.train()
    raw = model
    if ctx.enabled and not dry_run:
        model = distributed.wrap_model(model, ctx, device)
    optimizer = make_optimizer(params, model, ctx, dry_run)
    scaler = torch.amp.GradScaler(device.type, enabled=scale and params.precision == "fp16")
    # DDP's gradients are views of its buckets: kept between steps (zeroed, not freed), the
    # meter sees them where they live, and a dry run holds them as long
    return Parts(model, optimizer, scaler, pruner, raw, keep_grads=ctx.enabled and ctx.strategy in ("ddp", "zero1"))


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
    """One optimizer step over `rows` (this rank's share of the batch, context + 1), in
    micro-batches; the meter, when given, watches each phase. Returns the micro-batches'
    (scaled-down) losses. Distributed, DDP averages the gradients over the ranks on the
    last micro-batch: the update is the one a single process makes on the whole batch."""
    model, optimizer, scaler = parts.model, parts.optimizer, parts.scaler

    def phase(name: str) -> contextlib.AbstractContextManager[Any]:
        return meter.phase(step, name) if meter is not None else contextlib.nullcontext()

    micros = rows.split(params.micro_batch_size)
    losses = []
    for i, micro in enumerate(micros):
        with distributed.no_sync(model, last=i + 1 == len(micros)):
            with phase("forward"):
                if meter is not None:
                    meter.track(micro, "activations")
                with autocast(params, device):
                    loss = next_token_loss(model, micro) / len(micros)
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
        optimizer.zero_grad(set_to_none=not parts.keep_grads)
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


def dry_run(params: Params, meta: dict[str, Any], device: torch.device, seed: int, ctx: Context = Context(),
            batch: int = 0) -> dict[str, Any]:
    """Tensor memory by category, predicted before training: the configured model, optimizer
    and technique run `max(2, meter_steps)` steps of `batch` windows (default batch_size) on
    fake tensors (shapes and dtypes, no data, no memory) under the same meter. Exact up to
    kernels that allocate differently on fake inputs. `ctx` reshapes it to one rank of a
    distributed run (see `predict_memory`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), _NeutralScalars():
        # without the gradient scaler (a few bytes): its overflow check would need values
        parts = build(params, meta, device, seed, scale=False, ctx=ctx, dry_run=True)
        meter = TensorMeter()
        parts.track(meter)
        for step in range(max(2, params.meter_steps)):
            rows = torch.zeros(batch or params.batch_size, params.model.context + 1, dtype=torch.long, device=device)
            train_step(parts, rows, params, device, step, meter)
            del rows
        meter.close()
    return meter.summary(prefix="est_")


def predict_memory(params: Params, meta: dict[str, Any], device: torch.device, seed: int) -> dict[str, Any]:
    """The dry run's prediction; distributed, per rank (the largest rank's figures as est_*,
    every rank's total and optimizer state as rank<r>_est_*). Each rank trains on
    batch_size / ranks windows. ddp: gradients stay allocated between steps (DDP's
    buckets). zero1: besides, the optimizer holds the state of this rank's ZeRO partition
    only. fsdp: ZeRO stage 3's formula on the one-rank dry run (`fsdp_estimate`)."""
    d = params.distributed
    if d.world_size == 1:
        return dry_run(params, meta, device, seed)
    world, local = d.world_size, params.batch_size // d.world_size
    ddp = dry_run(params, meta, device, seed, Context(0, world, 0, "ddp"), local)
    if d.strategy == "ddp":
        per_rank = [ddp] * world
    elif d.strategy == "zero1":
        per_rank = [dry_run(params, meta, device, seed, Context(r, world, r, "zero1"), local) for r in range(world)]
    else:
        single = dry_run(params, meta, device, seed, Context(), local)
        per_rank = [fsdp_estimate(single, params, meta, world)] * world
    out = dict(max(per_rank, key=lambda e: e["est_total_peak_mib"]))
    for rank, e in enumerate(per_rank):
        for cat in ("total", "optimizer", "gradients", "parameters"):
            out[f"rank{rank}_est_{cat}_peak_mib"] = e[f"est_{cat}_peak_mib"]
    out["dist_ddp_est_total_peak_mib"] = ddp["est_total_peak_mib"]
    return out


def fsdp_estimate(single: dict[str, Any], params: Params, meta: dict[str, Any], world: int) -> dict[str, Any]:
    """One FSDP rank from a one-rank dry run: parameters, gradients and optimizer state
    divided by the ranks (ZeRO stage 3), plus what is gathered whole at a time: the root
    unit (embeddings, final norm, head) through forward and backward, and two blocks (the
    one computing and the one prefetched), less this rank's own shard of them."""
    with torch.device("meta"):
        model = build_model(params.model, meta["vocab_size"], meta["special_ids"])
    blocks = distributed.block_classes(model)
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.nbytes for p in unique.values())
    block_bytes = [sum(p.nbytes for p in m.parameters()) for m in model.modules() if blocks and isinstance(m, blocks)]
    root = total - sum(block_bytes)
    gathered = (root + 2 * max(block_bytes, default=0)) * (world - 1) / world / 2**20
    out = dict(single)
    for cat in ("parameters", "gradients", "optimizer"):
        out[f"est_{cat}_peak_mib"] = single[f"est_{cat}_peak_mib"] / world
        out[f"est_at_peak_{cat}_mib"] = single[f"est_at_peak_{cat}_mib"] / world
    out["est_temporaries_peak_mib"] = single["est_temporaries_peak_mib"] + gathered
    out["est_at_peak_temporaries_mib"] = single["est_at_peak_temporaries_mib"] + gathered
    out["est_total_peak_mib"] = sum(out[f"est_at_peak_{cat}_mib"] for cat in CATEGORIES)
    return out


# ----------------------------------------------------------------------------- budget

# Moves that lower memory, with the slowdown each is expected to cost (rules of thumb, roughly
# what bench/train_grid.py measured: bf16 and a leaner optimizer cost about nothing, 8-bit
# AdamW included; each halving of the micro-batch ~10 % from smaller matrix products;
# checkpointing ~30 % from recomputation). Sharding across ranks changes no number of the run,
# only what is communicated, so it is tried first.
SLOWDOWN = {"distributed.strategy": 1.0, "precision": 1.0, "optimizer": 1.0, "micro_batch_size": 1.1,
            "activation_checkpointing": 1.3}
STRATEGIES = ("ddp", "zero1", "fsdp")  # each shards more than the one before


def memory_moves(p: Params) -> list[dict[str, Any]]:
    """The changes that could shrink this configuration, cheapest expected slowdown first."""
    moves: list[dict[str, Any]] = []
    if p.distributed.world_size > 1:
        for strategy in STRATEGIES[STRATEGIES.index(p.distributed.strategy) + 1:]:
            if strategy != "fsdp" or not (p.prune.enabled or p.precision == "fp16"):
                moves.append({"distributed.strategy": strategy})
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


def apply_moves(p: Params, changes: dict[str, Any]) -> Params:
    """params with the moves' changes (`distributed.strategy` inside its section)."""
    strategy = changes.get("distributed.strategy")
    updated = p.model_copy(update={k: v for k, v in changes.items() if k != "distributed.strategy"})
    if strategy is not None:
        updated = updated.model_copy(update={"distributed": p.distributed.model_copy(update={"strategy": strategy})})
    return updated


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
        candidate = apply_moves(params, changes)
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


def run(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any] | None:
    """Train here, or (train.distributed over several processes) launch the workers that do
    and return rank 0's metrics; None on a node without rank 0, which writes nothing."""
    dp = params.distributed
    if distributed.in_worker():  # started by torchrun: one rank of its run
        with distributed.process_group(dp, resolve_device(base).type) as ctx:
            return train(params, paths, base, ctx)
    if dp.world_size == 1:
        return train(params, paths, base, Context())
    if resolve_device(base).type == "cuda" and dp.nproc > torch.cuda.device_count():
        raise StageError(f"train.distributed.nproc is {dp.nproc} but this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s): one process per GPU")
    results = distributed.launch(dp, _worker, params, paths, base, logging.getLogger().level)
    for result in results.values():
        if isinstance(result, str):  # a StageError on every rank: the same line
            raise StageError(result)
    if 0 not in results:
        log.info("ranks %s done; the node with rank 0 writes the model and metrics", sorted(results))
        return None
    return results[0]


def _worker(params: Params, paths: Paths, base: BaseParams, log_level: int) -> dict[str, Any] | str | None:
    """One rank, in a process of torch's elastic launcher: the metrics on rank 0, None on the
    others, a StageError's message as a string."""
    setup_logging(logging.getLevelName(log_level))
    reset_peak_rss()
    seed_everything(base.seed)
    try:
        with distributed.process_group(params.distributed, resolve_device(base).type) as ctx:
            return train(params, paths, base, ctx)
    except StageError as exc:
        return str(exc)


def rank_device(base: BaseParams, ctx: Context) -> torch.device:
    device = resolve_device(base)
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" and ctx.enabled else device


def train(params: Params, paths: Paths, base: BaseParams, ctx: Context) -> dict[str, Any] | None:
    """The training run of one process (one rank of `ctx`); the metrics on rank 0."""
    device = rank_device(base, ctx)
    alloc_conf = apply_cuda_alloc_conf(params.cuda_alloc_conf, device)
    if params.threads:
        torch.set_num_threads(params.threads)
    meta = read_json(paths.tokens / "meta.json")
    context = params.model.context
    train_windows = Windows(paths.tokens / "train.bin", meta["dtype"], context)
    val_windows = Windows(paths.tokens / "validation.bin", meta["dtype"], context)
    if (problem := batch_split_problem(params, ctx.world)) is not None:  # torchrun's world may not be params'
        raise StageError(f"train: {problem}")
    local = params.batch_size // ctx.world  # this rank's windows of each batch

    shared: tuple[Any, ...] | str | None = None
    if ctx.main:  # the prediction (and what fits the budget) once, for every rank
        try:
            predicted = predict_memory(params, meta, device, base.seed)
            shared = fit_budget(params, meta, device, base.seed, predicted)
        except StageError as exc:  # every rank stops with it, none waits for rank 0
            shared = str(exc)
    shared = ctx.gather(shared)[0]
    if isinstance(shared, str):
        raise StageError(shared)
    params, predicted, fitted = shared
    ctx = replace(ctx, strategy=params.distributed.strategy if ctx.enabled else ctx.strategy)
    word2vec = np.load(paths.embed / "aligned.npy") if params.init_from_word2vec else None
    parts = build(params, meta, device, base.seed, ctx=ctx, word2vec=word2vec)
    model, optimizer = parts.model, parts.optimizer
    rng = np.random.default_rng(base.seed)
    accumulation = local // params.micro_batch_size
    meter = TensorMeter()
    parts.track(meter)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    records: list[dict[str, Any]] = []
    cuda_peak = cuda_reserved = 0.0
    step_seconds: list[float] = []
    metered: list[dict[str, Any]] = [{} for _ in range(ctx.world)]  # each rank's metered figures
    identity = checkpoint.fingerprint(base, params, meta, checkpoint.file_digest(paths.tokens / "train.bin"), code_identity())
    saves = params.checkpoint_every > 0 and ctx.strategy != "fsdp"
    if params.checkpoint_every and not saves:
        log.info("fsdp: no resume checkpoints (the stage saves and resumes ddp, zero1 and one-process runs)")
    start = 0
    resumed = None
    if saves and ctx.agree(checkpoint.peek(paths.checkpoints, identity)):  # every rank resumes, or none
        resumed = checkpoint.load(paths.checkpoints, identity, parts.raw, optimizer, parts.scaler)
    if resumed is not None:
        start = resumed["step"] + 1
        records, metered = resumed["records"], resumed["metered"]
        rng.bit_generator.state = resumed["rng"]
        if parts.pruner is not None:
            parts.pruner.restore(resumed["extra"], resumed["sparsity"])
    if start >= params.meter_steps:
        meter.close()  # nothing left to meter
    bar = tqdm(range(start, params.steps), desc="train", unit=" steps", mininterval=2, initial=start,
               total=params.steps, disable=not ctx.main)
    for step in bar:
        metering = step < params.meter_steps
        started = time.perf_counter()
        lr = lr_at(step, params)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = train_windows.random_starts(rng, params.batch_size)  # the whole batch, the same on every rank
        rows = train_windows.batch(starts[ctx.rank * local:(ctx.rank + 1) * local]).to(device)
        losses = train_step(parts, rows, params, device, step, meter if metering else None)
        step_loss = ctx.mean(sum(loss.item() for loss in losses))
        del rows
        seconds = time.perf_counter() - started
        if not metering:
            step_seconds.append(seconds)
        if not math.isfinite(step_loss):
            raise StageError(f"the loss became {step_loss} at step {step}: lower train.lr or use fp32/bf16")
        record: dict[str, Any] = {"step": step, "train_loss": step_loss, "lr": lr, "step_ms": seconds * 1000,
                                  "sparsity": parts.pruner.sparsity if parts.pruner is not None else 0.0,
                                  "rss_mib": current_rss_mib()}
        if metering:  # the largest rank's
            record["tensor_peak_mib"] = max(ctx.gather(meter.step_peaks.get(step, 0))) / 2**20
        if device.type == "cuda":  # this step's allocator peak; the run's is the largest of them
            record["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            cuda_peak = max(cuda_peak, record["cuda_peak_mib"])
            cuda_reserved = max(cuda_reserved, torch.cuda.max_memory_reserved(device) / 2**20)
            torch.cuda.reset_peak_memory_stats(device)
        if (step + 1) % params.eval_every == 0 or step + 1 == params.steps:
            record["val_loss"] = evaluate(parts.raw, val_windows, params, device)
        records.append(record)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        if step + 1 == params.meter_steps:
            metered = ctx.gather(meter.summary())
            meter.close()  # its hooks off: the remaining steps run unobserved
        last = step + 1 == params.steps
        if saves and step + 1 >= params.meter_steps and ((step + 1) % params.checkpoint_every == 0 or last):
            if ctx.strategy == "zero1":
                optimizer.consolidate_state_dict(to=0)  # every rank sends its shard of the state
            if ctx.main:
                pruner = parts.pruner
                checkpoint.save(paths.checkpoints, parts.raw, optimizer, parts.scaler,
                                {"fingerprint": identity, "step": step, "rng": rng.bit_generator.state,
                                 "records": records, "metered": metered,
                                 "sparsity": pruner.sparsity if pruner is not None else 0.0},
                                extra=pruner.masks if pruner is not None else None)
    meter.close()

    timed = step_seconds[1:] or step_seconds  # the first unmetered step warms caches up
    cuda_figures = {}
    if device.type == "cuda":
        cuda_figures = {"cuda_max_allocated_mib": max(cuda_peak, torch.cuda.max_memory_allocated(device) / 2**20),
                        "cuda_max_reserved_mib": max(cuda_reserved, torch.cuda.max_memory_reserved(device) / 2**20)}
    ranks = [{**m, **rest} for m, rest in zip(metered, ctx.gather({**cuda_figures, "peak_rss_mib": peak_rss_mib()}),
                                              strict=True)]
    final = full_model(parts, params, meta, ctx)
    if not ctx.main:
        return None

    final_val = records[-1]["val_loss"]  # the last step always evaluates
    tokens_per_step = params.batch_size * context
    metrics: dict[str, Any] = {
        **count_parameters(final),
        "steps": params.steps, "tokens_seen": params.steps * tokens_per_step,
        "train_loss": statistics.fmean(r["train_loss"] for r in records[-10:]),
        "val_loss": final_val, "val_ppl": math.exp(final_val),
        "accumulation_steps": accumulation,
        "auto_fit_changes": describe(fitted),
        "prune_sparsity": zero_fraction(final),
        "cuda_alloc_conf": alloc_conf,
        "dist_strategy": ctx.strategy, "dist_world_size": ctx.world,
    }
    if timed:
        median = statistics.median(timed)
        metrics.update({"step_ms_median": median * 1000, "tokens_per_sec": tokens_per_step / median})
    metrics.update(rank_figures(ranks, predicted))
    metrics.update(predicted)
    for key, value in predicted.items():  # relative error of the prediction, per category
        measured = metrics.get(key.replace("est_", "mem_", 1))
        if key.endswith("_peak_mib") and not key.startswith("dist_") and measured:
            metrics[key.replace("est_", "est_error_", 1)] = (value - measured) / measured

    if hasattr(final, "generation_config"):  # trained without a KV cache; generation wants one
        final.config.use_cache = final.generation_config.use_cache = True
    with atomic_dir(paths.out) as tmp:
        final.save_pretrained(str(tmp))
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


def full_model(parts: Parts, params: Params, meta: dict[str, Any], ctx: Context) -> torch.nn.Module:
    """The trained model whole, to save: gathered from FSDP's shards onto rank 0 (a
    collective), the model itself otherwise."""
    if ctx.strategy != "fsdp":
        return parts.raw
    state = distributed.full_state_dict(parts.model)
    if not ctx.main:
        return parts.raw
    with torch.device("cpu"):
        model = build_model(params.model, meta["vocab_size"], meta["special_ids"])
    model.load_state_dict(state)
    return model


def rank_figures(ranks: list[dict[str, Any]], predicted: dict[str, Any]) -> dict[str, Any]:
    """The metered figures of one process, or distributed: every rank's peaks as
    rank<r>_mem_*, the largest rank's as mem_*, and each rank's saving against the
    prediction for ddp (the same run unsharded)."""
    if len(ranks) == 1:
        return ranks[0]
    out: dict[str, Any] = dict(max(ranks, key=lambda r: r.get("mem_total_peak_mib", 0.0)))
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in ranks)
    ddp = predicted.get("dist_ddp_est_total_peak_mib")
    for rank, figures in enumerate(ranks):
        for key, value in figures.items():
            if key.endswith("_mib"):
                out[f"rank{rank}_{key}"] = value
        if ddp and "mem_total_peak_mib" in figures:
            out[f"rank{rank}_saving_vs_ddp"] = 1 - figures["mem_total_peak_mib"] / ddp
    return out


def main(argv: list[str] | None = None) -> int:
    return stage_main("train", Params, Paths, run, argv, doc=__doc__, estimate=estimate)


if __name__ == "__main__":
    raise SystemExit(main())
