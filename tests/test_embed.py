"""embed: Word2Vec on the token files, loadable vectors, the aligned matrix, evaluation, refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import one_error_line, read_metrics, run_stage


def run_to_tokens(params: Path, work: Path) -> Path:
    """ingest → clean → tokenize on the given params, in `work`; returns the tokens folder."""
    d = work / "data"
    assert run_stage("ingest", ["--params", str(params), "--out", str(d / "raw"),
                                "--metrics", str(d / "m/ingest.json")]) == 0
    assert run_stage("clean", ["--params", str(params), "--raw", str(d / "raw"), "--out", str(d / "clean"),
                               "--metrics", str(d / "m/clean.json")]) == 0
    assert run_stage("tokenize", ["--params", str(params), "--clean", str(d / "clean"),
                                  "--out", str(d / "tokens"), "--metrics", str(d / "m/tokenize.json")]) == 0
    return d / "tokens"


def embed(params: Path, tokens: Path, out: Path) -> tuple[int, Path]:
    metrics = out.with_suffix(".json")
    rc = run_stage("embed", ["--params", str(params), "--tokens", str(tokens), "--out", str(out),
                             "--metrics", str(metrics)])
    return rc, metrics


@pytest.fixture(scope="module")
def en_news(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The Lee news corpus tokenized once for the module; returns (params file, tokens folder)."""
    import yaml

    from tests.conftest import deep_update, tiny_params

    work = tmp_path_factory.mktemp("en")
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(deep_update(tiny_params(), {
        "ingest": {"source": "builtin:en-news", "sample": 1.0},
        "tokenize": {"gold": ""},
        "embed": {"probe_words": ["fire", "notaword"], "epochs": 5},
    }), allow_unicode=True))
    return params, run_to_tokens(params, work)


def test_vectors_load_and_the_aligned_matrix_matches(en_news: tuple[Path, Path], tmp_path: Path) -> None:
    from gensim.models import KeyedVectors

    params, tokens = en_news
    rc, metrics_path = embed(params, tokens, tmp_path / "embed")
    assert rc == 0
    out = tmp_path / "embed"
    wv = KeyedVectors.load_word2vec_format(str(out / "vectors.bin"), binary=True)
    vocab = json.loads((tokens / "vocab.json").read_text())["words"]
    aligned = np.load(out / "aligned.npy")
    assert aligned.shape == (len(vocab), 32) and aligned.dtype == np.float32
    assert not aligned[0].any()  # pad
    fire = vocab.index("fire")
    np.testing.assert_array_equal(aligned[fire], wv["fire"])
    m = read_metrics(metrics_path)
    assert m["w2v_vocab_size"] == len(wv) and m["deterministic"] is True
    assert m["vocab_coverage"] == pytest.approx(sum(w in wv.key_to_index for w in vocab) / len(vocab))
    neighbours = json.loads((out / "neighbours.json").read_text())
    assert list(neighbours) == ["fire"] and len(neighbours["fire"]) == 10
    assert (m["probes"], m["probes_found"]) == (2, 1)


def test_english_evaluation_sets_report_coverage(en_news: tuple[Path, Path], tmp_path: Path) -> None:
    params, tokens = en_news
    rc, metrics_path = embed(params, tokens, tmp_path / "embed")
    assert rc == 0
    m = read_metrics(metrics_path)
    assert m["analogy_questions"] == 19544  # questions-words.txt as gensim ships it
    assert 0 < m["analogy_coverage"] < 0.2 and 0.0 <= m["analogy_accuracy"] <= 1.0
    assert 0 < m["similarity_oov_ratio"] < 1 and -1 <= m["similarity_spearman"] <= 1


def test_same_seed_same_bytes_and_another_seed_differs(en_news: tuple[Path, Path], tmp_path: Path) -> None:
    params, tokens = en_news
    assert embed(params, tokens, tmp_path / "a")[0] == 0
    assert embed(params, tokens, tmp_path / "b")[0] == 0
    assert (tmp_path / "a/vectors.bin").read_bytes() == (tmp_path / "b/vectors.bin").read_bytes()
    other = tmp_path / "other.yaml"
    other.write_text(params.read_text().replace("seed: 1337", "seed: 7"))
    assert embed(other, tokens, tmp_path / "c")[0] == 0
    assert (tmp_path / "a/vectors.bin").read_bytes() != (tmp_path / "c/vectors.bin").read_bytes()


def test_min_count_above_every_word_is_refused(en_news: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    params, tokens = en_news
    bad = tmp_path / "p.yaml"
    bad.write_text(params.read_text().replace("min_count: 2", "min_count: 1000000"))
    rc, metrics = embed(bad, tokens, tmp_path / "embed")
    assert rc == 2
    assert "embed.min_count" in one_error_line(capsys.readouterr().err, "embed")
    assert not (tmp_path / "embed").exists() and not metrics.exists()


def test_missing_tokens_are_refused(params_file: Callable[..., Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = embed(params_file(), tmp_path / "none", tmp_path / "embed")
    assert rc == 2
    assert "missing input" in one_error_line(capsys.readouterr().err, "embed")
