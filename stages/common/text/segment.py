"""Words of a text, the tokenize stage's segmentation: jieba for each run of Han characters
(with CJK punctuation), nltk's Treebank-style word tokenizer for everything else, and a pool
of worker processes that segments batches of documents in order.

Text meant for the tokenizer.json of data/tokens (which splits on whitespace) goes through
`Segmenter.segment` first: jieba cannot live inside tokenizer.json.
"""

from __future__ import annotations

import collections
import functools
import logging
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stages.common.core.errors import StageError
from stages.common.core.lifetime import die_with
from stages.common.text.records import CJK_RUN

_WHITESPACE = re.compile(r"\s")


def private_cache(name: str) -> Path:
    """A cache folder of this project only (.cache/<name> in the repository, mode 0700). jieba
    would otherwise load its dictionary cache from the shared temporary folder, unchecked
    (marshal), where another local user could plant one that changes every segmentation."""
    folder = Path(__file__).resolve().parents[3] / ".cache" / name
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    return folder


def check_user_dict(user_dict: str) -> None:
    if user_dict and not Path(user_dict).is_file():
        raise StageError(f"tokenize.user_dict: no such file: {user_dict}")


class Segmenter:
    """Words of a text: jieba for Han runs, nltk for the rest; optional stopword removal."""

    def __init__(self, mode: str = "precise", hmm: bool = True, user_dict: str = "",
                 stopwords: bool = False) -> None:
        import jieba
        from nltk.tokenize import NLTKWordTokenizer

        jieba.setLogLevel(logging.WARNING)
        self._jieba = jieba.Tokenizer()
        self._jieba.tmp_dir = str(private_cache(f"jieba-{jieba.__version__}"))
        self._jieba.initialize()
        if user_dict:
            check_user_dict(user_dict)
            self._jieba.load_userdict(user_dict)
        self._mode = mode
        self._hmm = hmm
        # Between Han runs sit many short fragments (", ", "!", "3"): the same few strings
        # again and again, and nltk's 30-odd regexes cost more than jieba per call. A bounded
        # cache returns nltk's own answer for a repeat (same output, about twice the speed).
        self._nltk = functools.lru_cache(maxsize=1 << 16)(NLTKWordTokenizer().tokenize)
        self._stop: frozenset[str] = frozenset()
        if stopwords:
            import stopwordsiso

            self._stop = frozenset(stopwordsiso.stopwords(["zh", "en"]))

    def _han(self, run: str) -> list[str]:
        if self._mode == "search":
            return self._jieba.lcut_for_search(run, HMM=self._hmm)
        return self._jieba.lcut(run, HMM=self._hmm)

    def segment(self, text: str) -> list[str]:
        words: list[str] = []
        pos = 0
        for m in CJK_RUN.finditer(text):
            if m.start() > pos:
                words.extend(self._nltk(text[pos:m.start()]))
            words.extend(self._han(m.group()))
            pos = m.end()
        if pos < len(text):
            words.extend(self._nltk(text[pos:]))
        out = []
        for w in words:
            w = w.strip()
            if not w or w in self._stop or w.lower() in self._stop:
                continue
            out.append(_WHITESPACE.sub("_", w))
        return out


# The segmenter of this process. The parent builds it before the pool forks, so the
# workers inherit nltk and jieba already imported and jieba's dictionary already loaded
# (a few seconds that would otherwise be paid again in every worker).
_SEGMENTER: Segmenter | None = None


def _init_segmenter(config: dict[str, Any]) -> None:
    global _SEGMENTER
    _SEGMENTER = Segmenter(**config)


def _segment_batch(texts: list[str]) -> tuple[list[str], Counter[str]]:
    assert _SEGMENTER is not None
    lines: list[str] = []
    counts: Counter[str] = Counter()
    for text in texts:
        words = _SEGMENTER.segment(text)
        counts.update(words)
        lines.append(" ".join(words))
    return lines, counts


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class SegmentPool:
    """Segments batches of texts, in order, on `workers` processes (in this one when 1).

    At most 2 × workers batches are in flight: the reader never runs ahead of the workers,
    so memory stays flat however large the corpus."""

    def __init__(self, config: dict[str, Any], workers: int) -> None:
        self.workers = workers
        self._pool: Any = None
        _init_segmenter(config)
        if workers > 1:
            self._pool = multiprocessing.get_context("fork").Pool(workers, initializer=die_with,
                                                                  initargs=(os.getpid(),))

    def map(self, batches: Iterable[list[str]]) -> Iterator[tuple[list[str], Counter[str]]]:
        if self._pool is None:
            yield from map(_segment_batch, batches)
            return
        pending: collections.deque[Any] = collections.deque()
        for batch in batches:
            pending.append(self._pool.apply_async(_segment_batch, (batch,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> SegmentPool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None and exc[0] is not None:
            self._pool.terminate()
        self.close()
