"""Text helpers shared by the data stages: scripts (Han or not), language, a record's
normal form and hash, package data files."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

from stages.common.core.errors import StageError

# Han ideographs (CJK unified, extension A, compatibility) plus CJK and full-width
# punctuation: a run of these goes to jieba, everything else to nltk.
HAN_CHARS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
CJK_RUN = re.compile(f"[{HAN_CHARS}\u3000-\u303f\uff00-\uffef]+")
_HAN = re.compile(f"[{HAN_CHARS}]")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")


def detect_lang(text: str) -> str:
    """Script-based language tag: 'zh' when there are at least as many Han characters as
    Latin-script words (a Han character carries about a word's worth), 'en' for other
    Latin-script text, 'other' when neither appears."""
    han = sum(1 for _ in _HAN.finditer(text))  # counted, not collected: flat memory on a huge record
    latin = sum(1 for _ in _LATIN_WORD.finditer(text))
    if han == 0 and latin == 0:
        return "other"
    return "zh" if han >= latin else "en"


def text_hash(text: str, purpose: bytes) -> float:
    """A number in [0, 1) from the text alone; `purpose` keeps the split and the sample independent."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=purpose).digest()
    return int.from_bytes(digest, "big") / 2**64


def normalize(text: str) -> str:
    """Only what makes a record a record: one line-end style, no surrounding whitespace."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def writable(text: str) -> str:
    """Text any UTF-8 file can hold: a file name's undecodable bytes (os.fsdecode's lone
    surrogates) become \\x escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"package '{package}' is not installed: it ships the file {relative}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise StageError(f"package '{package}' does not ship {relative} (looked at {path})")
    return path


def metric_key(value: str) -> str:
    """A label or language as a flat metric key part: lowercase letters, digits, underscores."""
    key = re.sub(r"[^0-9a-z]+", "_", value.lower()).strip("_")
    return key or "blank"


def split_of(text: str, train: float, validation: float) -> str:
    """Deterministic split from a hash of the text alone: adding documents moves no old one."""
    h = text_hash(text, b"lmmem-split")
    if h < train:
        return "train"
    if h < train + validation:
        return "validation"
    return "test"


def tagged_words(line: str) -> list[str]:
    """The words of a word/tag line (the People's Daily 1998 corpus: `迈向/v  [中央/n 电台/n]nt`),
    tags and compound brackets dropped."""
    words = []
    for item in line.split():
        word = item.rpartition("/")[0] if "/" in item[1:] else item
        if word.startswith("[") and len(word) > 1:
            word = word[1:]
        if word:
            words.append(word)
    return words
