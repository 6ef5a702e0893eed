"""The configured source as a stream of Records: a built-in corpus, or the user's files (a file,
a folder, a glob), each read by its format's module (txt, jsonl, table for CSV, parquet);
special files, unknown extensions, empty and binary files counted or refused."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stages.common.core.errors import StageError
from stages.common.harness.specials import problems, refusal
from stages.ingest import builtin, jsonl, parquet, table, txt
from stages.ingest.encodings import is_binary
from stages.ingest.records import Counts, Record

if TYPE_CHECKING:
    from stages.ingest import Params

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
READERS = {"txt": txt.read, "jsonl": jsonl.read, "csv": table.read, "parquet": parquet.read}


def files(p: Params) -> list[Path]:
    """The user's corpus files: the source's file, a folder's files (hidden ones left out), or a glob's."""
    source = p.source
    path = Path(source).expanduser()
    # a FIFO or device, or a link to one: DVC would hash it for ever
    if special := problems([path], Path("/")):
        raise StageError(f"ingest.source: {refusal(special)}")
    if path.is_dir():
        found = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    elif path.is_file():
        found = [path]
    elif glob.has_magic(source):
        found = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
        if not found:
            raise StageError(f"ingest.source: the pattern '{source}' matches no file")
    else:
        raise StageError(f"ingest.source: no such file or folder: {source}")
    return found


def records(p: Params, counts: Counts) -> Iterator[Record]:
    if p.source.startswith("builtin:"):
        yield from builtin.read(p, counts, p.source)
        return
    found = files(p)
    for path in found:
        fmt = p.format if p.format != "auto" else FORMATS.get(path.suffix.lower())
        if fmt is None:
            if len(found) == 1:
                raise StageError(
                    f"{path}: cannot tell the format from the extension '{path.suffix}' "
                    f"(supported: {', '.join(FORMATS)}); set ingest.format"
                )
            counts.skip_file("unsupported_extension", path)
            continue
        if path.stat().st_size == 0:
            counts.skip_file("empty_file", path)
            continue
        if fmt != "parquet" and is_binary(path):
            counts.skip_file("binary_file", path)
            continue
        counts.files_read += 1
        yield from READERS[fmt](p, counts, path)
