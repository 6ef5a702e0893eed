"""What every reader of ingest yields and counts: a Record (text, label, where it came from),
the skips by reason, and a record made from a mapping (a JSON line, a CSV row, a Parquet row)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.common.core.errors import StageError

if TYPE_CHECKING:
    from stages.ingest import Params

log = logging.getLogger("lmmem.ingest")


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


def require_text_column(p: Params, path: Path, columns: list[str]) -> None:
    if p.text_field not in columns:
        raise StageError(f"{path}: no column '{p.text_field}' for ingest.text_field "
                         f"(columns: {', '.join(columns)})")


def from_mapping(p: Params, counts: Counts, obj: dict[str, Any], where: str) -> Iterator[Record]:
    """The record of a mapping's text_field and label_field, or a counted skip."""
    text = obj.get(p.text_field)
    if not isinstance(text, str):
        counts.skip("missing_text" if text is None else "text_not_string", where)
        return
    label = obj.get(p.label_field) if p.label_field else None
    label = None if label in (None, "") else str(label)
    try:
        size = len(text.encode("utf-8"))
        (label or "").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no UTF-8 file can hold it
        counts.skip("invalid_unicode", where)
        return
    if size > p.max_record_bytes:
        counts.skip("too_long", where)
        return
    yield Record(text, label, where)
