"""plan: will a model fit these devices, with which stack of memory techniques, and at what
expected cost? Answered for any architecture of the catalog (stages.plan.catalog: GPT-2,
Llama 2 and 3, Qwen2.5, Mistral) or any local transformers config.json, by the training
dry run at real size on fake tensors (stages.plan.dryrun) and the planner's search through
the registry's techniques (stages.plan.planner).

    python -m stages.plan --arch llama-3-8b --workload lora --device-gib 80 --world-size 1 \\
        --batch-size 8 --micro-batch-size 1 --context 4096 --set precision=bf16
    python -m stages.plan --arch path/to/config.json --workload inference --batch-size 16 --context 8192

Why it is built this way: docs/design-notes.md, `stages.plan`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, Section
from stages.common.harness.stage import stage_main

log = logging.getLogger("lmmem.plan")

Workload = Literal["pretrain", "finetune", "lora", "qlora", "inference"]


class Params(Section):
    """The `plan` section."""

    architectures: list[str] = Field(default_factory=lambda: ["llama-3-8b"], min_length=1, description=(
        "catalog names (gpt2, gpt2-xl, llama-2-7b, llama-3-8b, llama-3-70b, qwen2.5-0.5b, qwen2.5-7b, "
        "mistral-7b) or paths of transformers config.json files: each is dry-run at real size (seconds to a "
        "minute a stack)"))
    workloads: list[Workload] = Field(default_factory=lambda: ["pretrain", "qlora", "inference"],
                                      min_length=1,
                                      description="pretrain | finetune (full) | lora | qlora | inference "
                                                  "(KV cache)")
    devices: dict[str, float] = Field(default_factory=lambda: {"small": 24.0, "large": 80.0}, min_length=1,
                                      description="name: memory in GiB of one device (a rank each)")
    batch_size: int = Field(8, ge=1, le=65536, description=(
        "training: sequences per optimizer step over all ranks | inference: sequences decoded at once"))
    micro_batch_size: int = Field(8, ge=1, le=65536,
                                  description="training: the asked micro-batch (moves halve it)")
    context: int = Field(1024, ge=2, le=65536, description="tokens per sequence (inference: held at the end)")
    prompt: int = Field(512, ge=1, le=65535,
                        description="inference: tokens prefilled at once (below context)")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="inference: the weights' and the "
                                                                       "cache's dtype")
    world_size: int = Field(1, ge=1, le=4096, description="training: ranks (one device each)")
    strategy: Literal["ddp", "zero1", "fsdp"] = Field("ddp", description="training: how the ranks shard")
    train: dict[str, Any] = Field(default_factory=lambda: {"precision": "bf16"}, description=(
        "train keys of the asked stack (precision, optimizer, activation_checkpointing, ...): the planner's "
        "start"))
    reserve_mib: float = Field(2048.0, ge=0.0, description=(
        "held back on each device beside the tensors (the CUDA context, the caching allocator's slack)"))
    max_seconds: float = Field(180.0, gt=0.0, le=86400.0, description=(
        "dry-run time per architecture and workload; the stacks not reached are said to be so"))

    @field_validator("architectures")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        from stages.plan.catalog import CATALOG

        for name in names:
            if name not in CATALOG and not name.endswith(".json") and not Path(name).is_dir():
                raise ValueError(f"architecture {name!r}: a catalog name ({', '.join(CATALOG)}) or a "
                                 "config.json path")
        return names

    @field_validator("devices")
    @classmethod
    def _devices(cls, devices: dict[str, float]) -> dict[str, float]:
        for name, gib in devices.items():
            if not re.match(r"^[a-z0-9][a-z0-9-]*$", name) or not 0 < gib <= 65536:
                raise ValueError(f"device {name!r}: {gib} GiB (a name of lowercase letters, digits and "
                                 "dashes; memory above 0 and at most 65536 GiB)")
        return devices

    @model_validator(mode="after")
    def _shape(self) -> Params:
        if any(w != "inference" for w in self.workloads) and self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")
        if "inference" in self.workloads and self.prompt >= self.context:
            raise ValueError(f"prompt ({self.prompt}) must be below context ({self.context})")
        return self


@dataclass(frozen=True)
class Paths:
    out: Path = Path("data/plan")


def key(*parts: str) -> str:
    return "_".join(re.sub(r"[^a-z0-9]+", "_", part.lower()).strip("_") for part in parts)


def question(p: Params, arch: Any, workload: str) -> Any:
    """The question of `arch` and `workload` (one line if no run could answer it)."""
    from stages.plan.dryrun import Question

    return Question(arch, workload, p.batch_size, p.micro_batch_size, p.context, p.world_size, p.strategy,
                    dict(p.train), p.prompt, p.dtype)


def flat(plan: dict[str, Any]) -> dict[str, Any]:
    """One plan's figures as flat metrics: per device, whether it fits, the cheapest stack's
    peak and cost, and how many stacks fit."""
    q = plan["question"]
    out: dict[str, Any] = {}
    for device, answer in plan["devices"].items():
        prefix = key(q["architecture"], q["workload"], device)
        best = answer["stacks"][0] if answer["stacks"] else None
        out[f"{prefix}_fits"] = answer["fits"]
        out[f"{prefix}_stacks"] = len(answer["stacks"])
        if best is not None:
            out[f"{prefix}_peak_mib"] = best["peak_mib"]
            out[f"{prefix}_cost"] = best["cost"]
    return out


def run(p: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    from stages.common.core.artifacts import atomic_dir, write_json
    from stages.plan.catalog import architecture
    from stages.plan.planner import plan

    plans, metrics = [], {}
    archs = [architecture(name) for name in p.architectures]  # every name checked before any dry run
    # and every context
    questions = [question(p, arch, workload) for arch in archs for workload in p.workloads]
    for q in questions:
        log.info("%s, %s:", q.arch.name, q.workload)
        found = plan(q, p.devices, p.reserve_mib, p.max_seconds)
        plans.append({**found, "published_parameters": q.arch.published_parameters})
        metrics[f"{key(q.arch.name)}_parameters"] = found["parameters"]
        if q.arch.published_parameters is not None:
            metrics[f"{key(q.arch.name)}_parameters_published"] = q.arch.published_parameters
        metrics.update(flat(found))
    # a cached output: each dry run's seconds (this machine's) left out
    with atomic_dir(paths.out, "plan") as tmp:
        write_json(tmp / "plans.json", [{**found, "tried": [{k: v for k, v in tried.items() if k != "seconds"}
                                                            for tried in found["tried"]]} for found in plans])
    metrics["plans"] = len(plans)
    return metrics


def render(plan: dict[str, Any]) -> str:
    """A plan as the lines a terminal shows."""
    q = plan["question"]
    lines = [(f"{q['architecture']}, {q['workload']}: batch {q['batch_size']} (micro {q['micro_batch_size']})"
              f" x {q['context']} tokens, {q['world_size']} rank(s) {q['strategy']}, "
              f"stack {json.dumps(q['train'])}"),
             f"{'per-rank peak MiB':>18} {'cost':>6}  {'where':<12} stack"]
    for r in plan["tried"]:
        lines.append(f"{r['peak_mib']:>18,.1f} {r['cost']:>6.2f}  {r['phase'] + ' ' + str(r['step']):<12} "
                     f"{r['stack']}")
    for stack, why in plan["failed"].items():
        lines.append(f"{'dry run failed':>18} {'':>6}  {'':<12} {stack}: {why}")
    for device, answer in plan["devices"].items():
        if answer["stacks"]:
            best = answer["stacks"][0]
            lines.append(f"{device} ({answer['device_mib']:,.0f} MiB, {plan['reserve_mib']:,.0f} held "
                         f"back): fits with {best['stack']} ({best['peak_mib']:,.1f} MiB, cost "
                         f"{best['cost']:.2f}); "
                         f"{len(answer['stacks'])} stack(s) fit")
        elif "cannot_fit" in answer:
            lines.append(f"{device} ({answer['device_mib']:,.0f} MiB): cannot fit, {answer['cannot_fit']}")
        else:
            lines.append(f"{device} ({answer['device_mib']:,.0f} MiB): nothing tried fits")
    lines.append(f"cost: {plan['cost_source']}")
    if plan["out_of_time"]:
        lines.append("the time limit (--max-seconds) stopped the search: stacks beyond it were not tried")
    return "\n".join(lines)


def ask(argv: list[str]) -> int:
    """`python -m stages.plan --arch NAME ...`: one plan, printed."""
    import yaml

    parser = argparse.ArgumentParser(prog="python -m stages.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, help="a catalog name or a config.json path")
    parser.add_argument("--workload", default="pretrain")
    parser.add_argument("--device-gib", type=float, action="append", help="a device's memory (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a train key of the stack")
    parser.add_argument("--json", action="store_true", help="the whole plan as JSON")
    parser.add_argument("--metrics", type=Path, help="write its flat figures to this JSON file")
    defaults = Params()
    for name in ("batch_size", "micro_batch_size", "context", "prompt", "world_size", "reserve_mib",
                 "max_seconds"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)),
                            default=getattr(defaults, name))
    parser.add_argument("--strategy", default=defaults.strategy)
    parser.add_argument("--dtype", default=defaults.dtype)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        train: dict[str, Any] = {}
        for item in args.set:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise StageError(f"--set {item!r}: KEY=VALUE")
            train[name] = yaml.safe_load(value)
        devices = {f"device-{i}": gib for i, gib in enumerate(args.device_gib or [80.0])}
        from stages.common.core.params import validate_section

        p = validate_section("plan",
                             {"architectures": [args.arch], "workloads": [args.workload], "devices": devices,
                              "train": train, **{k: getattr(args, k) for k in (
                                  "batch_size", "micro_batch_size", "context", "prompt", "world_size",
                                          "strategy", "dtype", "reserve_mib", "max_seconds")}}, Params)
        from stages.plan.catalog import architecture
        from stages.plan.planner import plan

        found = plan(question(p, architecture(args.arch), args.workload), p.devices, p.reserve_mib,
                     p.max_seconds)
    except StageError as exc:
        print(f"lmmem plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(found, indent=2, default=str) if args.json else render(found))
    if args.metrics:
        from stages.common.core.artifacts import write_json

        write_json(args.metrics, flat(found))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--arch" or a.startswith("--arch=") for a in argv):
        return ask(argv)
    return stage_main("plan", Params, Paths, run, argv, doc=__doc__)
