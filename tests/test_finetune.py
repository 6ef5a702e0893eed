"""The finetune stage on the tiny profile: each method trains a classifier from the trained
model with the dry run's estimate beside the meter in every category, writes what stock
transformers and peft load, and bad input stops with one line and no partial output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from stages.finetune.tasks import FINETUNE_CATEGORIES
from tests.conftest import deep_update, one_error_line, read_metrics, run_cli, tiny_params
from tests.test_compress import trained_model

RUNS = ("full", "head", "lora", "qlora")


def finetune_args(params: Path, tokens: Path, model: Path, work: Path, name: str) -> list[str]:
    return ["--params", str(params), "--run", name, "--tokens", str(tokens), "--model", str(model),
            "--out", str(work / "finetune" / name), "--metrics", str(work / "metrics" / f"{name}.json")]


def write_params(path: Path, **changes: Any) -> Path:
    path.write_text(yaml.safe_dump(deep_update(tiny_params(), changes), allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model(tokens, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def tuned(tokens: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every run of the tiny profile, each in a process of its own (`python -m stages.finetune`)."""
    work = tmp_path_factory.mktemp("finetune")
    params = write_params(work / "params.yaml")
    for name in RUNS:
        result = run_cli("finetune", finetune_args(params, tokens, model, work, name))
        assert result.returncode == 0, result.stderr
    return work


def test_each_method_is_measured_by_category_beside_its_estimate(tuned: Path) -> None:
    m = {name: read_metrics(tuned / "metrics" / f"{name}.json") for name in RUNS}
    for name, metrics in m.items():
        assert metrics["steps"] == 6 and metrics["run"] == name and metrics["baseline"] == "full"
        for category in [*FINETUNE_CATEGORIES, "total"]:  # the dry run within 2 % of the meter in each
            measured, estimated = metrics[f"mem_{category}_peak_mib"], metrics[f"est_{category}_peak_mib"]
            assert estimated == pytest.approx(measured, rel=0.02, abs=1e-3), (name, category)
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["test_docs"] > 0
        assert len(metrics["confusion"]) == len(metrics["labels"]) >= 2
        assert sum(map(sum, metrics["confusion"])) == metrics["test_docs"]
    full, head, lora, qlora = (m[n] for n in RUNS)
    # full fine-tuning: every weight trains (frozen: the rotary table, a buffer of 64 bytes); gradients
    # and AdamW's two moments for all of it
    assert full["mem_frozen_peak_mib"] < 1e-3 < full["mem_trainable_peak_mib"]
    assert full["mem_optimizer_peak_mib"] == pytest.approx(2 * full["mem_trainable_peak_mib"], rel=0.01)
    # head: the body is frozen, with no gradients or state for it
    assert head["mem_frozen_peak_mib"] == pytest.approx(full["mem_trainable_peak_mib"], rel=0.01)
    assert head["mem_gradients_peak_mib"] < 0.01 * full["mem_gradients_peak_mib"]
    # lora: the adapters and their state; the body as it was, frozen
    assert lora["mem_adapters_peak_mib"] > 0 and lora["params_adapters"] > 0
    assert lora["mem_optimizer_peak_mib"] < 0.2 * full["mem_optimizer_peak_mib"]
    # qlora: the same adapters over a body held in 4 bits (and int8 where rows are not whole NF4 blocks)
    assert qlora["mem_adapters_peak_mib"] == lora["mem_adapters_peak_mib"]
    assert qlora["mem_frozen_peak_mib"] < 0.3 * lora["mem_frozen_peak_mib"]
    assert qlora["mem_total_peak_mib"] < lora["mem_total_peak_mib"] < full["mem_total_peak_mib"]


def test_the_outputs_load_with_stock_transformers_and_peft(tuned: Path, tokens: Path, model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from stages.common.core.schema import TokensMeta, read_typed
    from stages.finetune.tasks import Classification

    meta = read_typed(tokens / "meta.json", TokensMeta)
    task = Classification(meta, tokens, model, max_tokens=32)
    rows = task.rows(task.test, np.flatnonzero(task.test.labels >= 0)[:16])

    def logits(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return task.logits(m.eval(), rows)

    full = AutoModelForSequenceClassification.from_pretrained(str(tuned / "finetune" / "full" / "classifier"))
    assert full.config.num_labels == len(meta.labels) and full.config.id2label[0] == meta.labels[0]
    assert (tuned / "finetune" / "full" / "classifier" / "tokenizer.json").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=len(meta.labels),
                                                              pad_token_id=meta.special_ids.pad)
    adapted = PeftModel.from_pretrained(base, str(tuned / "finetune" / "lora" / "adapter"))
    merged = AutoModelForSequenceClassification.from_pretrained(str(tuned / "finetune" / "lora" / "merged"))
    assert torch.allclose(logits(adapted), logits(merged), atol=1e-5)  # merge_and_unload: the same classifier
    config = json.loads((tuned / "finetune" / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and "score" in config["modules_to_save"]
    # the adapter changed the model: its predictions are not the fresh classifier's
    fresh = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=len(meta.labels),
                                                               pad_token_id=meta.special_ids.pad)
    assert not torch.allclose(logits(fresh), logits(merged), atol=1e-4)


def test_nf4_holds_a_weight_within_its_levels_and_the_gradient_reaches_the_input() -> None:
    from stages.common.weights.frozen import NF4, FrozenLinear, nf4_dequantize, nf4_quantize

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=g)
    packed, absmax = nf4_quantize(weight)
    assert packed.dtype == torch.uint8 and packed.numel() == weight.numel() // 2 and absmax.numel() == 96 * 2
    back = nf4_dequantize(packed, absmax, weight.shape)
    blocks, levels = weight.reshape(-1, 64), torch.tensor(NF4)
    # each weight became the nearest level of its block (scaled by the block's absmax)
    gaps = (levels[1:] - levels[:-1]).max() / 2
    assert ((back - weight).reshape(-1, 64).abs() <= gaps * blocks.abs().amax(1, keepdim=True) + 1e-6).all()
    layer = FrozenLinear(weight, None, "nf4")
    x = torch.randn(4, 128, generator=g, requires_grad=True)
    y = layer(x)
    assert torch.allclose(y, x @ back.t(), atol=1e-5)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(4, 96) @ back, atol=1e-5)
    assert [name for name, _ in layer.named_parameters()] == []  # nothing there trains


@pytest.mark.parametrize("changes, run, expected", [
    ({"finetune": {"runs": {"bad": {"tune": "lora", "lora_targets": ["q_proj", "nope_proj"]}}}}, "bad",
     "lora_targets: nope_proj is not a Linear layer of this model (it has "),
    ({"finetune": {"runs": {"bad": {"tune": "lora", "lora_rank": 512}}}}, "bad",
     "lora_rank 512 is larger than model.layers.0.self_attn.q_proj (64 x 64): at most 64"),
    ({"finetune": {"runs": {"bad": {"tune": "all", "frozen_weights": "nf4"}}}}, "bad",
     "frozen_weights nf4 holds frozen weights, and tune all freezes none"),
    ({"finetune": {"runs": {"bad": {"steps": 3}}}}, "bad", "run 'bad' sets steps: the section sets them"),
    ({}, "nope", "finetune: no run 'nope' in finetune.runs (full, head, lora, qlora)"),
])
def test_a_run_that_cannot_be_made_is_one_line_and_leaves_the_previous_outputs(
        tuned: Path, tokens: Path, model: Path, tmp_path: Path, changes: dict[str, Any], run: str,
        expected: str) -> None:
    """Exit 2, one line, and the run's folder and metrics as they were (here: the full run's)."""
    params = write_params(tmp_path / "params.yaml", **changes)
    out, metrics = tuned / "finetune" / "full", tuned / "metrics" / "full.json"
    before = {p: p.read_bytes() for p in [*out.rglob("*"), metrics] if p.is_file()}
    args = ["--params", str(params), "--run", run, "--tokens", str(tokens), "--model", str(model), "--out",
            str(out),
            "--metrics", str(metrics)]
    result = run_cli("finetune", args)
    assert result.returncode == 2
    assert expected in one_error_line(result.stderr, "finetune")
    assert {p: p.read_bytes() for p in [*out.rglob("*"), metrics] if p.is_file()} == before


@pytest.mark.parametrize("labels, expected", [
    ("none", "has no labelled training documents"),
    ("one", "every labelled training document has the label"),
])
def test_a_corpus_a_classifier_cannot_learn_from_is_refused(tokens: Path, model: Path, tmp_path: Path,
                                                            labels: str, expected: str) -> None:
    corpus = tmp_path / "tokens"
    shutil.copytree(tokens, corpus)
    for split in ("train", "validation", "test"):
        path = corpus / f"{split}.labels.bin"
        values = np.fromfile(path, dtype=np.int32)
        (np.full_like(values, -1) if labels == "none" else np.where(values >= 0, 0, values)).tofile(path)
    params = write_params(tmp_path / "params.yaml")
    result = run_cli("finetune", finetune_args(params, corpus, model, tmp_path, "full"))
    assert result.returncode == 2 and expected in one_error_line(result.stderr, "finetune")
    assert not (tmp_path / "finetune" / "full").exists() and not (tmp_path / "metrics" / "full.json").exists()


def test_the_train_stage_refuses_fine_tuning_methods(tmp_path: Path) -> None:
    from stages.common.core.errors import StageError
    from stages.common.core.params import validate_section
    from stages.train import Params

    with pytest.raises(StageError, match="tune and frozen_weights are fine-tuning methods"):
        validate_section("train", {**tiny_params()["train"], "tune": "lora"}, Params)


def budget_only_adapters_meet(tokens: Path, model: Path, params: Path) -> float:
    """A budget that full fine-tuning cannot meet with every other move of the registry made,
    and that the same moves with the adapters meet: halfway between the two estimates."""
    from stages.common.core.params import load_params
    from stages.common.core.schema import TokensMeta, read_typed
    from stages.finetune import Params, run_params
    from stages.finetune.tasks import Classification
    from stages.train.estimate import predict_memory
    from stages.train.params import with_changes
    from stages.train.techniques import all_moves

    _, both = load_params(params, ("train", "finetune"), Params)
    p = run_params(both, "full", model)
    meta = read_typed(tokens / "meta.json", TokensMeta)
    task = Classification(meta, tokens, model, p.max_tokens)
    changes: dict[str, Any] = {}
    for move in all_moves(p):
        if "tune" not in move.changes:
            try:
                with_changes(p, {**changes, **move.changes})
                changes.update(move.changes)
            except ValueError:
                continue
    cpu = torch.device("cpu")
    floor = predict_memory(with_changes(p, changes), meta, cpu, 0, task)["est_total_peak_mib"]
    lora = predict_memory(with_changes(p, {**changes, "tune": "lora"}), meta, cpu, 0,
                          task)["est_total_peak_mib"]
    assert lora < 0.8 * floor  # the adapters save beyond what every other technique saves
    return round((floor + lora) / 2, 3)


@pytest.mark.parametrize("auto_fit", [False, True])
def test_over_budget_auto_fit_moves_to_adapters(tokens: Path, model: Path, tmp_path: Path,
                                                auto_fit: bool) -> None:
    """Over a budget that only the adapters meet: without auto_fit the run stops and names the
    moves that fit, the adapters among them; with it, the run trains with them, under budget."""
    params = write_params(tmp_path / "params.yaml")
    budget = budget_only_adapters_meet(tokens, model, params)
    params = write_params(tmp_path / "params.yaml", finetune={"runs": {"full": {
        "lr": 0.0003, "memory_budget_mib": budget, "auto_fit": auto_fit}}})
    result = run_cli("finetune", finetune_args(params, tokens, model, tmp_path, "full"))
    if not auto_fit:
        assert result.returncode == 2
        line = one_error_line(result.stderr, "finetune")
        assert f"more than train.memory_budget_mib={budget:g}" in line and "tune=lora" in line
        assert not (tmp_path / "finetune" / "full").exists()
        return
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path / "metrics" / "full.json")
    assert metrics["tune"] == "lora" and "tune=lora" in metrics["auto_fit_changes"]
    assert metrics["mem_total_peak_mib"] <= budget  # the meter's, not the estimate's
    assert (tmp_path / "finetune" / "full" / "adapter" / "adapter_config.json").is_file()


def test_a_test_split_that_cannot_score_two_classes_is_refused_and_a_partial_one_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import numpy as np

    from stages.common.core.errors import StageError
    from stages.finetune.tasks import scorable_classes

    labels = ["neg", "pos", "mixed"]
    with pytest.raises(StageError,
                       match=r"the test split of .* can score 1 of the 3 classes \('neg'\): accuracy "
                       r"and F1 need at least two"):
        scorable_classes(np.array([0, 0, -1]), labels, tmp_path)
    with pytest.raises(StageError, match=r"can score 0 of the 3 classes \(none\)"):
        scorable_classes(np.array([-1, -1]), labels, tmp_path)
    with caplog.at_level("WARNING"):
        assert scorable_classes(np.array([1, 0, 1]), labels, tmp_path) == 2
    assert "the test split scores 2 of the 3 classes (none of 'mixed')" in caplog.text
    assert scorable_classes(np.array([2, 1, 0]), labels, tmp_path) == 3
