"""Parquet: the text and label columns read in batches (pyarrow); a file pyarrow cannot open is
counted and skipped."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stages.ingest.records import Counts, Record, from_mapping, require_text_column

if TYPE_CHECKING:
    from stages.ingest import Params

log = logging.getLogger("lmmem.ingest")


def read(p: Params, counts: Counts, path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        counts.skip_file("unreadable_parquet", path)
        log.warning("%s: %s", path, exc)
        return
    names = pf.schema_arrow.names
    require_text_column(p, path, names)
    columns = [p.text_field] + ([p.label_field] if p.label_field in names else [])
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=columns):
        for obj in batch.to_pylist():
            row += 1
            yield from from_mapping(p, counts, obj, f"{path}:row {row}")
