"""CSV: a header row naming the columns (ingest.text_field, label_field), ingest.csv_delimiter
between fields; a quote opened and never closed is refused with its row."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stages.common.core.errors import StageError
from stages.ingest.lines import lines
from stages.ingest.records import Counts, Record, from_mapping, require_text_column

if TYPE_CHECKING:
    from stages.ingest import Params


def read(p: Params, counts: Counts, path: Path) -> Iterator[Record]:
    stream = (line + "\n" for _, line in lines(p, counts, path))
    reader = csv.reader(stream, delimiter=p.csv_delimiter, strict=True)  # strict: an unclosed quote fails
    csv.field_size_limit(p.max_record_bytes)
    header = next(reader, None)
    if header is None:
        counts.skip_file("empty_file", path)
        return
    header = [h.strip() for h in header]
    require_text_column(p, path, header)
    number = 1
    try:
        for number, row in enumerate(reader, start=2):
            yield from from_mapping(p, counts, dict(zip(header, row, strict=False)), f"{path}:row {number}")
    except csv.Error as exc:
        hint = " (a quote opened there is never closed)" if "end of data" in str(exc) else ""
        raise StageError(f"{path}: malformed CSV at row {number + 1}: {exc}{hint}") from None
