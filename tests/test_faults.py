"""Bad inputs and faults, one test per class, each named after it: the message (one line, no
traceback), the exit code, and that what was there before survives."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.common.core.artifacts import OWNER_FILE, check_replaceable, writer_of
from stages.common.core.errors import StageError
from tests.conftest import ROOT, one_error_line, read_metrics, run_cli

CORPUS = "好评 质量 不错\n手机 很 好用\n"


def ingest(params: Path, out: Path, corpus: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    params.write_text(params.read_text().replace("builtin:zh-reviews",
                                                 str(corpus)).replace("sample: 0.05", "sample: 1.0"))
    return run_cli("ingest", ["--params", str(params), "--out", str(out), "--metrics",
                              str(cwd / "ingest.json")], cwd=cwd)


def test_out_at_a_folder_holding_user_files_is_refused(params_file: Callable[..., Path],
                                                       tmp_path: Path) -> None:
    """`--out data` once deleted all of data/, the user's corpus included, and exited 0."""
    mine = tmp_path / "data" / "corpus" / "mine.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text(CORPUS, encoding="utf-8")
    result = ingest(params_file(), tmp_path / "data", mine, tmp_path)
    assert result.returncode == 2
    line = one_error_line(result.stderr, "ingest")
    assert f"{tmp_path / 'data'}: not replaced with the ingest output" in line
    assert "lmmem did not write" in line
    assert mine.read_text(encoding="utf-8") == CORPUS
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["corpus"]  # no temporary folder left
    assert not (tmp_path / "ingest.json").exists()


def test_out_at_another_stages_output_is_refused(params_file: Callable[..., Path], tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    raw = tmp_path / "raw"
    assert ingest(params_file(), raw, corpus, tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    result = run_cli("clean",
                     ["--params", str(tmp_path / "params.yaml"), "--raw", str(raw), "--out", str(raw),
                      "--metrics", str(tmp_path / "clean.json")], cwd=tmp_path)
    assert result.returncode == 2
    assert "not replaced with the clean output, it was written by ingest" in one_error_line(result.stderr,
                                                                                            "clean")
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before


def test_out_at_a_file_is_refused(params_file: Callable[..., Path], tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    result = ingest(params_file(), corpus, corpus, tmp_path)
    assert result.returncode == 2
    assert "exists and is not a folder" in one_error_line(result.stderr, "ingest")
    assert corpus.read_text(encoding="utf-8") == CORPUS


def test_a_stage_replaces_its_own_previous_output(params_file: Callable[..., Path], tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    raw = tmp_path / "raw"
    assert ingest(params_file(), raw, corpus, tmp_path).returncode == 0
    owner = json.loads((raw / OWNER_FILE).read_text())
    assert owner["writer"] == "ingest"  # and a digest of every file it wrote, to catch damage later
    assert set(owner["blake2b"]) == {p.name for p in raw.iterdir() if p.name != OWNER_FILE}
    corpus.write_text(CORPUS + "新 的 一 行\n", encoding="utf-8")
    assert ingest(tmp_path / "params.yaml", raw, corpus, tmp_path).returncode == 0
    docs = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in raw.glob("*.jsonl"))
    assert docs == 3


def test_an_output_from_before_owner_files_is_known_by_dvc_lock(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Folders made before owner files existed: dvc.lock (in the working directory) says whose they are."""
    old = tmp_path / "data" / "raw"
    old.mkdir(parents=True)
    (old / "train.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert writer_of(old) is None
    with pytest.raises(StageError, match="lmmem did not write"):
        check_replaceable(old, "ingest")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  ingest:\n    cmd: x\n    outs:\n"
                                       "    - path: data/raw\n      hash: md5\n")
    assert writer_of(old) == "ingest"
    check_replaceable(old, "ingest")
    with pytest.raises(StageError, match="it was written by ingest"):
        check_replaceable(old, "clean")


def test_an_empty_or_absent_out_is_fine(tmp_path: Path) -> None:
    check_replaceable(tmp_path / "absent", "ingest")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", "ingest")


def test_temporaries_of_a_killed_run_are_git_ignored() -> None:
    """A killed stage leaves `.<out>.tmp-*` (or `.<out>.old-*`) beside its output until its next run."""
    for name in ("data/.raw.tmp-0123abcd", "data/plots/.train.old-0123abcd",
                 "data/checkpoints/train/.latest.tmp-1"):
        assert subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT,
                              check=False).returncode == 0, name
    assert subprocess.run(["git", "check-ignore", "-q", "data/corpus/mine.txt"], cwd=ROOT,
                          check=False).returncode == 1


@pytest.fixture
def ingested(params_file: Callable[..., Path], tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A good ingest run's output folder and what it holds (with its metrics file)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    assert ingest(params_file(), tmp_path / "raw", corpus, tmp_path).returncode == 0
    return tmp_path / "raw", snapshot(tmp_path)


def snapshot(work: Path) -> dict[str, bytes]:
    return {p.relative_to(work).as_posix(): p.read_bytes() for p in sorted((work / "raw").iterdir())} | {
        "ingest.json": (work / "ingest.json").read_bytes()}


def ingest_with(params_text: bytes, work: Path) -> subprocess.CompletedProcess[str]:
    bad = work / "bad.yaml"
    bad.write_bytes(params_text)
    return run_cli("ingest",
                   ["--params", str(bad), "--out", str(work / "raw"), "--metrics", str(work / "ingest.json")],
                   cwd=work)


@pytest.mark.parametrize("case, text, message", [
    ("a section given twice", "ingest:\n  sample: 1.0\nbase:\n  seed: 1\ningest:\n  max_docs: 2\n",
     "key 'ingest' appears twice in one mapping (line 5)"),
    ("a key given twice", "base:\n  seed: 1\ningest:\n  sample: 1.0\n  sample: 0.5\n",
     "key 'sample' appears twice in one mapping (line 5)"),
    ("an unknown section", "base:\n  seed: 1\ningest:\n  sample: 1.0\ntrian:\n  steps: 3\n",
     "unknown section 'trian' (sections: base, ingest, clean"),
])
def test_params_file_mistakes_are_refused(ingested: tuple[Path, dict[str, bytes]], case: str, text: str,
                                          message: str) -> None:
    raw, before = ingested
    result = ingest_with(text.encode("utf-8"), raw.parent)
    assert result.returncode == 2, case
    assert message in one_error_line(result.stderr, "ingest"), case
    assert snapshot(raw.parent) == before


def test_params_file_not_utf8_is_refused(ingested: tuple[Path, dict[str, bytes]]) -> None:
    raw, before = ingested
    result = ingest_with("base:\n  seed: 1\n# 注释\ningest:\n  sample: 1.0\n".encode("gbk"), raw.parent)
    assert result.returncode == 2
    # 注 (D7 A2) happens to be valid UTF-8; 释 (CA CD) is not: byte 20
    assert "is not UTF-8 text (byte 20 cannot be decoded)" in one_error_line(result.stderr, "ingest")
    assert snapshot(raw.parent) == before


def test_warmup_longer_than_training_is_refused(params_file: Callable[..., Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import run_stage, train_args

    params_file(train={"steps": 10, "warmup_steps": 20})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("earlier output")
    assert run_stage("train", train_args(tmp_path, tmp_path / "tokens")) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "train: warmup_steps (20) is more than steps (10): the learning rate would never reach lr" in line
    assert (tmp_path / "model" / "keep.txt").read_text() == "earlier output"


def test_distillation_warmup_longer_than_its_steps_is_refused(params_file: Callable[..., Path],
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import run_stage

    student = {"method": "distill", "steps": 5, "warmup_steps": 8}
    params = params_file(compress={"variants": {"student": student}})
    (tmp_path / "compressed").mkdir()
    (tmp_path / "compressed" / "keep.txt").write_text("earlier output")
    assert run_stage("compress", ["--params", str(params), "--model", str(tmp_path / "model"), "--tokens",
                                  str(tmp_path / "tokens"), "--out", str(tmp_path / "compressed"),
                                  "--metrics", str(tmp_path / "compress.json")]) == 2
    line = one_error_line(capsys.readouterr().err, "compress")
    assert "compress.variants.student.distill: warmup_steps (8) is more than steps (5)" in line, line
    assert (tmp_path / "compressed" / "keep.txt").read_text() == "earlier output"


def test_a_jsonl_record_with_a_lone_surrogate_is_counted_and_skipped(params_file: Callable[..., Path],
                                                                     tmp_path: Path) -> None:
    """`"\\ud800"` is valid JSON but not text: once it crashed ingest, losing every other record."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "好 的 手机"}\n{"text": "坏 \\ud800 的"}\n{"text": "ok", "label": '
                      '"\\udfff"}\n'
                      '{"text": "质量 不错"}\n', encoding="utf-8")
    result = ingest(params_file(), tmp_path / "raw", corpus, tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "ingest.json").read_text())
    assert metrics["docs"] == 2 and metrics["skipped_invalid_unicode"] == 2


def test_language_detection_of_a_huge_record_holds_no_list_of_matches() -> None:
    """A 200 MB line once took 5.7 GB here: every Han match collected just to be counted."""
    import tracemalloc

    from stages.common.text.records import detect_lang

    text = "质量不错" * 250_000 + " good" * 1000  # a million Han characters
    tracemalloc.start()
    assert detect_lang(text) == "zh"
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20, peak  # a list of a million one-character strings would be ~80 MB


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_utf16_and_utf32_with_a_bom_are_text_not_binary(params_file: Callable[..., Path], tmp_path: Path,
                                                        encoding: str) -> None:
    """Once reported as a binary file (its NUL bytes) and skipped."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes("\ufeff".encode(encoding)
                       + "好 的 手机\r\n质量 不错\nplain English\n".encode(encoding))
    result = ingest(params_file(), tmp_path / "raw", corpus, tmp_path)
    assert result.returncode == 0, result.stderr
    texts = sorted(json.loads(line)["text"] for f in (tmp_path / "raw").glob("*.jsonl")
                   for line in f.read_text(encoding="utf-8").splitlines())
    assert texts == ["plain English", "好 的 手机", "质量 不错"]


def test_utf16_that_breaks_off_is_one_line_naming_the_file(params_file: Callable[..., Path],
                                                           tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes("\ufeff好 的\n".encode("utf-16-le") + b"\x00\xdc\x41\x00")  # a lone low surrogate
    result = ingest(params_file(), tmp_path / "raw", corpus, tmp_path)
    assert result.returncode == 2
    line = one_error_line(result.stderr, "ingest")
    assert (f"{corpus}: starts with a UTF-16 byte-order mark but is not valid UTF-16 "
            "(illegal encoding)") in line
    assert not (tmp_path / "raw").exists()


def test_a_file_with_nul_bytes_and_no_bom_is_still_binary(params_file: Callable[..., Path],
                                                          tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("好 的 手机\n", encoding="utf-8")
    (folder / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert ingest(params_file(), tmp_path / "raw", folder, tmp_path).returncode == 0
    assert json.loads((tmp_path / "ingest.json").read_text())["files_skipped_binary_file"] == 1


def test_a_file_name_that_is_not_utf8_is_read_and_shown_escaped(params_file: Callable[..., Path],
                                                                tmp_path: Path) -> None:
    """Once a traceback: the name's undecodable byte could not be written to the JSONL."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text("好 的 手机\n", encoding="utf-8")
    with open(os.fsencode(folder) + b"/caf\xe9.txt", "wb") as f:  # Latin-1 é: not UTF-8
        f.write("质量 不错\n".encode())
    result = ingest(params_file(), tmp_path / "raw", folder, tmp_path)
    assert result.returncode == 0, result.stderr
    sources = sorted(json.loads(line)["source"] for f in (tmp_path / "raw").glob("*.jsonl")
                     for line in f.read_text(encoding="utf-8").splitlines())
    assert sources == [f"{folder}/caf\\xe9.txt:1", f"{folder}/good.txt:1"]


def test_a_csv_quote_never_closed_is_one_line_not_one_swallowing_field(params_file: Callable[..., Path],
                                                                       tmp_path: Path) -> None:
    """Once every row after the quote became part of one document, with no count."""
    corpus = tmp_path / "corpus.csv"
    corpus.write_text('text,label\n"good one",pos\n"broken,neg\nnext row,pos\nlast,neg\n', encoding="utf-8")
    result = ingest(params_file(), tmp_path / "raw", corpus, tmp_path)
    assert result.returncode == 2
    line = one_error_line(result.stderr, "ingest")
    assert (f"{corpus}: malformed CSV at row 3: unexpected end of data (a quote opened there is "
            "never closed)") in line
    assert not (tmp_path / "raw").exists()


def test_jieba_never_reads_a_cache_from_the_shared_temporary_folder(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Another local user could plant /tmp/jieba.cache (read with marshal, unchecked) and change
    every segmentation without DVC seeing it."""
    import marshal
    import tempfile

    from stages.common.text.segment import Segmenter

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # jieba's default: tempfile.gettempdir()
    planted = {"我": 1000, "我们": 1000, "去": 1000, "蓝": 0, "蓝莓": 0, "蓝莓派": 0, "蓝莓派对": 10**8}
    with (tmp_path / "jieba.cache").open("wb") as f:
        marshal.dump((planted, sum(planted.values())), f)
    segmenter = Segmenter()
    assert "蓝莓派对" not in segmenter.segment("我们去蓝莓派对")
    cache = Path(segmenter._jieba.tmp_dir)
    assert cache.is_relative_to(ROOT / ".cache") and (cache.stat().st_mode & 0o777) == 0o700
    assert (cache / "jieba.cache").is_file()


def broken_tokens(tokens: Path, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    copy = tmp_path / "tokens"
    shutil.copytree(tokens, copy)
    damage(copy / "train.bin")
    return copy


def previous_train_output(work: Path) -> dict[str, bytes]:
    """A model folder as an earlier train run leaves it (its owner file included)."""
    (work / "model").mkdir()
    (work / "model" / OWNER_FILE).write_text('{"writer": "train"}')
    (work / "model" / "config.json").write_text("{}")
    return {p.name: p.read_bytes() for p in (work / "model").iterdir()}


def append_a_byte(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"\x00")


def id_out_of_vocabulary(path: Path) -> None:
    ids = np.fromfile(path, dtype=np.uint16)
    ids[1000] = 60000
    ids.tofile(path)


@pytest.mark.parametrize("damage, message", [
    (append_a_byte, "bytes, not a whole number of uint16 ids (truncated, or not a token file)"),
    (id_out_of_vocabulary, "id 60000 at position 1000 is outside the vocabulary (2533 ids in meta.json)"),
])
def test_a_damaged_token_file_is_one_line_before_training(tokens: Path, tmp_path: Path,
                                                          params_file: Callable[..., Path],
                                                          capsys: pytest.CaptureFixture[str],
                                                          damage: Callable[[Path], None],
                                                          message: str) -> None:
    from tests.conftest import run_stage, train_args

    params_file()
    broken = broken_tokens(tokens, tmp_path, damage)
    before = previous_train_output(tmp_path)
    assert run_stage("train", train_args(tmp_path, broken)) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"{broken / 'train.bin'}: " in line and message in line, line
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before


@pytest.fixture(scope="module")
def finished_run(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny training run to its end: its checkpoints folder holds the step-29 checkpoint."""
    from tests.conftest import run_stage, tiny_params, train_args

    work = tmp_path_factory.mktemp("finished")
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(), allow_unicode=True), encoding="utf-8")
    assert run_stage("train", train_args(work, tokens)) == 0
    return work


def truncate_the_weights(latest: Path) -> None:
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def edit_the_step(latest: Path) -> None:
    state = json.loads((latest / "state.json").read_text())
    state["step"] = 5
    (latest / "state.json").write_text(json.dumps(state))


def garbage_state(latest: Path) -> None:
    (latest / "state.json").write_text("{not json")


@pytest.mark.parametrize("damage", [truncate_the_weights, edit_the_step, garbage_state])
def test_an_unusable_checkpoint_is_set_aside_and_training_starts_afresh(
        finished_run: Path, tokens: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
        damage: Callable[[Path], None]) -> None:
    """Once every rerun failed (or resumed at an edited step) until the folder was deleted by hand."""
    from tests.conftest import run_stage, train_args

    shutil.copy(finished_run / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(finished_run / "ckpt", tmp_path / "ckpt")
    damage(tmp_path / "ckpt" / "latest")
    damaged = {p.name: p.read_bytes() for p in (tmp_path / "ckpt" / "latest").iterdir()}
    assert run_stage("train", train_args(tmp_path, tokens)) == 0
    aside = list((tmp_path / "ckpt").glob("latest.corrupt-*"))
    # kept as it was
    assert len(aside) == 1 and {p.name: p.read_bytes() for p in aside[0].iterdir()} == damaged
    warned = [line for line in capfd.readouterr().err.splitlines() if "is unusable" in line]
    assert len(warned) == 1 and "training starts afresh" in warned[0] and "WARNING" in warned[0], warned
    fresh, finished = read_metrics(tmp_path / "train.json"), read_metrics(finished_run / "train.json")
    assert fresh["val_loss"] == finished["val_loss"]  # trained from step 0, as the first run did


@pytest.mark.parametrize("key, value, message", [
    ("generate_tokens", 1_000_000_000,
     ("evaluate.generate_tokens: 1000000000 new tokens after a 2-token prompt exceed "
      "the model's context of 32; at most 30")),
    ("latency_new_tokens", 25, ("evaluate.latency_new_tokens: 25 new tokens after a 8-token prompt exceed "
                                "the model's context of 32; at most 24")),
])
def test_generation_beyond_the_context_is_refused_before_any_model_loads(
        tokens: Path, tmp_path: Path, params_file: Callable[..., Path], capsys: pytest.CaptureFixture[str],
        key: str, value: int, message: str) -> None:
    """`generate_tokens: 1e9` once ran for ever."""
    from tests.conftest import run_stage

    params = params_file(evaluate={key: value})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "params.json").write_text(json.dumps({"train": {"model": {"context": 32}}}))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / OWNER_FILE).write_text('{"writer": "evaluate"}')
    (tmp_path / "eval" / "results.json").write_text("[]")
    rc = run_stage("evaluate", ["--params", str(params), "--model", str(tmp_path / "model"), "--compressed",
                                str(tmp_path / "none"), "--tokens", str(tokens), "--embed",
                                str(tokens.parent / "embed"),
                                "--out", str(tmp_path / "eval"), "--metrics",
                                str(tmp_path / "evaluate.json")])
    assert rc == 2
    assert message in one_error_line(capsys.readouterr().err, "evaluate")
    assert (tmp_path / "eval" / "results.json").read_text() == "[]" and not (
        tmp_path / "evaluate.json").exists()


def alive(pid: int) -> bool:
    """Running or sleeping: a zombie waiting for a reaper has already died."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


POOL_SCRIPTS = {
    "tokenize's segmenting pool": """
import time
from stages.common.text.segment import SegmentPool
pool = SegmentPool({"mode": "precise", "hmm": True, "user_dict": "", "stopwords": False}, 2)
print(" ".join(str(p.pid) for p in pool._pool._pool), flush=True)
time.sleep(600)
""",
    "evaluate's forked processes": """
import os, time
from pathlib import Path
from stages.common.harness.workers import fresh_processes
def task(marker):
    Path(marker).write_text(str(os.getpid()))
    time.sleep(600)
if __name__ == "__main__":  # the fork server's workers import this file as __mp_main__
    with fresh_processes(1, preload=[]) as pool:
        pool.submit(task, {marker!r})
        while not Path({marker!r}).exists():
            time.sleep(0.1)
        print(Path({marker!r}).read_text(), flush=True)
        time.sleep(600)
""",
}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("pool", list(POOL_SCRIPTS))
def test_workers_die_with_a_killed_stage(tmp_path: Path, pool: str) -> None:
    """A killed evaluate once left its worker (487 MB) and the resource tracker blocked for ever."""
    import signal
    import sys
    import time

    script = tmp_path / "stage.py"
    script.write_text(POOL_SCRIPTS[pool].replace("{marker!r}", repr(str(tmp_path / "worker.pid"))))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
    except BaseException:
        proc.kill()
        raise
    assert workers and all(alive(pid) for pid in workers)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers), f"{pool}: workers {workers} outlived their stage"


def test_metrics_that_cannot_be_written_are_refused_before_the_output_is_replaced(
        params_file: Callable[..., Path], tmp_path: Path) -> None:
    """A metrics folder that could not be written once failed after the new output was swapped in."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    blocker = tmp_path / "metrics"
    blocker.write_text("a file where the metrics folder should be")
    params = params_file()
    params.write_text(params.read_text().replace("builtin:zh-reviews",
                                                 str(corpus)).replace("sample: 0.05", "sample: 1.0"))
    result = run_cli("ingest", ["--params", str(params), "--out", str(tmp_path / "raw"), "--metrics",
                                str(blocker / "ingest.json")], cwd=tmp_path)
    assert result.returncode == 2
    assert f"--metrics {blocker / 'ingest.json'}: cannot be written" in one_error_line(result.stderr,
                                                                                       "ingest")
    assert not (tmp_path / "raw").exists() and blocker.read_text().startswith("a file")


def test_an_output_folder_whose_files_dvc_lock_lists_is_known_too(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    plots = tmp_path / "data" / "plots" / "train"
    plots.mkdir(parents=True)
    (plots / "steps.csv").write_text("step\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: x\n    outs:\n"
                                       "    - path: data/plots/train/steps.csv\n      hash: md5\n")
    assert writer_of(plots) == "train"
    (plots / "mine.txt").write_text("a file of the user's")
    assert writer_of(plots) is None


def test_a_model_whose_parameters_alone_cannot_fit_is_refused_before_the_dry_run(
        tokens: Path, tmp_path: Path, params_file: Callable[..., Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    """width 16384 x 128 layers once sat in the dry run for minutes: 412 G parameters are
    counted on the meta device and refused at once."""
    from tests.conftest import run_stage, train_args

    params_file(train={"model": {"layers": 128, "width": 16384, "heads": 128}})
    before = previous_train_output(tmp_path)
    assert run_stage("train", train_args(tmp_path, tokens)) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "train.model: 412,4" in line and "M parameters need at least" in line, line
    assert "more than this machine's available memory (" in line
    assert "choose fewer layers or a smaller width" in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before


def test_a_run_whose_estimate_exceeds_the_machines_memory_is_refused_with_what_fits(
        tokens: Path, tmp_path: Path, params_file: Callable[..., Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Width 8192 x 8 layers once allocated until the machine ran out. Here a model sized to
    this machine: its parameters (2 bytes each) fit, its fp32 AdamW training (16 bytes per
    parameter) does not; the dry run's estimate is refused before anything is allocated."""
    from stages.common.memory.rss_meter import available_mib
    from tests.conftest import run_stage, train_args

    found = available_mib()
    assert found is not None
    parameters = found[0] * 2**20 / 8  # 2 bytes each: a quarter of it; AdamW in fp32: twice it
    width = int((parameters / 24) ** 0.5) // 64 * 64  # two llama blocks: about 24 x width^2 parameters
    params_file(train={"model": {"layers": 2, "width": width, "heads": 8}, "meter_steps": 1})
    before = previous_train_output(tmp_path)
    assert run_stage("train", train_args(tmp_path, tokens)) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "the estimated tensor peak is " in line, line
    assert "MiB, more than this machine's available memory (" in line, line
    reported = float(line.split("available memory (")[1].split(" MiB")[0].replace(",", ""))
    assert 0.5 * found[0] < reported < 1.5 * found[0]
    assert "it fits with " in line or "nothing fits: " in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before


def test_a_run_expected_to_take_hours_says_so_in_its_first_log_line(
        tokens: Path, tmp_path: Path, params_file: Callable[..., Path]) -> None:
    """Ten million steps: the first line of the stage's log warns of hours (then the budget
    refuses it, so that nothing runs for hours here)."""
    from tests.conftest import train_args

    params_file(train={"steps": 10_000_000, "memory_budget_mib": 0.5, "max_hours": 0})
    result = run_cli("train", train_args(tmp_path, tokens))
    assert result.returncode == 2
    logged = [line for line in result.stderr.splitlines() if re.match(r"^\d{4}-\d\d-\d\d \S+ [A-Z]+ ", line)]
    assert re.search(r" WARNING lmmem\.train: train: 10,000,000 steps of \d+ x \d+ tokens: expected to take "
                     r"about [\d.]+ hours here \(", logged[0]), logged[:3]
    assert "more than train.memory_budget_mib=0.5" in one_error_line(result.stderr, "train")


@pytest.mark.parametrize("micro_batch_size, message", [
    (1_000_000_000, "train.micro_batch_size: 1,000,000,000 sequences of 32 tokens need at least "),
    (8, "train.max_hours: the run is expected to take about "),
])
def test_a_batch_of_a_billion_sequences_is_refused_before_the_dry_run(
        tokens: Path, tmp_path: Path, params_file: Callable[..., Path], micro_batch_size: int,
        message: str) -> None:
    """`batch_size: 1e9` once crashed with a traceback, then sat in the dry run for hours: in
    one micro-batch its token ids alone cannot fit; in micro-batches of 8 the run would take
    millions of hours (train.max_hours refuses it, and the dry run would walk at most 64 of its
    125 million micro-batches a step)."""
    from tests.conftest import train_args

    params_file(train={"batch_size": 1_000_000_000, "micro_batch_size": micro_batch_size})
    before = previous_train_output(tmp_path)
    result = run_cli("train", train_args(tmp_path, tokens))
    assert result.returncode == 2
    line = one_error_line(result.stderr, "train")
    assert message in line, line
    assert "dry run:" not in result.stderr  # refused before it
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before


def test_a_file_size_limit_reached_while_writing_is_one_line_naming_the_output(
        tokens: Path, tmp_path: Path, params_file: Callable[..., Path]) -> None:
    """`ulimit -f` (as a full disk): safetensors once raised a traceback naming no file."""
    import resource
    import sys

    from tests.conftest import train_args

    params_file()
    before = previous_train_output(tmp_path)
    limit = 200_000  # bytes: the tiny model's weights (about 0.7 MB) do not fit under it

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "stages.train", *train_args(tmp_path, tokens)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=600, check=False, preexec_fn=limited)
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_error_line(result.stderr, "train")
    assert re.search(r": the train output could not be written \(File too large\); what was there is kept$",
                     line), line
    assert line.split("lmmem train: error: ")[1].startswith((str(tmp_path / "ckpt"), str(tmp_path / "model")))
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    assert not list(tmp_path.glob("**/.*.tmp-*"))  # no temporary folder left behind


def test_a_record_limit_beyond_the_machines_memory_is_refused_before_reading(
        ingested: tuple[Path, dict[str, bytes]]) -> None:
    """max_record_bytes: 1e9 with a 200 MB line once reached 5.7 GB; a limit whose one record
    could not be held here is refused before any file is read."""
    raw, before = ingested
    corpus = raw.parent / "corpus.txt"
    text = f"base:\n  seed: 1\ningest:\n  source: {corpus}\n  max_record_bytes: 1000000000000\n"
    result = ingest_with(text.encode("utf-8"), raw.parent)
    assert result.returncode == 2
    line = one_error_line(result.stderr, "ingest")
    assert ("ingest.max_record_bytes=1,000,000,000,000: one record that long needs about "
            "5,722,046 MiB") in line, line
    assert "more than this machine's available memory (" in line and line.endswith("): lower it")
    assert snapshot(raw.parent) == before


def test_an_empty_split_is_flagged_where_it_is_made(params_file: Callable[..., Path], tmp_path: Path) -> None:
    """Three documents once gave an empty test split that nothing upstream flagged; evaluate
    then had nothing to measure. Two documents fill at most two of the three splits."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    result = ingest(params_file(), tmp_path / "raw", corpus, tmp_path)
    assert result.returncode == 0
    metrics = read_metrics(tmp_path / "ingest.json")
    empty = [s for s in ("train", "validation", "test") if not metrics.get(f"docs_{s}")]
    assert empty
    for split in empty:
        assert re.search(rf"WARNING lmmem\S*: the {split} split is empty \(2 documents in all\): stages "
                         r"that read it will refuse it", result.stderr), result.stderr[-2000:]
