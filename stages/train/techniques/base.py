"""The base of a memory technique (docs/design-notes.md, `stages.train.techniques`): its hooks, its auto-fit
moves, and the state it may keep while training."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stages.common.core.params import Section

if TYPE_CHECKING:
    from stages.train.distributed import Context


@dataclass(frozen=True)
class Move:
    """One auto-fit move: params changes that lower memory, and its cost: the slowdown of a
    step times the perplexity ratio at equal steps, as bench/train_grid measured them (1.0
    when a move changes neither; never below 1: moves are made for memory, not speed)."""

    changes: dict[str, Any]
    cost: float


class State(Protocol):
    """What a technique keeps while training (pruning's masks): counted with the model by
    the meter, saved in checkpoints, reported per step."""

    def tensors(self) -> dict[str, torch.Tensor]: ...

    def after_step(self, step: int) -> None: ...

    def record(self) -> dict[str, float]: ...

    def restore(self, tensors: dict[str, torch.Tensor], record: dict[str, float]) -> None: ...


class Technique:
    """A memory technique (docs/design-notes.md, `stages.train.techniques`). Every hook's default does
    nothing."""

    name: ClassVar[str]
    Fields: ClassVar[type[Section] | None] = None
    optimizers: ClassVar[tuple[str, ...]] = ()  # the train.optimizer values this family provides
    columns: ClassVar[dict[str, float]] = {}  # per-step CSV columns it fills, with their value when off
    # bench/train_grid's configurations: name -> train overrides
    grid: ClassVar[dict[str, dict[str, Any]]] = {}

    def refuse(self, p: Any) -> str | None:
        """Why these params cannot run with this technique, or None."""
        return None

    def world_problem(self, p: Any, world: int) -> str | None:
        """Why these params cannot run on `world` ranks (known once the ranks start: torchrun's
        world may not be the params'), or None."""
        return None

    def no_checkpoints(self, p: Any, ctx: Context) -> str | None:
        """Why a run with this technique saves no resume checkpoints (said once), or None."""
        return None

    def rows_at_once(self, p: Any) -> int | None:
        """The most rows of a batch one forward and backward hold, or None for no bound (the
        loop, the step and the budget's floor take the smallest any technique sets)."""
        return None

    def weight_shards(self, p: Any) -> int:
        """Over how many ranks each trained weight is split (1: whole on every rank)."""
        return 1

    def flops_factor(self, p: Any) -> float:
        """A step's arithmetic against the same step without this technique (the duration
        estimate multiplies them)."""
        return 1.0

    def start(self, p: Any, device: torch.device) -> dict[str, Any]:
        """Process-wide settings before anything is built; returns figures for the metrics."""
        return {}

    def prepare(self, model: torch.nn.Module, p: Any, device: torch.device) -> State | None:
        """Change the model before it is wrapped and given to the optimizer; a technique that
        keeps state while training returns it."""
        return None

    def forward_context(self, p: Any, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """Entered around each micro-batch's forward pass and loss."""
        return contextlib.nullcontext()

    def gradient_scaler(self, p: Any, device: torch.device, dry_run: bool) -> torch.amp.GradScaler | None:
        return None

    def dry_run_modes(self, p: Any) -> list[TorchDispatchMode]:
        """Dispatch modes the dry run needs for this technique on fake tensors."""
        return []

    def make_optimizer(self, p: Any, model: torch.nn.Module, ctx: Context,
                       dry_run: bool) -> torch.optim.Optimizer:
        """Optimizer families: the optimizer for p.optimizer (one of `optimizers`)."""
        raise NotImplementedError(self.name)

    def wrap_optimizer(self, p: Any, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Change the optimizer once the family has made it (the step fused into backward)."""
        return optimizer

    def moves(self, p: Any) -> list[Move]:
        """Changes that lower this run's memory through this technique, cheapest first."""
        return []

    def metrics(self, p: Any, model: torch.nn.Module, ctx: Context) -> dict[str, Any]:
        """Figures for data/metrics/train.json once trained."""
        return {}


def trainable(model: torch.nn.Module,
              exclude: tuple[torch.nn.Parameter, ...] = ()) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad and all(p is not q for q in exclude)]


def standard_optimizer(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], p: Any,
                       model: torch.nn.Module,
                       ctx: Context, dry_run: bool) -> torch.optim.Optimizer:
    """`cls` over the model's trainable parameters, weight decay on matrices only. Under
    zero1 a ZeroRedundancyOptimizer of it; a dry run builds what this rank's shard holds."""
    from stages.common.modelling.optim import param_groups
    from stages.train import distributed

    groups = param_groups(trainable(model), p.weight_decay)
    if ctx.strategy == "zero1" and dry_run:
        return cls(distributed.zero_partition(groups, ctx.world)[ctx.rank], **kwargs)
    if ctx.strategy == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **kwargs)
    return cls(groups, **kwargs)
