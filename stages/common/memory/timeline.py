"""Which module's tensors are alive, moment by moment: the tensor meter's bytes split by the
module whose forward (or backward) made them, sampled each time the work moves on to another
module.

Why it is built this way: docs/design-notes.md, `stages.common.memory.timeline`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._pytree import tree_flatten

NO_MODULE = "(no module)"
CONTAINERS = ("model", "transformer", "base_model", "decoder")  # a wrapper's one child: no group of its own


@dataclass
class Sample:
    step: int
    phase: str
    module: str  # the innermost module running (its group, by="group")
    bytes: dict[str, int]  # group or category -> live bytes, at the largest total since the last sample


def short_name(qualified: str) -> str:
    """`LlamaForCausalLM.model.layers.0.mlp` -> `layers.0.mlp`: the root's class and the
    wrappers (`model`, `transformer`) dropped."""
    parts = qualified.split(".")[1:]
    while len(parts) > 1 and parts[0] in CONTAINERS:
        parts = parts[1:]
    return ".".join(parts) or NO_MODULE


def group_of(module: str) -> str:
    """A module's top-level block: `layers.0.mlp.up_proj` -> `layers.0`, `lm_head` -> `lm_head`."""
    match = re.match(r"^([^.]+\.\d+)(\.|$)", module)
    return match.group(1) if match else module.split(".")[0]


class Tracker:
    """The module running now, in forward and in backward, at no cost in memory: global forward
    hooks keep the stack of modules in their forward (a block recomputed in backward under
    activation checkpointing too); in backward, a hook on the autograd node of each module's
    output names the module whose backward starts there (the innermost, where several modules
    end on one node). torch's ModuleTracker does this with multi-gradient hooks, which hold
    gradients until all of a module's arrive: they changed what the meter counted."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.backward = NO_MODULE  # the module whose backward started last
        self.names: dict[int, str] = {}  # id(module) -> its qualified name, the root's class first
        self.claimed: set[int] = set()  # nodes of this forward already named (by the innermost module)
        self.handles: list[Any] = []

    def __enter__(self) -> Tracker:
        self.handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _name(self, module: torch.nn.Module) -> str:
        name = self.names.get(id(module))
        if name is None:  # a root: it and everything below it named from its class
            name = self.names[id(module)] = type(module).__name__
            for child, sub in module.named_modules():
                if child:
                    self.names.setdefault(id(sub), f"{name}.{child}")
        return name

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        # a new forward from the top, not a recompute
        if not self.stack and torch._C._current_graph_task_id() == -1:
            self.claimed.clear()
            self.backward = NO_MODULE
        self.stack.append(self._name(module))

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        name = self.stack.pop() if self.stack else self._name(module)
        for leaf in tree_flatten(output)[0]:
            node = getattr(leaf, "grad_fn", None) if isinstance(leaf, torch.Tensor) else None
            if node is not None and id(node) not in self.claimed:
                self.claimed.add(id(node))
                node.register_prehook(self._entering(name))

    def _entering(self, name: str) -> Any:
        def hook(grad_outputs: Any) -> None:
            self.backward = name

        return hook


class ModuleTimeline:
    """Samples of live bytes per module group and per unattributed category, while the meter
    it watches meters (`with ModuleTimeline(meter, attributed): ...`)."""

    def __init__(self, meter: Any, attributed: tuple[str, ...],
                 by: Literal["module", "group"] = "module") -> None:
        self.meter, self.attributed, self.by = meter, attributed, by
        self.tracker = Tracker()
        self.owner_of: dict[int, str] = {}  # id(storage) -> the group that made it
        self.live: dict[str, int] = {}  # group -> bytes alive
        self.samples: list[Sample] = []
        self.watching = False
        self._names: dict[str, str] = {}  # qualified -> short name

    def __enter__(self) -> ModuleTimeline:
        for key, (_, size, category) in self.meter._live.items():  # made before: a batch, a prompt
            if category in self.attributed:
                self.owner_of[key] = NO_MODULE
                self.live[NO_MODULE] = self.live.get(NO_MODULE, 0) + size
        self.tracker.__enter__()
        self.meter.observer = self
        self.watching = True
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop watching (again, or never started: nothing to do)."""
        if self.watching:
            self.watching = False
            self.meter.observer = None
            self.tracker.__exit__(*exc)

    def module(self) -> str:
        """The innermost module running now, by its short name (outside every module in
        forward: none; in backward: the one whose backward started last)."""
        inner = self.tracker.stack[-1] if self.tracker.stack else (
            self.tracker.backward if self.meter.phase_name == "backward" else None)
        if inner is None or inner == NO_MODULE:
            return NO_MODULE
        name = self._names.get(inner)
        if name is None:
            name = self._names[inner] = short_name(inner)
        return name

    # ------------------------------------------------------------------ the meter's calls
    def added(self, key: int, size: int, category: str) -> None:
        if category in self.attributed:
            group = group_of(self.module())
            self.owner_of[key] = group
            self.live[group] = self.live.get(group, 0) + size

    def freed(self, key: int, size: int) -> None:
        group = self.owner_of.pop(key, None)
        if group is not None:
            self.live[group] -= size

    def moved(self, key: int, size: int, category: str) -> None:
        """A storage counted in another category: it leaves its module (a gradient kept, state
        the optimizer keeps) or joins the one running (a batch counted as an activation)."""
        if category in self.attributed and key not in self.owner_of:
            self.added(key, size, category)
        elif category not in self.attributed and key in self.owner_of:
            self.freed(key, size)

    def after_op(self) -> None:
        where = self.module() if self.by == "module" else group_of(self.module())
        m = self.meter
        figures = {c: v for c, v in m.current.items() if c not in self.attributed}
        figures.update(self.live)
        last = self.samples[-1] if self.samples else None
        if last is None or (last.step, last.phase, last.module) != (m.step, m.phase_name, where):
            self.samples.append(Sample(m.step, m.phase_name, where, figures))
        elif sum(figures.values()) > sum(last.bytes.values()):
            last.bytes = figures

    # ------------------------------------------------------------------ results
    def rows(self, step: int | None = None) -> list[dict[str, Any]]:
        """The samples of `step` (all, None) as rows: sample, step, phase, module, then a
        column per band in MiB (categories first, then groups in the order they appeared;
        absent: 0)."""
        chosen = [s for s in self.samples if step is None or s.step == step]
        bands = list(dict.fromkeys(b for s in chosen for b in s.bytes))
        categories = [b for b in self.meter.categories if b in bands]
        bands = categories + [b for b in bands if b not in categories]
        return [{"sample": i, "step": s.step, "phase": s.phase, "module": s.module,
                 **{f"{b}_mib": s.bytes.get(b, 0) / 2**20 for b in bands}} for i, s in enumerate(chosen)]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """A timeline as CSV, six significant digits (the same run, the same bytes)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows
                                else ["sample", "step", "phase", "module"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
