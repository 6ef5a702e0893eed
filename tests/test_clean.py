"""clean: each switch on real text, drops counted by reason, nothing left is an error."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from stages.clean import Params, clean_text
from stages.common.core.artifacts import iter_jsonl
from tests.conftest import one_error_line, read_metrics, run_stage, write_jsonl


def cleaned(text: str, **switches: object) -> str:
    return clean_text(text, Params(**switches), Counter())


def test_html_tags_scripts_and_entities() -> None:
    text = '<p>Fish &amp; chips</p><script>alert("x")</script><!-- note --><br/>5 &lt; 6 &#x4E2D;'
    assert cleaned(text) == "Fish & chips 5 < 6 中"
    assert cleaned("a < b and c > d") == "a < b and c > d"  # not tags
    assert cleaned("<b>bold</b>", strip_html=False) == "<b>bold</b>"


def test_urls_and_emails_replaced_removed_or_kept() -> None:
    text = "see https://example.com/a?b=1，或 www.test.cn 联系 me@mail.example.org"
    assert cleaned(text) == "see URL ,或 URL 联系 EMAIL"
    assert cleaned(text, urls="remove", emails="remove") == "see ,或 联系"
    assert cleaned(text, urls="keep", emails="keep", nfkc=False) == text


def test_nfkc_full_width_to_half_width() -> None:
    assert cleaned("ＡＢＣ１２３！？（）") == "ABC123!?()"
    assert cleaned("ＡＢＣ", nfkc=False) == "ＡＢＣ"


def test_control_characters_and_whitespace() -> None:
    assert cleaned("a\u200bb\x00c\x07d\ufeff  e\t\n\r\nf") == "abcd e f"
    assert cleaned("a\x00b", remove_control=False) == "a\x00b"
    assert cleaned("a  \n b", collapse_whitespace=False) == "a  \n b"


def test_lowercase_and_punctuation() -> None:
    assert cleaned("Hello, World! 你好。", lowercase=True, remove_punctuation=True) == "hello world 你好"
    assert cleaned("Hello, World!") == "Hello, World!"


def test_counts_of_changes() -> None:
    counts: Counter[str] = Counter()
    clean_text("<i>x</i> http://a.io http://b.io a@b.co", Params(), counts)
    assert counts == Counter({"html_docs": 1, "urls": 2, "emails": 1})


def write_raw(raw: Path, splits: dict[str, list[str]]) -> None:
    for split in ("train", "validation", "test"):
        write_jsonl(raw / f"{split}.jsonl",
                    [{"text": t, "label": None, "lang": "en", "source": f"t:{i}"}
                     for i, t in enumerate(splits.get(split, []))])


def clean(params: Path, tmp: Path) -> tuple[int, Path, Path]:
    out, metrics = tmp / "clean", tmp / "clean.json"
    rc = run_stage("clean", ["--params", str(params), "--raw", str(tmp / "raw"), "--out", str(out),
                             "--metrics", str(metrics)])
    return rc, out, metrics


def test_duplicates_across_splits_and_length_filters(params_file: Callable[..., Path],
                                                     tmp_path: Path) -> None:
    write_raw(tmp_path / "raw", {
        "train": ["Same text", "same  text", "x", "a long document " * 10, "kept one"],
        "validation": ["Ｓａｍｅ text", "another"],
        "test": ["<p></p>", "final"],
    })
    rc, out, metrics_path = clean(params_file(clean={"min_chars": 2, "max_chars": 100}), tmp_path)
    assert rc == 0
    kept = {s: [r["text"] for r in iter_jsonl(out / f"{s}.jsonl")] for s in ("train", "validation", "test")}
    # "same  text" collapses to a different string ("same" lower-case) so it stays; "Ｓａｍｅ text"
    # becomes "Same text" under NFKC and is a duplicate of a training document
    assert kept == {"train": ["Same text", "same text", "kept one"], "validation": ["another"],
                    "test": ["final"]}
    m = read_metrics(metrics_path)
    assert (m["dropped_duplicate"], m["dropped_too_short"], m["dropped_too_long"],
            m["dropped_empty"]) == (1, 1, 1, 1)
    assert m["docs_in"] == 9 and m["docs_out"] == 5
    assert m["chars_after"] == sum(len(t) for v in kept.values() for t in v)


def test_nothing_left_after_cleaning_is_refused(params_file: Callable[..., Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    write_raw(tmp_path / "raw", {"train": ["<br>", "&nbsp;"], "test": ["\u200b"]})
    rc, out, metrics = clean(params_file(), tmp_path)
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, "clean")
    assert "no text left after cleaning 3 documents (dropped: {'empty': 3})" in line
    assert not out.exists() and not metrics.exists()


def test_missing_input_is_refused(params_file: Callable[..., Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = clean(params_file(), tmp_path)
    assert rc == 2
    assert f"missing input {tmp_path}/raw/train.jsonl" in one_error_line(capsys.readouterr().err, "clean")
    assert not out.exists()
