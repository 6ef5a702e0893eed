"""clean: normalise data/raw into data/clean/{train,validation,test}.jsonl.

In order, each a switch in params: strip HTML tags and unescape entities; replace or
remove URLs and e-mail addresses; Unicode NFKC (full-width letters, digits and
punctuation to half-width); remove control and invisible format characters; collapse
whitespace; lowercase; remove punctuation; drop documents outside the length limits;
drop exact duplicates (across splits, so no text is in both train and test).

Streaming: one document in memory at a time. The one state that grows with the corpus
is the duplicate filter, 8-byte digests of the distinct documents seen so far.
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from tqdm import tqdm

from stages.common.core.artifacts import SPLITS, JsonlWriter, atomic_dir, iter_jsonl, write_params
from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, Section
from stages.common.harness.stage import stage_main

log = logging.getLogger("lmmem.clean")

_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>|<![^<>]*>")
_URL = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"'\u3000-\u303f\uff00-\uffef]+", re.IGNORECASE)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
# C0/C1 controls (but tab and newline, which whitespace handling sees) and invisible format chars
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_SPACE = re.compile(r"\s+")


class Params(Section):
    strip_html: bool = Field(
        True, description="remove tags (script/style with their content) and unescape entities")
    urls: Literal["keep", "replace", "remove"] = Field(
        "replace", description="keep | replace (with url_token) | remove")
    url_token: str = Field("URL", description="what replaces a URL (a word both tokenizers keep whole)")
    emails: Literal["keep", "replace", "remove"] = Field(
        "replace", description="keep | replace (with email_token) | remove")
    email_token: str = Field("EMAIL", description="what replaces an e-mail address")
    nfkc: bool = Field(
        True, description="Unicode NFKC: full-width letters, digits, punctuation to half-width")
    remove_control: bool = Field(
        True, description="drop control and invisible format characters (zero-width, BOM, bidi)")
    collapse_whitespace: bool = Field(
        True, description="any run of whitespace, newlines included, becomes one space")
    lowercase: bool = Field(
        False, description="true merges case variants: smaller vocabulary, loses proper-noun cues")
    remove_punctuation: bool = Field(
        False, description="true shrinks token counts; the language model then never sees punctuation")
    dedupe: bool = Field(
        True, description="drop exact duplicates across splits (no test text also in train); keeps 8 B per "
                          "document")
    min_chars: int = Field(2, ge=1, description="shorter documents are dropped (counted)")
    max_chars: int = Field(20_000, ge=1, description="longer documents are dropped (counted)")

    @model_validator(mode="after")
    def _limits(self) -> Params:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must not exceed max_chars ({self.max_chars})")
        return self


@dataclass(frozen=True)
class Paths:
    raw: Path = Path("data/raw")
    out: Path = Path("data/clean")


@lru_cache(maxsize=1)
def _punctuation_table() -> dict[int, str]:
    """Every Unicode punctuation code point (categories P*) mapped to a space."""
    return {c: " " for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P")}


def strip_html(text: str) -> str:
    if "<" in text:
        text = _SCRIPT_STYLE.sub(" ", text)
        text = _COMMENT.sub(" ", text)
        text = _TAG.sub(" ", text)
    return html.unescape(text) if "&" in text else text


def clean_text(text: str, p: Params, counts: Counter[str]) -> str:
    """Apply the configured steps to one document; counts what it changed."""
    if p.strip_html:
        stripped = strip_html(text)
        if stripped != text:
            counts["html_docs"] += 1
        text = stripped
    if p.urls != "keep":
        text, n = _URL.subn(f" {p.url_token} " if p.urls == "replace" else " ", text)
        counts["urls"] += n
    if p.emails != "keep":
        text, n = _EMAIL.subn(f" {p.email_token} " if p.emails == "replace" else " ", text)
        counts["emails"] += n
    if p.nfkc:
        text = unicodedata.normalize("NFKC", text)
    if p.remove_control:
        text = _CONTROL.sub("", text)
    if p.lowercase:
        text = text.lower()
    if p.remove_punctuation:
        text = text.translate(_punctuation_table())
    if p.collapse_whitespace:
        text = _SPACE.sub(" ", text)
    return text.strip()


def kept(text: str, p: Params, seen: set[bytes], dropped: Counter[str]) -> bool:
    """Whether a cleaned document stays: not empty, within the length limits, and (dedupe) not
    one already in `seen` (8-byte digests, added to); counts in `dropped` why not."""
    reason = ("empty" if not text else "too_short" if len(text) < p.min_chars
              else "too_long" if len(text) > p.max_chars else None)
    if reason is None and p.dedupe:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        reason = "duplicate" if digest in seen else None
        seen.add(digest)
    if reason is not None:
        dropped[reason] += 1
    return reason is None


def run(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    seen: set[bytes] = set()
    dropped: Counter[str] = Counter()
    changes: Counter[str] = Counter()
    docs_in = docs_out = chars_before = chars_after = 0
    per_split: Counter[str] = Counter()
    with atomic_dir(paths.out, "clean") as tmp:
        for split in SPLITS:
            with JsonlWriter(tmp / f"{split}.jsonl") as out:
                for rec in tqdm(iter_jsonl(paths.raw / f"{split}.jsonl"), desc=f"clean {split}",
                                unit=" docs", mininterval=2):
                    docs_in += 1
                    chars_before += len(rec["text"])
                    text = clean_text(rec["text"], params, changes)
                    if not kept(text, params, seen, dropped):
                        continue
                    out.write({**rec, "text": text})
                    docs_out += 1
                    per_split[split] += 1
                    chars_after += len(text)
        if docs_out == 0:
            raise StageError(f"no text left after cleaning {docs_in} documents (dropped: {dict(dropped)})")
        if per_split["train"] == 0:
            raise StageError(f"no training document left after cleaning (dropped: {dict(dropped)})")
        for empty in (s for s in SPLITS if not per_split[s]):  # train reads validation, evaluate test
            log.warning("the %s split is empty after cleaning: stages that read it will refuse it", empty)
        write_params(tmp, base=base, clean=params)

    metrics: dict[str, Any] = {
        "docs_in": docs_in, "docs_out": docs_out,
        "chars_before": chars_before, "chars_after": chars_after,
        "html_docs": changes["html_docs"], "urls": changes["urls"], "emails": changes["emails"],
    }
    for split in SPLITS:
        metrics[f"docs_{split}"] = per_split[split]
    for reason in ("empty", "too_short", "too_long", "duplicate"):
        metrics[f"dropped_{reason}"] = dropped[reason]
    log.info("kept %d of %d documents; dropped %s", docs_out, docs_in, dict(dropped))
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("clean", Params, Paths, run, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
