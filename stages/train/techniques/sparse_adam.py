"""Sparse embedding gradients: the input embedding's gradient holds only the rows the batch
used (values + int64 indices) instead of the whole vocabulary × width matrix; SparseAdam
updates those rows and AdamW everything else. A tied embedding is also the output layer,
whose gradient is dense, so the embeddings must be untied."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stages.common.modelling.optim import param_groups
from stages.train.distributed import Context
from stages.train.techniques.base import State, Technique, trainable


class SparseDenseAdam(torch.optim.Optimizer):
    """Adam for a model whose input embedding has sparse gradients: SparseAdam updates only
    the embedding rows the batch used (moments of the others are not decayed; no weight
    decay), AdamW everything else. One optimizer to the loop, the scaler and checkpoints:
    both inner optimizers share its parameter groups and state."""

    def __init__(self, dense_groups: list[dict[str, Any]], sparse: list[torch.nn.Parameter],
                 lr: float) -> None:
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


class SparseUpperBound(TorchDispatchMode):
    """The dry run of sparse gradients: sizes that depend on values take their upper bound,
    which is also what a real run has here. The embedding's backward drops padding positions
    with a boolean mask, which selects every element (training windows hold no padding), and
    a sparse tensor keeps all its rows when copied or coalesced (the fake kernels would
    report none), and a gradient accumulated over micro-batches holds the rows of each (as
    the CPU's in-place sparse add does; the fake one keeps the first's)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.add_.Tensor and args[0].is_sparse and args[1].is_sparse:
            total, more = args[0], args[1]
            both = torch.sparse_coo_tensor(torch.cat([total._indices(), more._indices()], 1),
                                           torch.cat([total._values(), more._values()]), total.shape)
            return torch.ops.aten.copy_sparse_to_sparse_(total, both)
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


class SparseAdamTechnique(Technique):
    name = "sparse_adam"
    optimizers = ("sparse_adam",)
    grid = {"untied embeddings, adamw": {"model": {"tie_embeddings": False}},
            "untied, sparse embedding gradients (sparse_adam)": {"optimizer": "sparse_adam",
                                                                 "model": {"tie_embeddings": False}}}

    def refuse(self, p: Any) -> str | None:
        if p.optimizer != "sparse_adam":
            return None
        if p.model.tie_embeddings:
            return ("optimizer sparse_adam needs model.tie_embeddings: false: a tied embedding is "
                    "also the output layer, whose gradient is dense")
        if p.distributed.world_size > 1:
            return "optimizer sparse_adam cannot be distributed: DDP reduces dense gradients only"
        return None

    def prepare(self, model: torch.nn.Module, p: Any, device: torch.device) -> State | None:
        if p.optimizer == "sparse_adam":
            model.get_input_embeddings().sparse = True  # gradient: only the rows the batch used
        return None

    def dry_run_modes(self, p: Any) -> list[TorchDispatchMode]:
        return [SparseUpperBound()] if p.optimizer == "sparse_adam" else []

    def make_optimizer(self, p: Any, model: torch.nn.Module, ctx: Context,
                       dry_run: bool) -> torch.optim.Optimizer:
        sparse = model.get_input_embeddings().weight
        return SparseDenseAdam(param_groups(trainable(model, exclude=(sparse,)), p.weight_decay), [sparse],
                               p.lr)


TECHNIQUE = SparseAdamTechnique()
