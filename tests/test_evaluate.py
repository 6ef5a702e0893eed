"""evaluate: every model measured the same way, each in its own process; rows for what could
not be made or loaded; classification scores checked against a hand computation."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from stages.common.core.eval_results import eval_rows
from stages.common.harness.workers import fresh_processes
from stages.common.modelling.classify import scores
from stages.common.modelling.generation import repetition
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
                                  "--out", str(work / "compressed"), "--metrics",
                                  str(work / "compress.json")]) == 0
    shutil.copytree(work / "compressed" / "fp16", work / "compressed" / "broken")
    (work / "compressed" / "broken" / "model.safetensors").write_bytes(b"not a safetensors file")
    return {"model": model, "compressed": work / "compressed", "tokens": tokens,
            "embed": tokens.parent / "embed",
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
    for row in rows.values():  # the machine's figures are in the metrics only: results.json is portable
        assert all(row.get(k) is None for k in ("load_seconds", "ms_per_token_b1", "rss_peak_mib", "seconds",
                                                "kv8_ms_per_token"))
    assert m["model_ms_per_token_b1"] > 0 and m["model_rss_peak_mib"] > 0
    rows = {r["name"]: r for r in eval_rows(out / "results.json", out.parent / f"{out.name}.json")}
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
    # sampled, greedy
    assert generations.count("- **int8**: ") == 2 * len(tiny_params()["evaluate"]["prompts"])
    # generation memory: the grid of tests/params.tiny.yaml, each KV cache its closed form; the tiny
    # model's at batch 8 × 32 tokens: 2 (K, V) × 2 layers × 8 × 32 × 4 heads × 16 values × 4 bytes
    for name in ("model", "fp16", "int8", "prune50"):
        r = rows[name]
        assert [(p["batch"], p["context"]) for p in r["generation"]] == [(1, 16), (8, 16), (1, 32), (8, 32)]
        assert r["kv_cache_error"] == 0.0 and m[f"{name}_kv_cache_mib"] == r["generation"][-1][
            "kv_cache_end_mib"]
        last = r["max_batch"][-1]
        assert last["context"] == 32 and last["checked_mib"] <= last["budget_mib"] == 4.0
        assert m[f"{name}_max_batch_t32"] == last["batch"] > 8
    assert rows["model"]["generation"][-1]["kv_cache_end_mib"] * 2**20 == 262_144
    assert rows["fp16"]["generation"][-1]["kv_cache_end_mib"] * 2**20 == 131_072  # 2 bytes a value
    # the trained model's int8 / int4 caches at batch 8 × 32: 2 × 2 layers × 8 × 32 × 4 heads × (16 values of
    # a byte or 8 bytes of two, + a 4-byte scale)
    quant = {p["bits"]: p for p in rows["model"]["kv_quant"]}
    assert list(quant) == [0, 8, 4] and all("kv_quant" not in rows[n] for n in ("fp16", "int8", "prune50"))
    assert [quant[b]["kv_cache_end_mib"] * 2**20 for b in (0, 8, 4)] == [262_144, 81_920, 49_152]
    assert m["model_kv8_cache_saving"] == 3.2 and m["model_kv4_cache_saving"] == pytest.approx(
        262_144 / 49_152)
    assert m["model_kv8_ppl_ratio"] == pytest.approx(1,
                                                     abs=0.01) and m["model_kv4_ppl_ratio"] == pytest.approx(
                                                         1, abs=0.1)
    assert quant[0]["tokens"] == 16 * 32 and m["model_kv8_ms_per_token"] > 0 and m[
        "model_kv4_ms_per_token"] > 0
    # prune50 (half of each block matrix zeroed) kept sparse: 2 layers × 7 matrices, the same logits, fewer
    # bytes
    sparse = rows["prune50"]["sparse"]
    assert sparse["modules"] == 14 and sparse["max_logit_diff"] < 1e-4
    assert sparse["weights_mib"] < sparse["dense_weights_mib"] == rows["prune50"]["tensor_weights_mib"]
    assert sparse["generation_peak_b1_mib"] < sparse["dense_generation_peak_b1_mib"]
    assert sparse["forward_peak_b1_mib"] < sparse["dense_forward_peak_b1_mib"]
    assert all(rows[n].get("sparse") is None for n in ("model", "fp16", "int8"))  # nothing pays: left dense
    assert m["prune50_sparse_ms_per_token_b1"] > 0 and "model_sparse_ms_per_token_b1" not in m
    assert m["prune50_sparse_forward_peak_ratio"] == pytest.approx(
        sparse["forward_peak_mib"] / rows["prune50"]["tensor_peak_mib"], rel=1e-5)
    # the trained model's largest generation again, block by block (data/eval/timeline.csv): the prefill and
    # the last two decode steps, its largest sample the grid's peak at that point
    with (out / "timeline.csv").open() as f:
        timeline = list(csv.DictReader(f))
    steps = {int(r["step"]) for r in timeline}
    assert steps == {0, max(steps) - 1, max(steps)} and max(steps) > 2
    assert max(sum(float(v) for k, v in r.items() if k.endswith("_mib")) for r in timeline) == pytest.approx(
        rows["model"]["generation"][-1]["peak_mib"], rel=1e-5)
    assert {"weights_mib", "layers.0_mib", "layers.1_mib", "lm_head_mib"} <= set(timeline[0])
    # each measuring process's peak RSS beside its start and its tensors (the prediction: test_allocator)
    for name in ("model", "fp16", "int8", "prune50"):
        assert m[f"{name}_rss_start_mib"] < m[f"{name}_rss_peak_mib"]
        assert m[f"{name}_rss_tensor_mib"] >= rows[name]["generation"][-1]["peak_mib"]
    for name in ("model", "fp16", "int8", "prune50"):  # greedy continuations and their repetition
        assert len(rows[name]["greedy"]) == len(tiny_params()["evaluate"]["prompts"])
        assert 0 <= rows[name]["greedy_repetition"] < 1
        assert m[f"{name}_greedy_repetition"] == pytest.approx(rows[name]["greedy_repetition"])


def test_repetition_counts_the_tokens_that_came_before() -> None:
    assert repetition([5, 6, 7, 8]) == 0.0
    assert repetition([9, 9, 9, 9, 9]) == pytest.approx(4 / 5)  # one token, five times
    assert repetition([1, 2, 1, 3, 1, 2]) == pytest.approx(1 - 3 / 6)
    assert repetition([]) == 0.0


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


@pytest.mark.parametrize("overrides, message", [
    ({"generation_contexts": [16, 33]},
     ("evaluate.generation_contexts: [33] outside 8 (the prompt) to 32 (the "
      "model's context)")),
    ({"generation_batches": [4, 4]}, "evaluate.generation_batches: [4, 4] needs two different sizes"),
    ({"kv_cache_bits": [8, 3]}, "evaluate.kv_cache_bits: [3] not a KV cache's bits; 8 or 4"),
])
def test_a_generation_grid_the_model_cannot_hold_is_refused_before_any_model_loads(
        made: dict[str, Path], evaluated: tuple[dict[str, Any], Path], tmp_path: Path,
        overrides: dict[str, Any],
        message: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    shutil.copytree(evaluated[1], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, _ = evaluate(made, out, **overrides)
    assert rc == 2 and message in one_error_line(capsys.readouterr().err, "evaluate")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def mark(folder: str, i: int) -> int:
    """A task of the pool below: a file named after it once it has run."""
    time.sleep(0.2)
    (Path(folder) / str(i)).touch()
    return i


def test_a_stopped_pool_cancels_the_queued_tasks_and_kills_the_running_one(tmp_path: Path) -> None:
    """Once a Ctrl-C in evaluate ran every queued model to the end before the stage could exit."""
    with pytest.raises(KeyboardInterrupt), fresh_processes(1, preload=[]) as pool:
        futures = [pool.submit(mark, str(tmp_path), i) for i in range(6)]
        futures[0].result()
        raise KeyboardInterrupt
    time.sleep(1)  # what a surviving worker would still do shows by now
    assert sorted(p.name for p in tmp_path.iterdir()) in (["0"], ["0", "1"])  # the one running may have ended


def test_ctrl_c_stops_the_evaluation_and_keeps_the_previous_results(
        made: dict[str, Path], evaluated: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    out = tmp_path / "eval"
    shutil.copytree(evaluated[1], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    params = tmp_path / "one-at-a-time.yaml"  # one worker: four models wait in the queue
    params.write_text(yaml.safe_dump(deep_update(tiny_params(), {"evaluate": {"workers": 1}}),
                                     allow_unicode=True))
    stage = subprocess.Popen(
        [sys.executable, "-m", "stages.evaluate", "--params", str(params), "--model", str(made["model"]),
         "--compressed", str(made["compressed"]), "--tokens", str(made["tokens"]), "--embed",
         str(made["embed"]),
         "--out", str(out), "--metrics", str(tmp_path / "eval.json")],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal: tests run in
    # the background inherit SIGINT ignored, and Python keeps ignoring a signal ignored at its start
    assert stage.stderr is not None
    seen = []
    for line in stage.stderr:  # until the models are being measured
        seen.append(line)
        if "lmmem.evaluate: measuring" in line:
            break
    assert seen and "lmmem.evaluate: measuring" in seen[-1], "".join(seen)
    stage.send_signal(signal.SIGINT)  # to the stage alone, as `python -m stages` forwards a Ctrl-C
    seen += stage.stderr.readlines()
    assert stage.wait(timeout=120) == 130 and "lmmem evaluate: interrupted\n" in seen, "".join(seen)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not (tmp_path / "eval.json").exists()


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
                                  "--out", str(tmp_path / "compressed"), "--metrics",
                                  str(tmp_path / "c.json")]) == 0
    made = {"model": model, "compressed": tmp_path / "compressed", "tokens": tokens,
            "embed": tokens.parent / "embed"}
    rc, m = evaluate(made, tmp_path / "eval", classify=False)
    assert rc == 0
    assert (m["model_status"], m["int8_status"], m["structured_status"]) == ("ok", "ok", "unsupported")
    assert m["int8_val_ppl"] == pytest.approx(m["model_val_ppl"], rel=0.02)
    # embedding and tied head in int8 (stored once); nn.LSTM's own matrices are not Linear layers and stay
    # fp32
    assert m["int8_bytes_on_disk"] < 0.6 * m["model_bytes_on_disk"] and m["model_ms_per_token_b1"] > 0


def test_a_thousand_label_corpus_gets_no_probe_and_no_megabyte_matrices(made: dict[str, Path],
                                                                        capfd: Any) -> None:
    """1,000 labels over a few hundred training documents once made a 33 MB results.json (a
    1000 x 1000 confusion matrix per model) and a probe whose accuracy meant nothing, with no
    warning."""
    tokens = made["work"] / "tokens-1000-labels"
    shutil.copytree(made["tokens"], tokens)
    meta = json.loads((tokens / "meta.json").read_text(encoding="utf-8"))
    meta["labels"] = [f"label-{i}" for i in range(1000)]
    (tokens / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        count = len(np.fromfile(tokens / f"{split}.labels.bin", dtype=np.int32))
        rng.integers(0, 1000, count, dtype=np.int32).tofile(tokens / f"{split}.labels.bin")
    out = made["work"] / "eval-1000"
    rc, metrics = evaluate({**made, "tokens": tokens}, out, variants=["fp16"])
    assert rc == 0
    err = capfd.readouterr().err
    assert re.search(r"WARNING lmmem\S*: no sentiment probe: 1,000 labels and \d+ labelled training "
                     r"documents \([\d.]+ a label; it needs at least 5 a label\)", err), err[-2000:]
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["model", "fp16"] and all(r["status"] == "ok" for r in rows)
    assert all(r.get("cls_accuracy") is None and r.get("cls_confusion") is None for r in rows)
    assert (out / "results.json").stat().st_size < 100_000
    assert not any(key.endswith("cls_accuracy") for key in metrics)


def test_the_confusion_matrix_is_kept_up_to_fifty_labels_only() -> None:
    from stages.common.modelling.classify import scores

    assert scores([0, 1, 1], [0, 1, 0], 2)["confusion"] == [[1, 0], [1, 1]]
    assert len(scores([0, 49], [0, 49], 50)["confusion"]) == 50
    wide = scores([0, 50], [0, 50], 51)
    assert wide["confusion"] is None and wide["accuracy"] == 1.0


def damaged_copy(made: dict[str, Path], name: str, damage: Any) -> Path:
    """A copy of the compressed variants with the fp16 variant's weight file damaged."""
    compressed = made["work"] / f"compressed-{name}"
    shutil.copytree(made["compressed"], compressed)
    damage(next((compressed / "fp16").glob("*.safetensors")))
    return compressed


def flip_a_byte(weights: Path) -> None:
    data = bytearray(weights.read_bytes())
    data[len(data) - 1000] ^= 0xFF  # inside the last tensor's values: the file still parses
    weights.write_bytes(bytes(data))


def write_a_nan(weights: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    # as a folder written before digests: no digest to catch it
    (weights.parent.parent / ".lmmem-out").unlink()


@pytest.mark.parametrize("damage, reason", [
    (flip_a_byte, "does not match the digest written with it: the file is damaged"),
    (write_a_nan, "weight tensors hold NaN or infinite values"),
])
def test_damaged_weights_are_a_failed_row_not_nan_figures(made: dict[str, Path], damage: Any,
                                                          reason: str) -> None:
    """Weights with flipped bytes once loaded, gave NaN and exited 0."""
    compressed = damaged_copy(made, damage.__name__, damage)
    out = made["work"] / f"eval-{damage.__name__}"
    rc, _ = evaluate({**made, "compressed": compressed}, out, variants=["fp16"])
    assert rc == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    assert rows["model"]["status"] == "ok"
    assert rows["fp16"]["status"] == "failed" and reason in rows["fp16"]["reason"], rows["fp16"]
