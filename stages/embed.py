"""embed: Word2Vec (gensim) on data/tokens/train.txt, saved as word2vec binary and as a
matrix aligned to the tokenizer's ids.

Training streams the token file through gensim's corpus_file path (C++ reader, no Python
iterator, nothing held but the vocabulary and the vectors). Outputs in data/embed/:
vectors.bin (`KeyedVectors.load_word2vec_format(path, binary=True)`, no pickle),
aligned.npy (float32, vocab_size × vector_size, row i = tokenizer id i; words without a
Word2Vec vector get a small seeded random row, pad gets zeros), neighbours.json.
Intrinsic evaluation: gensim's shipped analogy set (questions-words.txt) and similarity
set (wordsim353.tsv) with their coverage, and nearest neighbours of probe words.
workers > 1 trains faster but is not deterministic (thread scheduling decides the order
of updates); metrics say which it was.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from stages.common.core.artifacts import atomic_dir, read_json, write_json, write_params
from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, Section
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.harness.stage import stage_main
from stages.common.text.records import package_file

log = logging.getLogger("lmmem.embed")

ANALOGY_BUILTIN = "builtin:questions-words"
SIMILARITY_BUILTIN = "builtin:wordsim353"


class Params(Section):
    algorithm: Literal["skipgram", "cbow"] = Field(
        "skipgram",
        description="skipgram: better for rare words, slower | cbow: faster, smoother for frequent words")
    vector_size: int = Field(
        100, ge=1, le=4096, description="wider vectors hold more, cost vector_size x vocabulary x 4 B")
    window: int = Field(5, ge=1, le=100, description="context words each side: larger = more topical, slower")
    min_count: int = Field(2, ge=1, description="rarer words get no vector (their aligned row is random)")
    negative: int = Field(5, ge=0, le=100, description="negative samples per word (0 = hierarchical softmax)")
    sample: float = Field(
        1e-3, ge=0.0, le=1.0, description="down-sampling of frequent words: faster, better rare-word vectors")
    alpha: float = Field(0.025, gt=0.0, le=1.0, description="initial learning rate, decays linearly")
    epochs: int = Field(5, ge=1, le=1000, description="passes over the corpus: quality against time")
    workers: int = Field(1, ge=1, le=64, description="threads; > 1 is faster but not deterministic")
    analogy: str = Field(ANALOGY_BUILTIN, description="analogy set (gensim's); a path; '' for none")
    similarity: str = Field(
        SIMILARITY_BUILTIN, description="word-pair similarity set (gensim's); a path; '' for none")
    probe_words: list[str] = Field(
        default_factory=lambda: ["好", "质量", "手机", "不错", "失望"],
        description="nearest neighbours of these go to data/embed/neighbours.json")
    neighbours: int = Field(10, ge=1, le=1000, description="neighbours listed per probe word")


@dataclass(frozen=True)
class Paths:
    tokens: Path = Path("data/tokens")
    out: Path = Path("data/embed")


def _eval_file(value: str, builtin: str, shipped: str, key: str) -> Path | None:
    if not value:
        return None
    if value == builtin:
        return package_file("gensim", f"test/test_data/{shipped}")
    path = Path(value)
    if not path.is_file():
        raise StageError(f"embed.{key}: no such file: {value} (or '{builtin}', or '' for none)")
    return path


def aligned_matrix(wv: Any, vocab: list[str], seed: int, pad_id: int) -> tuple[np.ndarray, int]:
    """Rows in tokenizer order; returns the matrix and how many rows came from Word2Vec."""
    rng = np.random.default_rng(seed)
    dim = wv.vector_size
    # the same scale as gensim's own initialisation: uniform in ±0.5 / dim
    matrix = ((rng.random((len(vocab), dim), dtype=np.float32) - 0.5) / dim).astype(np.float32)
    found = 0
    for i, word in enumerate(vocab):
        if word in wv.key_to_index:
            matrix[i] = wv[word]
            found += 1
    matrix[pad_id] = 0.0
    return matrix, found


def analogy_scores(wv: Any, path: Path) -> dict[str, float]:
    total = sum(1 for line in path.open(encoding="utf-8") if line.strip() and not line.startswith(":"))
    _, sections = wv.evaluate_word_analogies(str(path), case_insensitive=True)
    overall = sections[-1]
    answered = len(overall["correct"]) + len(overall["incorrect"])
    out = {"analogy_questions": total, "analogy_answered": answered,
           "analogy_coverage": answered / total if total else 0.0}
    if answered:
        out["analogy_accuracy"] = len(overall["correct"]) / answered
    else:
        log.warning("analogy set %s: no question has all four words in the vocabulary", path.name)
    return out


def similarity_scores(wv: Any, path: Path) -> dict[str, float]:
    try:
        pearson, spearman, oov_percent = wv.evaluate_word_pairs(str(path), case_insensitive=True)
    except ValueError:  # gensim raises when every pair is out of vocabulary
        log.warning("similarity set %s: no pair has both words in the vocabulary", path.name)
        return {"similarity_oov_ratio": 1.0}
    out = {"similarity_oov_ratio": oov_percent / 100.0}
    rho = float(spearman[0]) if spearman is not None else math.nan
    if math.isfinite(rho):
        out["similarity_spearman"] = rho
        out["similarity_pearson"] = float(pearson[0])
    else:
        log.warning("similarity set %s: too few pairs in the vocabulary for a correlation", path.name)
    return out


def train_word2vec(params: Params, corpus: Path, seed: int) -> Any:
    """gensim's Word2Vec trained on `corpus` (a document a line, words separated by spaces)."""
    from gensim.models import Word2Vec

    try:
        return Word2Vec(
            corpus_file=str(corpus), vector_size=params.vector_size, window=params.window,
            min_count=params.min_count, sg=int(params.algorithm == "skipgram"),
            negative=params.negative, hs=int(params.negative == 0), sample=params.sample,
            alpha=params.alpha, epochs=params.epochs, workers=params.workers, seed=seed,
        )
    except RuntimeError as exc:  # gensim: "you must first build vocabulary before training"
        raise StageError(
            f"Word2Vec could not train on {corpus}: {exc} (is embed.min_count too high?)") from None


def nearest_words(wv: Any, params: Params) -> dict[str, list[list[Any]]]:
    """Each probe word's nearest words with their cosine similarity (data/embed/neighbours.json)."""
    neighbours: dict[str, list[list[Any]]] = {}
    for word in params.probe_words:
        if word in wv.key_to_index:
            neighbours[word] = [[w, round(float(s), 4)]
                                for w, s in wv.most_similar(word, topn=params.neighbours)]
        else:
            log.warning("probe word %r has no vector", word)
    return neighbours


def run(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    corpus = paths.tokens / "train.txt"
    meta = read_typed(paths.tokens / "meta.json", TokensMeta)
    vocab_file = read_json(paths.tokens / "vocab.json")
    vocab: list[str] = vocab_file["words"]
    if not corpus.is_file():
        raise StageError(f"missing input {corpus}: run the tokenize stage first")
    analogy = _eval_file(params.analogy, ANALOGY_BUILTIN, "questions-words.txt", "analogy")
    similarity = _eval_file(params.similarity, SIMILARITY_BUILTIN, "wordsim353.tsv", "similarity")

    started = time.perf_counter()
    model = train_word2vec(params, corpus, base.seed)
    train_seconds = time.perf_counter() - started
    wv = model.wv
    if len(wv) == 0:
        raise StageError(f"Word2Vec kept no word of {corpus}: embed.min_count={params.min_count} is too high")

    matrix, found = aligned_matrix(wv, vocab, base.seed, meta.special_ids.pad)
    counts: list[int] = vocab_file["train_counts"]
    n_special = len(meta.special_ids.model_dump())
    weighted = sum(c for w, c in zip(vocab[n_special:], counts[n_special:], strict=False)
                   if w in wv.key_to_index)
    metrics: dict[str, Any] = {
        "w2v_vocab_size": len(wv), "vector_size": params.vector_size,
        "vocab_coverage": found / len(vocab),
        "vocab_coverage_weighted": weighted / max(1, sum(counts[n_special:])),
        "train_words": model.corpus_total_words, "train_seconds": train_seconds,
        "words_per_sec": model.corpus_total_words * params.epochs / max(train_seconds, 1e-9),
        "deterministic": params.workers == 1,
    }
    if analogy is not None:
        metrics.update(analogy_scores(wv, analogy))
    if similarity is not None:
        metrics.update(similarity_scores(wv, similarity))

    neighbours = nearest_words(wv, params)
    metrics["probes"] = len(params.probe_words)
    metrics["probes_found"] = len(neighbours)

    with atomic_dir(paths.out, "embed") as tmp:
        wv.save_word2vec_format(str(tmp / "vectors.bin"), binary=True)
        np.save(tmp / "aligned.npy", matrix)
        write_json(tmp / "neighbours.json", neighbours)
        write_params(tmp, base=base, embed=params)
    for word, near in neighbours.items():
        log.info("nearest to %s: %s", word, " ".join(w for w, _ in near[:5]))
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("embed", Params, Paths, run, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
