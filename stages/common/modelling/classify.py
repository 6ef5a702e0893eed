"""Sentence classification on fixed features: a split's labelled documents, a model's pooled
features of them, a multinomial logistic regression trained with full-batch L-BFGS
(deterministic on CPU), and the scores a report needs. Used for the sentiment probe of every
model variant and for the bag-of-Word2Vec baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.common.modelling.models import LSTMLanguageModel

MAX_CONFUSION = 50  # labels; beyond, results.json keeps no confusion matrix (it grows with their square)
MIN_DOCS_PER_LABEL = 5  # fewer labelled training documents a label: no probe, its accuracy would say nothing


class Docs:
    """A split's documents as id arrays (each ends with eos) with their label index (-1: none)."""

    def __init__(self, tokens: Path, split: str, dtype: str) -> None:
        self.ids = np.memmap(tokens / f"{split}.bin", dtype=dtype, mode="r")
        self.offsets = np.fromfile(tokens / f"{split}.offsets.bin", dtype=np.uint64).astype(np.int64)
        self.labels = np.fromfile(tokens / f"{split}.labels.bin", dtype=np.int32)

    def labelled(self, limit: int, max_tokens: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
        """Up to `limit` labelled documents drawn at random (seeded: the files keep the source's
        order, which may be all of one class first), each cut to `max_tokens` ids."""
        candidates = np.flatnonzero(self.labels >= 0)
        picked = np.sort(np.random.default_rng(seed).permutation(candidates)[:limit])
        docs = [np.asarray(self.ids[self.offsets[i]:min(self.offsets[i + 1], self.offsets[i] + max_tokens)],
                           dtype=np.int64) for i in picked]
        return docs, [int(self.labels[i]) for i in picked]


@torch.no_grad()
def pooled_features(model: torch.nn.Module, docs: list[np.ndarray], batch: int = 32) -> torch.Tensor:
    """Mean of each document's last hidden states (the model's body, no head), documents
    batched with right padding and averaged over their own positions only."""
    out = []
    for i in range(0, len(docs), batch):
        chunk = docs[i:i + batch]
        length = max(len(d) for d in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length)
        for row, doc in enumerate(chunk):
            ids[row, :len(doc)] = torch.from_numpy(doc)
            mask[row, :len(doc)] = 1
        if isinstance(model, LSTMLanguageModel):  # causal: padding after a document cannot touch it
            hidden = model.lstm(model.embed(ids))[0]
        else:  # the body alone: the vocabulary head's logits are not needed here
            hidden = model.base_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        out.append((hidden.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out)


def probe_problem(labels: np.ndarray, n_classes: int, limit: int) -> str | None:
    """Why a probe trained on (up to `limit` of) these labels would say nothing, or None."""
    used = min(int((labels >= 0).sum()), limit)
    if n_classes > 1 and used < MIN_DOCS_PER_LABEL * n_classes:
        return (f"{n_classes:,} labels and {used:,} labelled training documents ({used / n_classes:.1f} a "
                f"label; it needs at least {MIN_DOCS_PER_LABEL} a label): its accuracy would say nothing")
    return None


def fit_logistic(train_x: torch.Tensor, train_y: torch.Tensor, n_classes: int, l2: float = 1e-3,
                 iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardise the features (train statistics) and fit weights and bias; returns
    (mean, std, weight, bias) for `predict`."""
    x = train_x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean, std, weight.detach(), bias.detach()


def predict(model: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    mean, std, weight, bias = model
    return ((x.double() - mean) / std @ weight + bias).argmax(1)


def scores(y_true: list[int] | torch.Tensor, y_pred: list[int] | torch.Tensor,
           n_classes: int) -> dict[str, Any]:
    """Accuracy, macro precision, recall and F1 (a class never predicted has precision 0), and
    the confusion matrix (rows: true class, columns: predicted; None beyond MAX_CONFUSION
    labels)."""
    confusion = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(list(map(int, y_true)), list(map(int, y_pred)), strict=True):
        confusion[t][p] += 1
    total = sum(map(sum, confusion))
    precision, recall, f1 = [], [], []
    for c in range(n_classes):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(n_classes))
        actual = sum(confusion[c])
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return {"accuracy": sum(confusion[c][c] for c in range(n_classes)) / total if total else 0.0,
            "precision_macro": sum(precision) / n_classes, "recall_macro": sum(recall) / n_classes,
            "f1_macro": sum(f1) / n_classes, "confusion": confusion if n_classes <= MAX_CONFUSION else None}
