"""Plain text: a document a line (ingest.txt_unit: line) or a whole file a document (file)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stages.common.core.errors import StageError
from stages.ingest.encodings import detect_encoding
from stages.ingest.lines import BOM, lines
from stages.ingest.records import Counts, Record

if TYPE_CHECKING:
    from stages.ingest import Params


def read(p: Params, counts: Counts, path: Path) -> Iterator[Record]:
    if p.txt_unit == "line":
        for number, text in lines(p, counts, path):
            yield Record(text, None, f"{path}:{number}")
        return
    if path.stat().st_size > p.max_record_bytes:
        counts.skip("too_long", str(path))
        return
    encoding = detect_encoding(path, list(p.encodings))
    if encoding is None:
        if p.on_decode_error == "fail":
            raise StageError(f"{path}: decodes in none of {list(p.encodings)}")
        counts.skip("undecodable", str(path))
        return
    yield Record(path.read_text(encoding=encoding).removeprefix(BOM), None, str(path))
