"""A text file's lines, decoded: each file's encoding detected (a byte-order mark, or the first
of ingest.encodings that decodes it all), else line by line; undecodable and overlong lines
counted and skipped, or refused (ingest.on_decode_error: fail)."""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stages.common.core.errors import StageError
from stages.ingest.encodings import decode_line, detect_encoding, iter_raw_lines, iter_text_lines
from stages.ingest.records import Counts

if TYPE_CHECKING:
    from stages.ingest import Params

# a byte-order mark as decoded text: dropped from the start of every file, whatever its encoding
BOM = "\ufeff"
log = logging.getLogger("lmmem.ingest")


def lines(p: Params, counts: Counts, path: Path, encodings: list[str] | None = None,
          shown: str | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line that decodes and fits; the rest are counted."""
    encodings = encodings or list(p.encodings)
    shown = shown or str(path)
    encoding = detect_encoding(path, encodings)
    if encoding in ("utf-16", "utf-32"):  # from its byte-order mark
        for number, text in iter_text_lines(path, encoding, p.max_record_bytes):  # the codec drops its BOM
            if text is None:
                counts.skip("too_long", f"{shown}:{number}")
                continue
            yield number, text
        return
    if encoding is None:
        log.info("%s: no single encoding of %s decodes it all; decoding line by line", path, encodings)
    with path.open("rb") as f:
        for number, raw in iter_raw_lines(f, p.max_record_bytes):
            where = f"{shown}:{number}"
            if raw is None:
                counts.skip("too_long", where)
                continue
            if encoding == "utf-8-sig" and number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            text = decode_line(raw, encoding, encodings)
            # GB18030's: 84 31 95 33
            text = text.removeprefix(BOM) if number == 1 and text is not None else text
            if text is None:
                if p.on_decode_error == "fail":
                    raise StageError(
                        f"{where}: bytes decode in none of {encodings} "
                        "(set ingest.on_decode_error: skip to count and skip such lines)"
                    )
                counts.skip("undecodable", where)
                continue
            yield number, text
