"""One fine-tuning run: the train package's loop on the task, then the test split's scores
and the outputs (the whole model as its stock class loads it, or peft's adapter and the
model with it merged)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from stages.common.core.artifacts import atomic_dir, size_on_disk, write_params
from stages.common.core.params import BaseParams
from stages.common.modelling.models import TOKENIZER_FILES
from stages.train.build import forward_context
from stages.train.distributed import Context
from stages.train.finish import estimate_errors, write_steps_csv
from stages.train.launch import resolve_device
from stages.train.loop import Trained, run_loop
from stages.train.params import Paths as TrainPaths
from stages.train.techniques import REGISTRY
from stages.train.techniques.tune import HEADS

log = logging.getLogger("lmmem.finetune")


def finetune(p: Any, paths: Any, base: BaseParams, task: Any) -> dict[str, Any]:
    """Run `p` on `task` (stages.finetune.tasks), score it, write its outputs to paths.out."""
    device = resolve_device(base)
    meta = task.meta
    train_paths = TrainPaths(tokens=paths.tokens, embed=paths.tokens, out=None, plots=paths.out,
                             checkpoints=paths.out / "checkpoints", writer=paths.stage)
    done = run_loop(p, task, meta, train_paths, base, Context(), device, stage=paths.stage)
    p = done.p
    model = done.parts.raw

    def forward() -> Any:
        return forward_context(p, device)

    test = {**task.test_scores(model, p, device, forward), **task.reference_scores(p, device, forward)}
    metrics = run_metrics(done, test)
    if hasattr(task, "test_classes"):  # the classes the test split could score (stages.finetune.tasks)
        metrics["test_classes"] = task.test_classes
    with atomic_dir(paths.out, paths.stage) as tmp:
        if p.tune == "lora":
            metrics.update(save_adapter(model, p, task, paths.tokens, tmp))
        else:
            folder = tmp / task.folder
            model.save_pretrained(str(folder))
            copy_tokenizer(paths.tokens, folder)
            metrics["size_on_disk_mib"] = size_on_disk(folder) / 2**20
        write_params(tmp, base=base, **{paths.stage: p})
        write_steps_csv(tmp / "steps.csv", done.progress.records, device, timings=False)  # a cached output
    log.info("%s %d steps (%s): %s", paths.stage, p.steps, p.tune, task.summary(metrics))
    return metrics


def run_metrics(done: Trained, test: dict[str, Any]) -> dict[str, Any]:
    p, progress = done.p, done.progress
    records = progress.records
    metrics: dict[str, Any] = {**weight_counts(done.parts.raw), **done.extra, "steps": p.steps,
                               "tune": p.tune, "frozen_weights": p.frozen_weights,
                               "train_loss": statistics.fmean(r["train_loss"] for r in records[-10:]),
                               **{k: v for k, v in records[-1].items() if k.startswith("val_")}}
    for technique in REGISTRY:
        metrics.update(technique.metrics(p, done.parts.raw, Context()))
    timed = progress.step_seconds[1:] or progress.step_seconds
    if timed:
        median = statistics.median(timed)
        metrics.update({"step_ms_median": median * 1000, "docs_per_sec": p.batch_size / median})
    metrics.update(progress.metered[0])
    metrics.update(done.predicted)
    metrics.update(estimate_errors(metrics, done.predicted))
    metrics.update(test)
    assert math.isfinite(metrics["val_loss"])
    return metrics


def weight_counts(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable weights (adapters among them) and the frozen ones' bytes, quantized or not."""
    params = dict(model.named_parameters())
    trainable = sum(q.numel() for q in params.values() if q.requires_grad)
    adapters = sum(q.numel() for n, q in params.items() if "lora_" in n)
    frozen = [q for q in params.values() if not q.requires_grad] + list(model.buffers())
    return {"params_trainable": trainable, "params_adapters": adapters,
            "frozen_mib": sum(q.numel() * q.element_size() for q in frozen) / 2**20}


def copy_tokenizer(tokens: Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(tokens / name, folder / name)


def save_adapter(model: torch.nn.Module, p: Any, task: Any, tokens: Path, out: Path) -> dict[str, Any]:
    """The trained adapters (and head, if the task has one) in peft's format (`adapter/`, over
    the task's stock model made from data/model), and that model with them merged in
    (`merged/`, peft's merge_and_unload)."""
    from peft import LoraConfig, get_peft_model

    stock = task.stock_model()
    heads = [name for name, _ in stock.named_children() if name in HEADS]
    config = LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                        target_modules=list(p.lora_targets), bias="none", task_type=task.peft_task,
                        modules_to_save=heads or None)
    peft_model = get_peft_model(stock, config)
    def plain(name: str) -> str:  # a parameter's name without peft's adapter and wrapper parts
        return name.removeprefix("base_model.model.").replace(".default", "").replace(".modules_to_save", "")

    trained = {plain(name): q for name, q in model.named_parameters() if q.requires_grad}
    copied = 0
    with torch.no_grad():
        for name, q in peft_model.named_parameters():
            if not q.requires_grad:
                continue
            key = plain(name)
            if key not in trained:
                raise RuntimeError(f"peft's {name} has no trained counterpart ({key})")
            q.copy_(trained[key])
            copied += 1
    adapter = out / "adapter"
    peft_model.peft_config["default"].base_model_name_or_path = str(task.model_folder)
    peft_model.save_pretrained(str(adapter))
    (adapter / "README.md").unlink(missing_ok=True)  # peft's model-card template: nothing of this run
    sort_target_modules(adapter / "adapter_config.json")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(out / "merged"))
    copy_tokenizer(tokens, out / "merged")
    return {"adapter_tensors": copied, "adapter_size_mib": size_on_disk(adapter) / 2**20,
            "size_on_disk_mib": size_on_disk(out / "merged") / 2**20}


def sort_target_modules(config: Path) -> None:
    """peft writes target_modules from a set, in the order of that process's string hashes
    (PYTHONHASHSEED): sorted, the same bytes from every run. The JSON as peft writes it."""
    data = json.loads(config.read_text(encoding="utf-8"))
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        config.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
