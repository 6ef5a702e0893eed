"""One fine-tuning run: the train package's loop on the task, then the test split's scores
and the outputs (the classifier, or peft's adapter and the merged classifier)."""

from __future__ import annotations

import logging
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from stages.common.artifacts import atomic_dir, size_on_disk, write_params
from stages.common.distributed import Context
from stages.common.models import TOKENIZER_FILES
from stages.common.params import BaseParams
from stages.common.schema import TokensMeta, read_typed
from stages.finetune.tasks import Classification, classifier_config
from stages.train.build import forward_context
from stages.train.finish import estimate_errors, write_steps_csv
from stages.train.launch import resolve_device
from stages.train.loop import Trained, run_loop
from stages.train.params import Paths as TrainPaths
from stages.train.techniques import REGISTRY
from stages.train.techniques.finetuning import HEADS

log = logging.getLogger("lmmem.finetune")


def finetune(p: Any, paths: Any, base: BaseParams) -> dict[str, Any]:
    device = resolve_device(base)
    meta = read_typed(paths.tokens / "meta.json", TokensMeta)
    task = Classification(meta, paths.tokens, paths.model, p.max_tokens)
    train_paths = TrainPaths(tokens=paths.tokens, embed=paths.tokens, out=None, plots=paths.out,
                             checkpoints=paths.out / "checkpoints", writer="finetune")
    done = run_loop(p, task, meta, train_paths, base, Context(), device, stage="finetune")
    p = done.p
    model = done.parts.raw
    test = task.test_scores(model, p, device, lambda: forward_context(p, device))
    metrics = run_metrics(done, task, test)
    with atomic_dir(paths.out, "finetune") as tmp:
        if p.tune == "lora":
            metrics.update(save_adapter(model, p, task, paths.model, paths.tokens, tmp))
        else:
            folder = tmp / "classifier"
            model.save_pretrained(str(folder))
            copy_tokenizer(paths.tokens, folder)
            metrics["size_on_disk_mib"] = size_on_disk(folder) / 2**20
        write_params(tmp, base=base, finetune=p)
        write_steps_csv(tmp / "steps.csv", done.progress.records, device)
    log.info("fine-tuned %d steps (%s): test accuracy %.4f, macro F1 %.4f", p.steps, p.tune, metrics["accuracy"],
             metrics["f1_macro"])
    return metrics


def run_metrics(done: Trained, task: Classification, test: dict[str, Any]) -> dict[str, Any]:
    p, progress = done.p, done.progress
    records = progress.records
    metrics: dict[str, Any] = {**weight_counts(done.parts.raw), **done.extra, "steps": p.steps,
                               "tune": p.tune, "frozen_weights": p.frozen_weights,
                               "train_loss": statistics.fmean(r["train_loss"] for r in records[-10:]),
                               "val_loss": records[-1]["val_loss"], "val_accuracy": records[-1]["val_accuracy"]}
    for technique in REGISTRY:
        metrics.update(technique.metrics(p, done.parts.raw, Context()))
    timed = progress.step_seconds[1:] or progress.step_seconds
    if timed:
        median = statistics.median(timed)
        metrics.update({"step_ms_median": median * 1000, "docs_per_sec": p.batch_size / median})
    metrics.update(progress.metered[0])
    metrics.update(done.predicted)
    metrics.update(estimate_errors(metrics, done.predicted))
    metrics.update({k: v for k, v in test.items() if k != "confusion"})
    metrics["confusion"] = test["confusion"]
    metrics["labels"] = list(task.labels)
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


def fresh_classifier(model_folder: Path, task: Classification) -> torch.nn.Module:
    """The classifier made from data/model as a user would (the head as transformers initialises it)."""
    from transformers import AutoModelForSequenceClassification

    config = classifier_config(model_folder, task.labels, task.pad)
    return AutoModelForSequenceClassification.from_pretrained(str(model_folder), config=config)


def save_adapter(model: torch.nn.Module, p: Any, task: Classification, model_folder: Path, tokens: Path,
                 out: Path) -> dict[str, Any]:
    """The trained adapters and head in peft's format (`adapter/`, over the classifier made from
    data/model), and that classifier with them merged in (`merged/`, peft's merge_and_unload)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                        target_modules=list(p.lora_targets), bias="none", task_type="SEQ_CLS",
                        modules_to_save=list(HEADS))
    peft_model = get_peft_model(fresh_classifier(model_folder, task), config)
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
    peft_model.peft_config["default"].base_model_name_or_path = str(model_folder)
    peft_model.save_pretrained(str(adapter))
    (adapter / "README.md").unlink(missing_ok=True)  # peft's model-card template: nothing of this run
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(out / "merged"))
    copy_tokenizer(tokens, out / "merged")
    return {"adapter_tensors": copied, "adapter_size_mib": size_on_disk(adapter) / 2**20,
            "size_on_disk_mib": size_on_disk(out / "merged") / 2**20}

