"""evaluate: every model measured the same way, each in its own process; rows for what could
not be made or loaded; classification scores checked against a hand computation."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.common.classify import scores
from tests.conftest import deep_update, one_error_line, read_metrics, run_stage, tiny_params
from tests.test_compress import trained_model

VARIANTS = {"fp16": {"method": "cast", "dtype": "float16"},
            "int8": {"method": "int8_weight_only", "embeddings": True},
            "prune50": {"method": "prune_magnitude", "sparsity": 0.5},
            "int4-256": {"method": "int4_weight_only", "group_size": 256}}  # unsupported: 64 inputs


@pytest.fixture(scope="module")
def made(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained model and its variants, one of them broken on disk after the fact."""
    work = tmp_path_factory.mktemp("eval")
    model = trained_model(tokens, work)
    params = work / "compress.yaml"
    data = tiny_params()
    data["compress"]["variants"] = VARIANTS  # replaced, not merged with the profile's
    params.write_text(yaml.safe_dump(data, allow_unicode=True))
    assert run_stage("compress", ["--params", str(params), "--model", str(model), "--tokens", str(tokens),
                                  "--out", str(work / "compressed"), "--metrics", str(work / "compress.json")]) == 0
    shutil.copytree(work / "compressed" / "fp16", work / "compressed" / "broken")
    (work / "compressed" / "broken" / "model.safetensors").write_bytes(b"not a safetensors file")
    return {"model": model, "compressed": work / "compressed", "tokens": tokens, "embed": tokens.parent / "embed",
            "work": work}


def evaluate(made: dict[str, Path], out: Path, **overrides: Any) -> tuple[int, dict[str, Any]]:
    params = out.parent / f"{out.name}.yaml"
    params.write_text(yaml.safe_dump(deep_update(tiny_params(), {"evaluate": overrides}), allow_unicode=True))
    metrics = out.parent / f"{out.name}.json"
    rc = run_stage("evaluate", ["--params", str(params), "--model", str(made["model"]),
                                "--compressed", str(made["compressed"]), "--tokens", str(made["tokens"]),
                                "--embed", str(made["embed"]), "--out", str(out), "--metrics", str(metrics)])
    return rc, read_metrics(metrics) if rc == 0 else {}


@pytest.fixture(scope="module")
def evaluated(made: dict[str, Path]) -> tuple[dict[str, Any], Path]:
    out = made["work"] / "eval"
    rc, metrics = evaluate(made, out)
    assert rc == 0
    return metrics, out


def test_every_model_gets_a_row_measured_the_same_way(evaluated: tuple[dict[str, Any], Path]) -> None:
    m, out = evaluated
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(rows) == ["model", "broken", "fp16", "int4-256", "int8", "prune50", "word2vec-bow"]
    assert [rows[n]["status"] for n in rows] == ["ok", "failed", "ok", "unsupported", "ok", "ok", "ok"]
    assert "not a multiple of group_size 256" in rows["int4-256"]["reason"]  # no layer fits int4
    assert rows["broken"]["reason"].startswith(str(out.parent / "compressed" / "broken"))
    base = rows["model"]
    for name in ("fp16", "int8", "prune50"):
        r = rows[name]
        assert r["val_ppl"] > 1 and 0 < r["top1"] <= r["top5"] <= 1
        assert r["tensor_peak_mib"] > 0 and r["rss_peak_mib"] > 0 and r["ms_per_token_b1"] > 0
    assert rows["fp16"]["val_ppl"] == pytest.approx(base["val_ppl"], rel=0.01)
    assert rows["int8"]["val_ppl"] == pytest.approx(base["val_ppl"], rel=0.02)
    assert rows["int8"]["bytes_on_disk"] < 0.3 * base["bytes_on_disk"]
    # int8 weights take a quarter of the fp32 bytes in the inference peak too
    assert rows["int8"]["tensor_weights_mib"] < 0.3 * base["tensor_weights_mib"]
    assert rows["prune50"]["nonzero_params"] < 0.9 * rows["prune50"]["params"]
    # flat metrics for dvc exp show; the table for dvc plots
    assert m["int8_val_ppl"] == pytest.approx(rows["int8"]["val_ppl"], rel=1e-5) and m["failed"] == 1
    with (out / "table.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == list(rows) and table[0]["size_ratio"] == "1"
    generations = (out / "generations.md").read_text()
    for prompt in tiny_params()["evaluate"]["prompts"]:
        assert f"## {prompt}" in generations
    assert generations.count("- **int8**: ") == len(tiny_params()["evaluate"]["prompts"])


def test_sentiment_probe_and_its_baseline(evaluated: tuple[dict[str, Any], Path]) -> None:
    m, out = evaluated
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    for name in ("model", "int8", "word2vec-bow"):
        confusion = rows[name]["cls_confusion"]
        assert sum(map(sum, confusion)) == 47  # the tiny profile's labelled test documents
        assert rows[name]["cls_accuracy"] == pytest.approx((confusion[0][0] + confusion[1][1]) / 47)
        assert rows[name]["cls_accuracy"] > 0.55  # better than the majority class (24 of 47)
    assert m["word2vec-bow_cls_f1_macro"] == pytest.approx(rows["word2vec-bow"]["cls_f1_macro"], rel=1e-5)


def test_classification_scores_match_a_hand_computation() -> None:
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 0, 1, 1, 2, 0, 1, 2]
    s = scores(y_true, y_pred, 3)
    assert s["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 1, 2]]
    assert s["accuracy"] == pytest.approx(6 / 9)
    # class 0: P 2/3 R 2/3; class 1: P 2/4 R 2/2; class 2: P 2/2 R 2/4
    assert s["precision_macro"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert s["recall_macro"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert s["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 2 / 3) / 3)


def test_unknown_variant_and_missing_model_are_refused(made: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = evaluate(made, tmp_path / "eval", variants=["int8", "int9"])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, "evaluate")
    assert "evaluate.variants: no variant named 'int9'" in line and "there: broken, fp16" in line
    assert not (tmp_path / "eval").exists()
    rc, _ = evaluate({**made, "model": tmp_path / "nothing"}, tmp_path / "eval")
    assert rc == 2 and "holds no trained model" in one_error_line(capsys.readouterr().err, "evaluate")


def test_every_model_failing_is_an_error_that_keeps_the_previous_results(
        made: dict[str, Path], evaluated: tuple[dict[str, Any], Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Once exit 0 with every row "failed", overwriting good results."""
    out = tmp_path / "eval"
    shutil.copytree(evaluated[1], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "model"
    shutil.copytree(made["model"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    rc, _ = evaluate({**made, "model": broken}, out, variants=["broken"])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, "evaluate")
    assert "no model could be measured (2 tried; model: " in line and "; broken: " in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_lstm_baseline_is_evaluated_like_the_transformers(tokens: Path, tmp_path: Path) -> None:
    model = trained_model(tokens, tmp_path / "lstm", family="lstm")
    data = tiny_params()
    data["compress"]["variants"] = {"int8": {"method": "int8_weight_only", "embeddings": True},
                                    "structured": {"method": "prune_structured", "heads": 0.5}}
    params = tmp_path / "compress.yaml"
    params.write_text(yaml.safe_dump(data, allow_unicode=True))
    assert run_stage("compress", ["--params", str(params), "--model", str(model), "--tokens", str(tokens),
                                  "--out", str(tmp_path / "compressed"), "--metrics", str(tmp_path / "c.json")]) == 0
    made = {"model": model, "compressed": tmp_path / "compressed", "tokens": tokens, "embed": tokens.parent / "embed"}
    rc, m = evaluate(made, tmp_path / "eval", classify=False)
    assert rc == 0
    assert (m["model_status"], m["int8_status"], m["structured_status"]) == ("ok", "ok", "unsupported")
    assert m["int8_val_ppl"] == pytest.approx(m["model_val_ppl"], rel=0.02)
    # embedding and tied head in int8 (stored once); nn.LSTM's own matrices are not Linear layers and stay fp32
    assert m["int8_bytes_on_disk"] < 0.6 * m["model_bytes_on_disk"] and m["model_ms_per_token_b1"] > 0
