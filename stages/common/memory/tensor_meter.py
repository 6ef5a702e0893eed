"""The tensor memory meter: live tensor bytes by category, counted exactly from every storage.

Why it is built this way: docs/design-notes.md, `stages.common.memory.tensor_meter`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from stages.common.core.schema import CATEGORIES, mem_key

_METERS: weakref.WeakSet[TensorMeter] = weakref.WeakSet()  # open meters, told of storage resizes
_RESIZE = torch.UntypedStorage.resize_


def _resize(storage: torch.UntypedStorage, size: int) -> Any:
    """UntypedStorage.resize_, and each open meter told. FSDP frees a gathered parameter by
    resizing its storage to 0 bytes and gathers it again into the same storage: the storage
    lives on, its bytes do not (no tensor operation is dispatched for either)."""
    out = _RESIZE(storage, size)
    for meter in list(_METERS):
        meter._resized(storage)
    return out


PHASE_CATEGORY = {"forward": "activations", "backward": "temporaries", "optimizer": "optimizer",
                  "setup": "activations"}


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    if not isinstance(t, torch.Tensor) or t.is_meta:
        return None
    local = getattr(t, "_local_tensor", None)  # a DTensor (FSDP's shards): this rank's part
    if local is not None:
        t = local
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


def _tensors_of(obj: Any) -> Iterable[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.is_sparse:
                yield leaf._indices()
                yield leaf._values()
            else:
                yield leaf


@dataclass
class Peak:
    """The largest total seen, with the category figures and the moment it happened."""

    total: int = 0
    by_category: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    step: int = -1
    phase: str = ""


class TensorMeter(TorchDispatchMode):
    """Counts live tensor storage by category. Use `with meter.phase(step, "forward"): ...`."""

    def __init__(self, categories: tuple[str, ...] = CATEGORIES) -> None:
        super().__init__()
        self.categories = categories
        self._live: dict[int, tuple[weakref.ref[Any], int, str]] = {}  # id(storage) -> (ref, bytes, category)
        self.current: dict[str, int] = dict.fromkeys(categories, 0)
        self.category_peaks: dict[str, int] = dict.fromkeys(categories, 0)
        self.peak = Peak(by_category=dict.fromkeys(categories, 0))
        self.step_peaks: dict[int, int] = {}  # step -> the largest total during it
        self.step = -1
        self.phase_name = "setup"
        self._hooks: list[Any] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._state_seen: dict[int, weakref.ref[torch.Tensor]] = {}  # optimizer state tensors already counted
        self.observer: Any = None  # told of each storage and op (stages.common.memory.timeline)
        self._buckets_out = False  # an unseen `out=` storage is a DDP gradient bucket (track_model)
        self.largest_gradient = 0  # bytes of the largest gradient autograd accumulated
        _METERS.add(self)
        torch.UntypedStorage.resize_ = _resize  # type: ignore[method-assign]

    # ------------------------------------------------------------------ bookkeeping
    def _add(self, storage: torch.UntypedStorage, category: str) -> None:
        key = id(storage)
        if key in self._live:
            return
        size = storage.nbytes()

        def _freed(_: Any, key: int = key) -> None:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.current[entry[2]] -= entry[1]
                if self.observer is not None:
                    self.observer.freed(key, entry[1])

        self._live[key] = (weakref.ref(storage, _freed), size, category)
        self.current[category] += size
        if self.observer is not None:
            self.observer.added(key, size, category)
        self._update_peaks()

    def _move(self, storage: torch.UntypedStorage | None, category: str) -> None:
        """Count a storage in another category (adding it if it was not seen yet)."""
        if storage is None:
            return
        entry = self._live.get(id(storage))
        if entry is None:
            self._add(storage, category)
            return
        ref, size, old = entry
        if old != category:
            self.current[old] -= size
            self.current[category] += size
            self._live[id(storage)] = (ref, size, category)
            if self.observer is not None:
                self.observer.moved(id(storage), size, category)
            self._update_peaks()

    def _resized(self, storage: torch.UntypedStorage) -> None:
        """A storage resized in place: its new size counts, in the category of this moment when
        it grows from nothing (a parameter gathered again, or a buffer made empty and filled)."""
        entry = self._live.get(id(storage))
        if entry is None:  # made empty, so never counted (nor freed): counted from now on
            if storage.nbytes() > 0:
                category = PHASE_CATEGORY.get(self.phase_name, "activations")
                self._add(storage, "temporaries" if category == "optimizer" else category)
            return
        ref, old, category = entry
        size = storage.nbytes()
        if old == 0:
            category = PHASE_CATEGORY.get(self.phase_name, "activations")
            category = "temporaries" if category == "optimizer" else category
        self.current[category] += size - old
        self._live[id(storage)] = (ref, size, category)
        if self.observer is not None:
            self.observer.freed(id(storage), old)
            if size:
                self.observer.added(id(storage), size, category)
        self._update_peaks()

    def _update_peaks(self) -> None:
        for cat, value in self.current.items():
            if value > self.category_peaks[cat]:
                self.category_peaks[cat] = value
        total = sum(self.current.values())
        if total > self.step_peaks.get(self.step, 0):
            self.step_peaks[self.step] = total
        if total > self.peak.total:
            self.peak = Peak(total, dict(self.current), self.step, self.phase_name)

    # ------------------------------------------------------------------ wiring
    def track_model(self, model: torch.nn.Module,
                    category_of: Callable[[str,
                                           torch.Tensor], str] = lambda name, tensor: "parameters") -> None:
        """Count the model's parameters and buffers (in `category_of(name, tensor)`), and move
        gradients to `gradients` as autograd accumulates them."""
        for name, p in model.named_parameters():
            self._move(_storage(p), category_of(name, p))
            if p.grad is not None:
                self._move(_storage(p.grad), "gradients")
            if p.requires_grad:
                handle = p.register_post_accumulate_grad_hook(self._grad_hook)
                hooks = getattr(p, "_post_accumulate_grad_hooks", None)
                if hooks is not None:  # first, before a hook that steps the parameter and frees its gradient
                    # (autograd walks the plain dict's order, which move_to_end leaves as it was)
                    for key, hook in [(k, hooks.pop(k)) for k in list(hooks) if k != handle.id]:
                        hooks[key] = hook
                self._hooks.append(handle)
        for name, b in model.named_buffers():
            self._move(_storage(b), category_of(name, b))
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # DDP's gradient buckets are made by its reducer out of the meter's sight: first seen
            # as the `out` its reducer copies each new gradient into (`__torch_dispatch__`), then
            # rebuilt in the second step's forward, before the inner module runs, with the kept
            # gradients pointed at the new ones. Both are gradients.
            self._buckets_out = True
            params = [p for p in model.parameters() if p.requires_grad]
            self._hooks.append(model.module.register_forward_pre_hook(
                lambda module, args: [self._grad_hook(p) for p in params] and None))

    def _grad_hook(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            for t in _tensors_of(p.grad):
                self._move(st := _storage(t), "gradients")
                self.largest_gradient = max(self.largest_gradient, st.nbytes() if st is not None else 0)

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        if isinstance(optimizer, ZeroRedundancyOptimizer):  # the state lives in its inner, local optimizer
            optimizer = optimizer.optim
        self._optimizer = optimizer
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.sync_optimizer()))
        self.sync_optimizer()

    def sync_optimizer(self) -> None:
        """Count the optimizer's state tensors as optimizer state. A tensor already counted is
        recognised by identity without asking for its storage again (on fake tensors that
        question is a dispatch of its own, and this runs before every optimizer op)."""
        if self._optimizer is None:
            return
        for state in self._optimizer.state.values():
            for t in (self._held(state.values()) if isinstance(state, dict) else _tensors_of(state)):
                seen = self._state_seen.get(id(t))
                if seen is not None and seen() is t:
                    continue
                for part in _tensors_of(t):
                    self._move(_storage(part), "optimizer")
                self._state_seen[id(t)] = weakref.ref(t)

    @staticmethod
    def _held(values: Iterable[Any]) -> Iterable[torch.Tensor]:
        """The tensors among a parameter's state values, and those an object there holds in its
        attributes (GaLore's projector keeps its projection matrix so; a parameter such an
        object refers to stays a parameter)."""
        for value in values:
            if isinstance(value, torch.Tensor):
                yield value
            elif hasattr(value, "__dict__") and not isinstance(value, type):
                yield from (t for t in _tensors_of(list(vars(value).values()))
                            if not isinstance(t, torch.nn.Parameter))

    def track(self, obj: Any, category: str) -> None:
        """Count tensors made before the meter started (a batch, say) in `category`."""
        for t in _tensors_of(obj):
            self._move(_storage(t), category)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        _METERS.discard(self)
        if not _METERS:
            torch.UntypedStorage.resize_ = _RESIZE  # type: ignore[method-assign]

    # ------------------------------------------------------------------ phases
    def phase(self, step: int, name: str) -> _Phase:
        return _Phase(self, step, name)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        category = PHASE_CATEGORY.get(self.phase_name, "activations")
        if category == "optimizer":  # state made by the last op is in optimizer.state by now
            self.sync_optimizer()
        if self._buckets_out and kwargs and isinstance(kwargs.get("out"), torch.Tensor):
            bucket = _storage(kwargs["out"])
            if bucket is not None and id(bucket) not in self._live:
                self._add(bucket, "gradients")
        out = func(*args, **(kwargs or {}))
        # in the optimizer phase a new storage is a temporary until the optimizer keeps it in its
        # state (exp_avg, ...): the sync before the next op, or after the step, moves it there
        new = "temporaries" if category == "optimizer" else category
        for t in _tensors_of(out):
            st = _storage(t)
            if st is not None and st.nbytes() > 0:
                self._add(st, new)
        if self.observer is not None:
            self.observer.after_op()
        return out

    # ------------------------------------------------------------------ results
    def summary(self, prefix: str = "mem_") -> dict[str, Any]:
        """Flat metrics in MiB: each category's own peak, the total's peak, and the
        categories at the moment of the total's peak, with its step and phase."""
        mib = 2**20
        out: dict[str, Any] = {mem_key(c, prefix): self.category_peaks[c] / mib for c in self.categories}
        out[mem_key("total", prefix)] = self.peak.total / mib
        for c in self.categories:
            out[mem_key(c, prefix, at_peak=True)] = self.peak.by_category[c] / mib
        out[f"{prefix}peak_step"] = self.peak.step
        out[f"{prefix}peak_phase"] = self.peak.phase
        return out


class _Phase:
    """Sets the meter's step and phase for a block, metering only inside it."""

    def __init__(self, meter: TensorMeter, step: int, name: str) -> None:
        self.meter, self.step, self.name = meter, step, name

    def __enter__(self) -> TensorMeter:
        self.meter.step, self.meter.phase_name = self.step, self.name
        self.meter.__enter__()
        return self.meter

    def __exit__(self, *exc: object) -> None:
        self.meter.__exit__(*exc)
