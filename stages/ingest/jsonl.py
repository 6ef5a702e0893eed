"""JSON Lines: an object a line, its text in ingest.text_field (and its label in label_field)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stages.ingest.lines import lines
from stages.ingest.records import Counts, Record, from_mapping

if TYPE_CHECKING:
    from stages.ingest import Params


def read(p: Params, counts: Counts, path: Path) -> Iterator[Record]:
    for number, line in lines(p, counts, path):
        where = f"{path}:{number}"
        if not line.strip():
            counts.skip("empty_text", where)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            counts.skip("invalid_json", where)
            continue
        if not isinstance(obj, dict):
            counts.skip("invalid_json", where)
            continue
        yield from from_mapping(p, counts, obj, where)
