"""Bytes to text for the readers of user files: lines streamed with a length cap, the one
encoding that decodes a whole file, line-by-line decoding where none does, and binary sniffing.
A file that starts with a UTF-16 or UTF-32 byte-order mark is read as such (its NUL bytes do
not make it binary)."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from stages.common.core.errors import StageError

SNIFF_BYTES = 8192
# byte-order marks of the wide encodings; UTF-32 LE's starts with UTF-16 LE's, so it comes first
WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
             (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def wide_encoding(path: Path) -> str | None:
    """'utf-16' or 'utf-32' for a file that starts with their byte-order mark, else None."""
    with path.open("rb") as f:
        head = f.read(4)
    return next((enc for bom, enc in WIDE_BOMS if head.startswith(bom)), None)


def iter_text_lines(path: Path, encoding: str, max_chars: int) -> Iterator[tuple[int, str | None]]:
    """(line number, text without line end) per line of a file in a wide encoding (its BOM sets
    the byte order); None for a line over max_chars, drained rather than held."""
    number = 0
    try:
        with path.open("r", encoding=encoding, newline="") as f:
            while line := f.readline(max_chars + 2):
                number += 1
                body = line.rstrip("\r\n")
                if len(body) > max_chars:
                    while not line.endswith("\n") and (line := f.readline(1 << 20)):
                        pass
                    yield number, None
                    continue
                yield number, body
    except UnicodeDecodeError as exc:  # a BOM, then bytes that are not that encoding
        raise StageError(f"{path}: starts with a {encoding.upper()} byte-order mark but is not valid "
                         f"{encoding.upper()} ({exc.reason}); fix or remove the file") from None


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
    """The first candidate that decodes the whole file (streamed), 'utf-8-sig' for a BOM,
    'utf-16' / 'utf-32' for theirs."""
    if (wide := wide_encoding(path)) is not None:
        return wide
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
    """Git's heuristic: a NUL byte in the first 8 KiB means binary, unless a UTF-16 or UTF-32
    byte-order mark says the NULs are half of each character."""
    if wide_encoding(path) is not None:
        return False
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
