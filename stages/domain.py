"""domain: a second corpus, for continued language-model training on another domain (the
`adapt` runs), read, cleaned and segmented exactly as the main corpus was (the ingest, clean
and tokenize sections' settings) but mapped to ids with the trained model's vocabulary
(data/tokens/vocab.json): the model meets the new domain's words as it would at run time,
its unknown words as <unk>.

Sources: `domain.source` is any source ingest reads (builtin:zh-news, the People's Daily
paragraphs of January 1998, by default: news against the reviews the model learnt from; or
a user's file, folder or glob); labels, if any, are not read. The split is ingest's (a hash
of the text, ingest.split's fractions); duplicates are dropped within the corpus.

Outputs in data/domain/: <split>.bin, <split>.offsets.bin, <split>.labels.bin (-1: no
labels), meta.json (the main corpus's vocabulary and special ids, this corpus's counts),
params.json. Metrics: documents and tokens per split, and the share of the new domain's
words the model's vocabulary does not hold (unk_rate_<split>).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from tqdm import tqdm

from stages.clean import Params as CleanParams
from stages.clean import clean_text, kept
from stages.common.core.artifacts import SPLITS, atomic_dir, write_json, write_params
from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, Section
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.harness.stage import stage_main
from stages.common.text.records import normalize, split_of
from stages.common.text.segment import SegmentPool, batches
from stages.ingest import Params as IngestParams
from stages.ingest.records import Counts
from stages.ingest.sources import records
from stages.tokenize import Params as TokenizeParams
from stages.tokenize import write_ids

log = logging.getLogger("lmmem.domain")


class Settings(Section):
    """The `domain` section."""

    source: str = Field("builtin:zh-news", min_length=1, description=(
        "the new domain: builtin:zh-news (People's Daily, January 1998) | any source ingest reads (a file, "
        "folder or glob; builtin:en-news for an English model)"))
    max_docs: int = Field(0, ge=0, description="0 = every document; N = the first N (the rest are counted)")
    max_unk_rate: float = Field(0.5, ge=0.0, le=1.0, description=(
        "refuse a corpus whose training split has a larger share of words the trained vocabulary lacks "
        "(People's Daily against the reviews: 0.23; a corpus in another language: about 0.9, whose "
        "perplexity would mislead)"))
    max_overlap: float = Field(0.5, ge=0.0, le=1.0, description=(
        "refuse a corpus more of whose documents than this share are also in the training corpus (it would "
        "measure no new domain); any overlap is reported"))


class Params(Section):
    """What the stage reads: how the main corpus was read, cleaned and segmented, and its own."""

    ingest: IngestParams = Field(default_factory=IngestParams)
    clean: CleanParams = Field(default_factory=CleanParams)
    tokenize: TokenizeParams = Field(default_factory=TokenizeParams)
    domain: Settings = Field(default_factory=Settings)


@dataclass(frozen=True)
class Paths:
    tokens: Path = Path("data/tokens")
    out: Path = Path("data/domain")


def cleaned(p: Params, counts: Counts, dropped: Counter[str]) -> Iterator[tuple[str, str]]:
    """(split, text) of each document of the source, normalised, cleaned and kept or dropped
    as the main corpus's were (clean's `kept`: length limits, duplicates)."""
    reading = p.ingest.model_copy(update={"source": p.domain.source, "label_field": ""})
    seen: set[bytes] = set()
    taken = 0
    for rec in records(reading, counts):
        text = clean_text(normalize(rec.text), p.clean, Counter())
        if not kept(text, p.clean, seen, dropped):
            continue
        if p.domain.max_docs and taken >= p.domain.max_docs:
            dropped["over_max_docs"] += 1
            continue
        taken += 1
        yield split_of(text, p.ingest.split.train, p.ingest.split.validation), " ".join(text.split())


def overlap(tmp: Path, training: Path, settings: Settings, total: int) -> float:
    """The share of this corpus's documents also in the training corpus (data/tokens/train.txt),
    compared without their spaces (however they were segmented); reported, and refused above
    `max_overlap`."""
    if not training.is_file():
        raise StageError(f"missing input {training}: run the tokenize stage first")

    def key(line: bytes) -> bytes:
        return hashlib.blake2b(b"".join(line.split()), digest_size=8).digest()

    with training.open("rb") as f:
        seen = {key(line) for line in f}
    shared = 0
    for split in SPLITS:
        with (tmp / f"{split}.txt").open("rb") as f:
            shared += sum(key(line) in seen for line in f)
    share = shared / max(1, total)
    if share > settings.max_overlap:
        raise StageError(f"domain.source {settings.source}: {shared} of its {total} documents ({share:.0%}) "
                         "are in the training corpus, more than domain.max_overlap "
                         f"({settings.max_overlap:g}): no "
                         f"new domain to adapt to")
    if shared:
        log.warning("domain.source %s: %d of its %d documents (%.1f %%) are also in the training corpus",
                    settings.source, shared, total, 100 * share)
    return share


def read_vocabulary(tokens: Path) -> dict[str, int]:
    """tokenize's vocabulary: each word's id."""
    vocab_file = tokens / "vocab.json"
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))["words"]
    except FileNotFoundError:
        raise StageError(f"missing input {vocab_file}: run the tokenize stage first") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{vocab_file}: not tokenize's vocabulary ({exc})") from None
    return {w: i for i, w in enumerate(vocab)}


def write_cleaned(p: Params, tmp: Path) -> tuple[Counter[str], Counter[str]]:
    """The corpus cleaned into <split>.clean.txt: the documents of each split, and what was skipped;
    refused when a split is left empty."""
    counts, dropped = Counts(), Counter[str]()
    docs: Counter[str] = Counter()
    texts = {split: (tmp / f"{split}.clean.txt").open("w", encoding="utf-8", newline="\n")
             for split in SPLITS}
    try:
        for split, text in tqdm(cleaned(p, counts, dropped), desc="domain read", unit=" docs", mininterval=2):
            texts[split].write(text + "\n")
            docs[split] += 1
    finally:
        for f in texts.values():
            f.close()
    empty = [split for split in SPLITS if docs[split] == 0]
    if empty:
        skipped = dict(dropped + counts.skipped + counts.files_skipped)
        raise StageError(f"domain.source {p.domain.source}: {sum(docs.values())} documents leave the "
                         f"{', '.join(empty)} split(s) empty (skipped: {skipped or 'nothing'}): the "
                         f"adapt runs train, validate and test on it")
    return docs, dropped + counts.skipped


def segment(p: Params, tmp: Path) -> None:
    """Each <split>.clean.txt segmented as tokenize does, into <split>.txt."""
    config = {"mode": p.tokenize.jieba_mode, "hmm": p.tokenize.hmm, "user_dict": p.tokenize.user_dict,
              "stopwords": p.tokenize.stopwords}
    with SegmentPool(config, p.tokenize.workers) as pool:
        for split in SPLITS:
            source = tmp / f"{split}.clean.txt"
            target = tmp / f"{split}.txt"
            with source.open(encoding="utf-8") as f, target.open("w", encoding="utf-8") as out:
                lines = (line.rstrip("\n") for line in f)
                for segmented, _ in tqdm(pool.map(batches(lines, p.tokenize.batch_docs)),
                                         desc=f"domain {split}", unit=" batches", mininterval=2):
                    out.writelines(line + "\n" for line in segmented)
            source.unlink()


def write_splits(tmp: Path, meta: TokensMeta, index: dict[str, int], docs: Counter[str]) -> dict[str, Any]:
    """Each segmented split as ids in the trained vocabulary; its documents, tokens and unknown rate."""
    figures: dict[str, Any] = {}
    dtype = np.dtype(meta.dtype).type
    for split in SPLITS:
        n_tokens, n_unk = write_ids(tmp / f"{split}.txt", tmp, split, index, dtype, meta.special_ids.unk,
                                    meta.special_ids.eos)
        np.full(docs[split], -1, dtype=np.int32).tofile(tmp / f"{split}.labels.bin")
        (tmp / f"{split}.txt").unlink()
        figures.update({f"docs_{split}": docs[split], f"tokens_{split}": n_tokens,
                        f"unk_rate_{split}": n_unk / max(1, n_tokens - docs[split])})
    return figures


def run(p: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    meta = read_typed(paths.tokens / "meta.json", TokensMeta)
    index = read_vocabulary(paths.tokens)
    metrics: dict[str, Any] = {}
    with atomic_dir(paths.out, "domain") as tmp:
        docs, skipped = write_cleaned(p, tmp)
        segment(p, tmp)
        metrics["overlap_with_training"] = overlap(tmp, paths.tokens / "train.txt", p.domain,
                                                   sum(docs.values()))
        metrics.update(write_splits(tmp, meta, index, docs))
        if metrics["unk_rate_train"] > p.domain.max_unk_rate:
            raise StageError(f"domain.source {p.domain.source}: {metrics['unk_rate_train']:.1%} of its "
                             "training words are unknown to the trained vocabulary, more than "
                             f"domain.max_unk_rate ({p.domain.max_unk_rate:g}): another language or script "
                             "than the model's?")
        write_json(tmp / "meta.json", meta.model_copy(update={
            "labels": [], "docs": dict(docs), "tokens": {s: metrics[f"tokens_{s}"] for s in SPLITS}}))
        write_params(tmp, base=base, domain=p.domain)
    metrics.update({"source": p.domain.source, "docs": sum(docs.values()),
                    **{f"skipped_{k}": v for k, v in skipped.items()}})
    log.info("%s: %d documents, %d training tokens, %.1f %% of its words unknown to the model",
             p.domain.source, metrics["docs"], metrics["tokens_train"], 100 * metrics["unk_rate_train"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("domain", Params, Paths, run, argv, doc=__doc__,
                      section=("ingest", "clean", "tokenize", "domain"))


if __name__ == "__main__":
    raise SystemExit(main())
