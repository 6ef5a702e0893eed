"""The fine-tuning tasks: what a finetune run learns, starting from the trained model in
data/model (see stages.train.task for what a task provides).

- `Classification` (the finetune stage): sequence classification on the corpus labels. The
  model is the trained language model's body under transformers' `*ForSequenceClassification`
  head (`score`: one logit per label, read at the last real token of each document), exactly
  what `AutoModelForSequenceClassification.from_pretrained(data/model, num_labels=...)` loads.
  A row is a document's first `max_tokens` ids, padded, then its label.
The adapt stage's task (continued language modelling on another corpus) is in stages/adapt.py.

Each names what a stock library loads its outputs with (`auto_class`, peft's `peft_task`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.common.core.errors import StageError
from stages.common.core.schema import TokensMeta
from stages.common.modelling.classify import Docs, scores
from stages.train.task import Task

log = logging.getLogger("lmmem.finetune")

FINETUNE_CATEGORIES = ("frozen", "trainable", "adapters", "gradients", "optimizer", "activations",
                       "temporaries")
MIN_DOCS_PER_LABEL = 5


def classifier_config(model_folder: Path, labels: list[str], pad_id: int) -> Any:
    """The trained model's config with a classification head of one logit per label."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_folder))
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.pad_token_id = pad_id
    config.use_cache = False
    return config


def param_category(name: str, param: torch.Tensor) -> str:
    """A fine-tuned model's memory categories: adapters, trainable and frozen weights."""
    if "lora_" in name:
        return "adapters"
    return "trainable" if param.requires_grad else "frozen"


def scorable_classes(test_labels: np.ndarray, labels: list[str], tokens: Path) -> int:
    """How many classes the test split can score (classes with a labelled test document);
    fewer than two is refused before any training, fewer than all is said."""
    present = np.unique(test_labels[test_labels >= 0])
    if present.size < 2:
        held = ", ".join(repr(labels[int(i)]) for i in present) or "none"
        raise StageError(f"finetune task classify: the test split of {tokens} can score {present.size} of "
                         f"the {len(labels)} classes ({held}): accuracy and F1 need at least two; a larger "
                         f"corpus, or other ingest.split fractions")
    if present.size < len(labels):
        missing = [labels[i] for i in sorted(set(range(len(labels))) - {int(i) for i in present})]
        log.warning("finetune task classify: the test split scores %d of the %d classes (none of %s)",
                    present.size,
                    len(labels), ", ".join(map(repr, missing[:5])))
    return int(present.size)


class Classification(Task):
    """Sequence classification of data/tokens' labelled documents (see the module docstring)."""

    name = "classify"
    categories = FINETUNE_CATEGORIES
    auto_class, peft_task, folder = "AutoModelForSequenceClassification", "SEQ_CLS", "classifier"
    data_attributes = ("train", "train_index", "val", "test")

    def __init__(self, meta: TokensMeta, tokens: Path, model_folder: Path, max_tokens: int) -> None:
        self.meta, self.model_folder, self.max_tokens = meta, model_folder, max_tokens
        self.pad = meta.special_ids.pad
        self.labels = list(meta.labels)
        self.train = Docs(tokens, "train", meta.dtype)
        self.check_labels(tokens)
        self.train_index = np.flatnonzero(self.train.labels >= 0)
        self.val = Docs(tokens, "validation", meta.dtype)
        self.test = Docs(tokens, "test", meta.dtype)
        self.test_classes = scorable_classes(self.test.labels, self.labels, tokens)

    def check_labels(self, tokens: Path) -> None:
        """One line for a corpus this task cannot learn from: no labels, or a single class."""
        labelled = self.train.labels[self.train.labels >= 0]
        if not self.labels or labelled.size == 0:
            raise StageError(f"finetune task classify: {tokens} has no labelled training documents (ingest's "
                             "label_field names the labels): use a corpus with labels, or no fine-tuning "
                             f"runs (finetune.runs: {{}})")
        present = np.unique(labelled)
        if present.size < 2:
            raise StageError(f"finetune task classify: every labelled training document has the label "
                             f"{self.labels[int(present[0])]!r}: a classifier needs at least two classes")
        counts = np.bincount(labelled, minlength=len(self.labels))
        if counts.min() < MIN_DOCS_PER_LABEL:
            rare = [self.labels[i] for i in np.flatnonzero(counts < MIN_DOCS_PER_LABEL)]
            raise StageError(f"finetune task classify: label(s) {', '.join(map(repr, rare[:5]))} have fewer "
                             f"than {MIN_DOCS_PER_LABEL} training documents: too few to learn or to score")

    # ---------------------------------------------------------------- the model
    def make_model(self, p: Any, dry_run: bool) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        config = classifier_config(self.model_folder, self.labels, self.pad)
        model = AutoModelForSequenceClassification.from_config(config)
        if not dry_run:
            load_body(model, self.model_folder)
        return model

    def param_category(self, name: str, param: torch.Tensor) -> str:
        return param_category(name, param)

    def stock_model(self) -> torch.nn.Module:
        """The classifier made from data/model as a user would (the head as transformers
        initialises it): the base that peft's adapters go on."""
        from transformers import AutoModelForSequenceClassification

        config = classifier_config(self.model_folder, self.labels, self.pad)
        return AutoModelForSequenceClassification.from_pretrained(str(self.model_folder), config=config)

    def reference_scores(self, p: Any, device: torch.device, forward: Any) -> dict[str, Any]:
        return {}  # the frozen probe and Word2Vec's baseline are evaluate's

    def summary(self, metrics: dict[str, Any]) -> str:
        return f"test accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['f1_macro']:.4f}"

    # ---------------------------------------------------------------- the data
    def row_length(self, p: Any) -> int:
        return self.max_tokens + 1

    def rows(self, docs: Docs, index: np.ndarray) -> torch.Tensor:
        out = np.full((len(index), self.max_tokens + 1), self.pad, dtype=np.int64)
        for row, i in enumerate(index):
            start, end = docs.offsets[i], min(docs.offsets[i + 1], docs.offsets[i] + self.max_tokens)
            out[row, :end - start] = docs.ids[start:end]
            out[row, -1] = docs.labels[i]
        return torch.from_numpy(out)

    def sample(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        return self.rows(self.train, rng.choice(self.train_index, size=n))

    def logits(self, model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        ids = rows[:, :-1]
        return model(input_ids=ids, attention_mask=(ids != self.pad).long()).logits

    def loss(self, model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, rows).float(), rows[:, -1])

    # ---------------------------------------------------------------- scores
    @torch.no_grad()
    def predict(self, model: torch.nn.Module, docs: Docs, limit: int, batch: int, device: torch.device,
                forward: Any) -> tuple[float, list[int], list[int]]:
        """(mean loss, labels, predictions) on the first `limit` labelled documents of `docs`."""
        index = np.flatnonzero(docs.labels >= 0)[:limit]
        if index.size == 0:
            raise StageError("finetune task classify: no labelled documents in the validation or test split")
        model.eval()
        total, truth, predicted = 0.0, [], []
        for start in range(0, index.size, batch):
            rows = self.rows(docs, index[start:start + batch]).to(device)
            with forward():
                logits = self.logits(model, rows).float()
            total += F.cross_entropy(logits, rows[:, -1], reduction="sum").item()
            truth += rows[:, -1].tolist()
            predicted += logits.argmax(-1).tolist()
        model.train()
        return total / index.size, truth, predicted

    def validate(self, model: torch.nn.Module, p: Any, device: torch.device,
                 forward: Any) -> dict[str, float]:
        loss, truth, predicted = self.predict(model, self.val, p.eval_batches * p.batch_size,
                                              p.micro_batch_size,
                                              device, forward)
        return {"val_loss": loss, "val_accuracy": float(np.mean(np.array(truth) == np.array(predicted)))}

    def test_scores(self, model: torch.nn.Module, p: Any, device: torch.device,
                    forward: Any) -> dict[str, Any]:
        """Accuracy, macro precision, recall and F1, and the confusion matrix on every labelled
        test document."""
        loss, truth, predicted = self.predict(model, self.test, len(self.test.labels), p.micro_batch_size,
                                              device,
                                              forward)
        return {"test_loss": loss, "test_docs": len(truth), **scores(truth, predicted, len(self.labels)),
                "labels": list(self.labels)}


def load_body(model: torch.nn.Module, folder: Path) -> None:
    """The trained language model's weights into the classifier: every body weight must be
    there; only the new head is left as initialised (and the language model's own output
    head, which a classifier has not, is not read)."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("score.")]
    unexpected = [k for k in unexpected if not k.startswith("lm_head.")]
    if missing or unexpected:
        raise StageError(f"{folder}: not the body of this classifier (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}): rerun train")
