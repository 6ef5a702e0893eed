"""The sentiment probe on a labelled corpus: a logistic-regression head on a model's mean-pooled
last hidden states (train split, body frozen), scored on the test split, beside a
bag-of-Word2Vec baseline with the same classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stages.common.core.schema import TokensMeta
from stages.common.modelling.classify import Docs, fit_logistic, pooled_features, predict, scores

if TYPE_CHECKING:
    from stages.evaluate import Params, Paths


def probe_docs(paths: Paths, params: Params, meta: TokensMeta, seed: int
               ) -> tuple[list[np.ndarray], list[int], list[np.ndarray], list[int]]:
    """The probe's training documents (a seeded sample of the train split) and all labelled
    test documents: the same for every model and for the baseline."""
    train = Docs(paths.tokens, "train", meta.dtype).labelled(params.classify_train_docs,
                                                             params.classify_max_tokens, seed)
    test = Docs(paths.tokens, "test", meta.dtype).labelled(10**9, params.classify_max_tokens, seed)
    return *train, *test


def probe(model: torch.nn.Module, paths: Paths, params: Params, meta: TokensMeta,
          seed: int) -> dict[str, Any]:
    train_docs, train_y, test_docs, test_y = probe_docs(paths, params, meta, seed)
    n = len(meta.labels)
    head = fit_logistic(pooled_features(model, train_docs), torch.tensor(train_y), n)
    result = scores(test_y, predict(head, pooled_features(model, test_docs)), n)
    return {f"cls_{k}": v for k, v in result.items()}


def word2vec_probe(paths: Paths, params: Params, meta: TokensMeta, seed: int) -> dict[str, Any]:
    """The baseline: each document as the mean of its words' Word2Vec vectors."""
    vectors = torch.from_numpy(np.load(paths.embed / "aligned.npy")).float()
    train_docs, train_y, test_docs, test_y = probe_docs(paths, params, meta, seed)
    n = len(meta.labels)
    head = fit_logistic(torch.stack([vectors[d].mean(0) for d in train_docs]), torch.tensor(train_y), n)
    result = scores(test_y, predict(head, torch.stack([vectors[d].mean(0) for d in test_docs])), n)
    return {"name": "word2vec-bow", "status": "ok", **{f"cls_{k}": v for k, v in result.items()}}
