"""Bytes to text for the readers of user files: lines streamed with a length cap, the one
encoding that decodes a whole file, line-by-line decoding where none does, and binary sniffing."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

SNIFF_BYTES = 8192


def iter_raw_lines(f: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without line end) per line; None for a line over max_bytes,
    which is drained in chunks rather than held in memory."""
    number = 0
    while True:
        line = f.readline(max_bytes + 2)  # + room for \r\n
        if not line:
            return
        number += 1
        body = line.rstrip(b"\r\n")
        if len(body) > max_bytes:
            while not line.endswith(b"\n"):
                line = f.readline(1 << 20)
                if not line:
                    break
            yield number, None
            continue
        yield number, body


def detect_encoding(path: Path, candidates: list[str]) -> str | None:
    """The first candidate that decodes the whole file (streamed), 'utf-8-sig' for a BOM."""
    with path.open("rb") as f:
        head = f.read(3)
    if head == codecs.BOM_UTF8:
        candidates = ["utf-8-sig"]
    for enc in candidates:
        decoder = codecs.getincrementaldecoder(enc)(errors="strict")
        try:
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    decoder.decode(chunk)
                decoder.decode(b"", final=True)
            return enc
        except UnicodeDecodeError:
            continue
    return None


def is_binary(path: Path) -> bool:
    """Git's heuristic: a NUL byte in the first 8 KiB means binary."""
    with path.open("rb") as f:
        return b"\x00" in f.read(SNIFF_BYTES)


def decode_line(raw: bytes, encoding: str | None, candidates: list[str]) -> str | None:
    """Decode one line with the file's encoding, or, where the file has none, the first candidate."""
    for enc in [encoding] if encoding else candidates:
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return None
