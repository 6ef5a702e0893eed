"""train: models train and load with stock transformers; each memory technique moves the
category it should; the same seed gives the same model; impossible combinations are refused."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import (deep_update, kill_at_checkpoint, one_error_line, read_metrics, run_cli,
                            run_stage, tiny_params, train_args)

TIMING = {"seconds", "peak_rss_mib", "step_ms_median", "tokens_per_sec", "rss_start_mib", "rss_predicted_mib",
          "rss_prediction_error"}  # the process's memory: the machine's, as its times are


@pytest.fixture
def train(tokens: Path, tmp_path: Path) -> Callable[..., tuple[int, dict[str, Any], Path]]:
    """train(name, **overrides) → (exit code, metrics, model folder)."""

    def go(name: str = "run", **train: Any) -> tuple[int, dict[str, Any], Path]:
        work = tmp_path / name
        work.mkdir()
        (work / "params.yaml").write_text(yaml.safe_dump(deep_update(tiny_params(), {"train": train}),
                                                         allow_unicode=True))
        rc = run_stage("train", train_args(work, tokens))
        return rc, read_metrics(work / "train.json") if rc == 0 else {}, work / "model"

    return go


def test_llama_trains_and_loads_with_stock_transformers(train: Callable[..., Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    rc, m, model_dir = train()
    assert rc == 0
    assert m["val_loss"] < 7.0 and m["train_loss"] < 7.0  # ln(vocab ~2500) = 7.8 untrained
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.num_parameters() == m["params_total"]
    generate = pipeline("text-generation", model=model, tokenizer=tok)
    out = generate("这 本书", max_new_tokens=5, do_sample=True, return_tensors=True)
    assert len(out[0]["generated_token_ids"]) == 2 + 5
    steps = (model_dir.parent / "plots" / "steps.csv").read_text().splitlines()
    assert steps[0] == "step,train_loss,val_loss,lr,step_ms,sparsity,rss_mib,tensor_peak_mib" and len(
        steps) == 1 + 30
    with (model_dir.parent / "plots" / "steps.csv").open() as f:
        rows = list(csv.DictReader(f))
    # the metered steps (the first 2) carry their tensor peak, the largest of which is the run's
    assert max(float(r["tensor_peak_mib"])
               for r in rows[:2]) == pytest.approx(m["mem_total_peak_mib"], rel=1e-5)
    assert all(r["tensor_peak_mib"] == "" for r in rows[2:])
    assert all(0 < float(r["rss_mib"]) < 4096 for r in rows)


def test_parameter_bytes_and_counts(train: Callable[..., Any]) -> None:
    rc, m, _ = train(optimizer="sgd")
    assert rc == 0
    vocab, width, layers, ffn = 2533, 64, 2, 192  # tiny profile; ffn = 8/3 × 64 rounded up to 64
    per_layer = 4 * width * width + 3 * width * ffn + 2 * width  # q, k, v, o; gate, up, down; 2 norms
    assert m["params_total"] == vocab * width + layers * per_layer + width  # tied head; final norm
    assert m["params_embedding"] == vocab * width
    # metrics keep 6 significant digits of MiB: about 10 bytes here
    rope = 2 * (64 // 4 // 2) * 4  # RoPE's inv_freq and original_inv_freq buffers: head_dim / 2 floats each
    assert m["mem_parameters_peak_mib"] * 2**20 == pytest.approx(m["params_total"] * 4 + rope, abs=16)
    # SGD with momentum keeps one buffer per parameter
    assert m["mem_optimizer_peak_mib"] * 2**20 == pytest.approx(m["params_total"] * 4, abs=16)
    assert m["mem_gradients_peak_mib"] * 2**20 == pytest.approx(m["params_total"] * 4, abs=16)


def test_same_seed_same_model_and_metrics(train: Callable[..., Any]) -> None:
    rc1, m1, d1 = train("a")
    rc2, m2, d2 = train("b")
    assert rc1 == rc2 == 0
    assert {k: v for k, v in m1.items()
            if k not in TIMING} == {k: v for k, v in m2.items() if k not in TIMING}
    assert (d1 / "model.safetensors").read_bytes() == (d2 / "model.safetensors").read_bytes()


def test_memory_techniques_move_their_category(train: Callable[..., Any]) -> None:
    base = train("fp32")[1]
    bf16 = train("bf16", precision="bf16")[1]
    fp16 = train("fp16", precision="fp16")[1]  # autocast with the gradient scaler
    ckpt = train("ckpt", activation_checkpointing=True)[1]
    # 1 block of 2
    half = train("ckpt-half", activation_checkpointing=True, activation_checkpointing_every=2)[1]
    keep_matmuls = train("ckpt-matmuls", activation_checkpointing=True,
                         activation_checkpointing_policy="save_matmuls")[1]
    micro = train("micro", micro_batch_size=2)[1]
    adafactor = train("adafactor", optimizer="adafactor")[1]
    chunk = train("chunked-loss", loss_chunk_tokens=64)[1]
    # in this toy model the logits (batch x context x vocab) are most of the activations and
    # checkpointing cannot drop them: it removes the blocks' share, about a third here
    assert ckpt["mem_activations_peak_mib"] < 0.75 * base["mem_activations_peak_mib"]
    assert ckpt["mem_activations_peak_mib"] < half["mem_activations_peak_mib"] < base[
        "mem_activations_peak_mib"]
    # selective: the matrix products kept, only pointwise work recomputed: between the two
    assert ckpt["mem_activations_peak_mib"] < keep_matmuls["mem_activations_peak_mib"] \
        < base["mem_activations_peak_mib"]
    assert micro["mem_activations_peak_mib"] < 0.4 * base["mem_activations_peak_mib"]
    assert micro["accumulation_steps"] == 4
    # autocast keeps bf16 copies of the weights and computes the loss in fp32: at this size
    # it changes the peak without lowering it (the measurement, not a wish, is the point)
    assert bf16["mem_total_peak_mib"] != base["mem_total_peak_mib"]
    assert adafactor["mem_optimizer_peak_mib"] < 0.5 * base["mem_optimizer_peak_mib"]
    # the chunked loss: the same training (to float rounding), without the whole logits (the
    # tiny model's 8 x 32 x 2533 of them, their log-softmax and gradients: most of its peak)
    assert chunk["val_loss"] == pytest.approx(base["val_loss"], abs=1e-3)
    assert chunk["mem_total_peak_mib"] < 0.8 * base["mem_total_peak_mib"]
    assert chunk["mem_temporaries_peak_mib"] < 0.5 * base["mem_temporaries_peak_mib"]
    # the dry run, every category
    for m in (base, bf16, fp16, ckpt, half, keep_matmuls, micro, adafactor, chunk):
        for category in ("total", "parameters", "gradients", "optimizer", "activations", "temporaries"):
            assert abs(m[f"est_error_{category}_peak_mib"]) < 0.02, (category, m)
    for m in (bf16, fp16, ckpt, micro):
        assert m["val_loss"] < 7.0
    assert adafactor["val_loss"] < math.log(2533)  # below a uniform guess: slower at this lr, but learning


def test_gpt2_and_lstm(train: Callable[..., Any]) -> None:
    from transformers import AutoModelForCausalLM

    from stages.common.modelling.models import load_lstm

    rc, m, model_dir = train("gpt2", model={"family": "gpt2"})
    assert rc == 0 and type(AutoModelForCausalLM.from_pretrained(str(
        model_dir))).__name__ == "GPT2LMHeadModel"
    rc, m, model_dir = train("lstm", model={"family": "lstm"})
    assert rc == 0 and m["val_loss"] < 7.5
    model = load_lstm(model_dir)
    assert sum(p.numel() for p in model.parameters()) == m["params_total"]
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 2533)


@pytest.mark.parametrize("train_params, message", [
    ({"batch_size": 8, "micro_batch_size": 3},
     "batch_size (8) must be a multiple of micro_batch_size (3)"),
    ({"model": {"family": "lstm"}, "activation_checkpointing": True},
     "activation_checkpointing: the lstm baseline"),
    ({"activation_checkpointing_policy": "save_matmuls"},
     ("activation_checkpointing_policy save_matmuls chooses what checkpointing keeps: set "
      "activation_checkpointing: true")),
    ({"loss_chunk_tokens": 64, "micro_batch_size": 4, "distributed": {"nproc": 2, "strategy": "fsdp"}},
     "loss_chunk_tokens: fsdp keeps the output head's weight sharded"),
    ({"saved_activations": "cpu"}, "train.saved_activations cpu moves activations off an accelerator"),
    ({"model": {"width": 66, "heads": 4}}, "width (66) must be a multiple of heads (4)"),
    ({"model": {"context": 100000}}, "train.model.context: Input should be less than or equal to 65536"),
    ({"optimizer": "sparse_adam"}, "optimizer sparse_adam needs model.tie_embeddings: false"),
    ({"prune": {"final_sparsity": 0.5, "start_step": 4, "end_step": 30}},
     "prune.end_step (30) must be below steps (30)"),
    ({"prune": {"final_sparsity": 0.5, "start_step": 10, "end_step": 10}},
     "end_step (10) must come after start_step (10)"),
    ({"prune": {"final_sparsity": 0.3, "initial_sparsity": 0.5}},
     "initial_sparsity (0.5) is above final_sparsity"),
    ({"cuda_alloc_conf": "expandable_segment:True"},
     "cuda_alloc_conf: 'expandable_segment:True' is not key:value"),
    ({"optimizer": "lion"}, ("train.optimizer: must be one of 'sgd', 'adam', 'adamw', 'adagrad', 'rmsprop', "
                             "'adamw8bit', 'adafactor', 'galore_adamw', 'adam_mini' or 'sparse_adam' "
                             "(got 'lion')")),
])
def test_impossible_combinations_fail_before_training(tokens: Path, tmp_path: Path, train_params: dict,
                                                      message: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(deep_update(tiny_params(), {"train": train_params}), allow_unicode=True))
    rc = run_stage("train",
                   ["--params", str(params), "--tokens", str(tokens), "--out", str(tmp_path / "model"),
                    "--plots", str(tmp_path / "plots"), "--metrics", str(tmp_path / "m.json")])
    assert rc == 2
    assert message in one_error_line(capsys.readouterr().err, "train")
    assert not (tmp_path / "model").exists() and not (tmp_path / "m.json").exists()


def test_cuda_requested_without_cuda_is_refused(tokens: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(deep_update(tiny_params(), {"base": {"device": "cuda"}}),
                                     allow_unicode=True))
    rc = run_stage("train",
                   ["--params", str(params), "--tokens", str(tokens), "--out", str(tmp_path / "model"),
                    "--plots", str(tmp_path / "plots"), "--metrics", str(tmp_path / "m.json")])
    assert rc == 2
    assert "base.device is cuda but no CUDA device is available" in one_error_line(capsys.readouterr().err,
                                                                                   "train")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_report_cuda_memory(train: Callable[..., Any], tmp_path: Path) -> None:  # pragma: no cover
    for precision in ("fp32", "bf16", "fp16"):
        work_params = {"precision": precision}
        rc, m, _ = train(f"cuda-{precision}", **work_params)
        assert rc == 0
        assert m["cuda_max_allocated_mib"] > 0 and m["cuda_max_reserved_mib"] >= m["cuda_max_allocated_mib"]
        assert json.loads(json.dumps(m))["val_loss"] < 7.0
    rc, m, _ = train("cuda-8bit", optimizer="adamw8bit", cuda_alloc_conf="expandable_segments:True")
    assert rc == 0 and m["cuda_alloc_conf"] == "expandable_segments:True" and m["val_loss"] < 7.0


@pytest.mark.parametrize("technique", [
    {"prune": {"final_sparsity": 0.6, "start_step": 10, "end_step": 90, "every": 10}},  # masks resume too
    {"optimizer": "sparse_adam", "model": {"tie_embeddings": False}},
    {"optimizer": "adamw8bit"},
], ids=["pruning", "sparse_adam", "adamw8bit"])
def test_a_killed_run_resumes_to_the_same_metrics(tokens: Path, tmp_path: Path,
                                                  technique: dict[str, Any]) -> None:
    """Both runs are `python -m stages.train` as DVC starts it: a fresh process each, the same
    libraries imported (kernels may round differently in a process that imported others)."""
    settings = {"steps": 120, "checkpoint_every": 5, "eval_every": 20, **technique}

    def cli_args(work: Path) -> list[str]:
        work.mkdir()
        (work / "params.yaml").write_text(yaml.safe_dump(deep_update(tiny_params(), {"train": settings}),
                                                         allow_unicode=True))
        return train_args(work, tokens)

    full = run_cli("train", cli_args(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    uninterrupted, full_dir = read_metrics(tmp_path / "full" / "train.json"), tmp_path / "full" / "model"

    work = tmp_path / "killed"
    args = cli_args(work)
    stopped_at = kill_at_checkpoint(args, work / "ckpt" / "latest" / "state.json", 29, 300)
    assert not (work / "train.json").exists(), "the run finished before it could be killed"
    assert 29 <= stopped_at < 119

    result = run_cli("train", args)
    assert result.returncode == 0, result.stderr
    assert f"resuming from the checkpoint at step {stopped_at}" in result.stderr
    resumed = read_metrics(work / "train.json")
    assert {k: v for k, v in resumed.items() if k not in TIMING} == \
        {k: v for k, v in uninterrupted.items() if k not in TIMING}
    assert (work / "model" / "model.safetensors").read_bytes() == (
        full_dir / "model.safetensors").read_bytes()
    assert (work / "plots" / "steps.csv").read_text().splitlines()[1:][-1].split(",")[:4] == \
        (full_dir.parent / "plots" / "steps.csv").read_text().splitlines()[-1].split(",")[:4]
    # the peak step module by module, metered before the kill: carried by the checkpoint
    assert (work / "plots" / "timeline.csv").read_bytes() == (
        full_dir.parent / "plots" / "timeline.csv").read_bytes()


def test_a_checkpoint_of_other_params_is_not_resumed(tokens: Path, train: Callable[..., Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, _ = train("first")
    assert rc == 0
    ckpt = tmp_path / "first" / "ckpt"
    assert json.loads((ckpt / "latest" / "state.json").read_text())["step"] == 29  # the final one
    rc, fresh, _ = train("fresh", lr=0.001)
    assert rc == 0
    params = tmp_path / "other.yaml"
    params.write_text(yaml.safe_dump(deep_update(tiny_params(), {"train": {"lr": 0.001}}),
                                     allow_unicode=True))
    capsys.readouterr()
    assert run_stage("train", ["--params", str(params), "--tokens", str(tokens), "--out", str(tmp_path / "m"),
                               "--plots", str(tmp_path / "p"), "--checkpoints", str(ckpt),
                               "--metrics", str(tmp_path / "other.json")]) == 0
    assert "belongs to other params, data or code: starting afresh" in capsys.readouterr().err
    other = read_metrics(tmp_path / "other.json")
    assert {k: v for k, v in other.items()
            if k not in TIMING} == {k: v for k, v in fresh.items() if k not in TIMING}


def test_a_rerun_of_a_finished_run_trains_and_measures_again(tokens: Path, train: Callable[..., Any],
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`dvc repro -f -s train` after a finished run: its checkpoint is at the last step; resuming
    it would train 0 steps and lose the timings. It trains again, the same numbers."""
    rc, first, _ = train("first")
    assert rc == 0 and json.loads((tmp_path / "first" / "ckpt" / "latest" / "state.json").read_text())[
        "step"] == 29
    capsys.readouterr()
    assert run_stage("train", train_args(tmp_path / "first", tokens)) == 0
    assert "is of a finished run (step 30 of 30): training again from the start" in capsys.readouterr().err
    again = read_metrics(tmp_path / "first" / "train.json")
    assert set(again) == set(first)  # every metric: tokens_per_sec and step_ms_median too
    assert again["tokens_per_sec"] > 0 and again["step_ms_median"] > 0
    assert {k: v for k, v in again.items()
            if k not in TIMING} == {k: v for k, v in first.items() if k not in TIMING}


def test_estimate_prints_the_prediction_and_writes_nothing(tokens: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(deep_update(tiny_params(), {"train": {"optimizer": "sgd"}}),
                                     allow_unicode=True))
    result = run_cli("train",
                     ["--params", str(params), "--tokens", str(tokens), "--out", str(tmp_path / "model"),
                      "--metrics", str(tmp_path / "m.json"), "--estimate"])
    assert result.returncode == 0, result.stderr
    predicted = json.loads(result.stdout)
    params_bytes = 268928 * 4  # the tiny llama's parameters (see test_parameter_bytes_and_counts)
    # one momentum buffer
    assert predicted["est_optimizer_peak_mib"] * 2**20 == pytest.approx(params_bytes, abs=16)
    assert predicted["est_gradients_peak_mib"] * 2**20 == pytest.approx(params_bytes, abs=16)
    assert predicted["est_total_peak_mib"] > predicted["est_activations_peak_mib"] > 0
    assert not (tmp_path / "model").exists() and not (tmp_path / "m.json").exists()


def test_a_checkpoint_of_other_code_is_not_resumed(tokens: Path, train: Callable[..., Any], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import stages.train.identity

    assert train("first")[0] == 0
    monkeypatch.setattr(stages.train.identity, "code_identity", lambda: {"sources": "changed"})
    capsys.readouterr()
    ckpt = tmp_path / "first" / "ckpt"
    params = tmp_path / "first" / "params.yaml"
    assert run_stage("train", ["--params", str(params), "--tokens", str(tokens), "--out", str(tmp_path / "m"),
                               "--plots", str(tmp_path / "p"), "--checkpoints", str(ckpt),
                               "--metrics", str(tmp_path / "again.json")]) == 0
    assert "belongs to other params, data or code: starting afresh" in capsys.readouterr().err


def test_word2vec_initialisation(train: Callable[..., Any], tokens: Path) -> None:
    import numpy as np

    from stages.common.modelling.models import ModelParams, build_model
    from stages.train.task import init_embedding_from_word2vec

    special = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    aligned = np.load(tokens.parent / "embed" / "aligned.npy")  # the tiny profile: 32 dimensions
    assert aligned.shape == (2533, 32)
    for width in (32, 64):
        torch.manual_seed(0)
        model = build_model(ModelParams(width=width, layers=1, heads=4), 2533, special)
        before = model.get_input_embeddings().weight.detach().clone()
        init_embedding_from_word2vec(model, aligned, seed=1)
        after = model.get_input_embeddings().weight.detach()
        assert after.std().item() == pytest.approx(before.std().item(), rel=1e-4)  # same scale
        assert torch.linalg.matrix_rank(after).item() <= 32  # a linear image of the 32-d vectors
        if width == 32:  # same width: the vectors themselves, rescaled
            ratio = after / torch.from_numpy(aligned)
            finite = torch.isfinite(ratio)
            assert torch.allclose(ratio[finite], ratio[finite][0], rtol=1e-4)
    rc, m, _ = train("w2v", init_from_word2vec=True)
    rc0, m0, _ = train("random")
    assert rc == rc0 == 0 and m["val_loss"] != m0["val_loss"] and m["val_loss"] < math.log(2533)


def test_memory_budget_refuses_with_what_fits_or_fits_itself(tokens: Path, train: Callable[..., Any],
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc, base, _ = train("base")
    assert rc == 0
    budget = round(0.7 * base["mem_total_peak_mib"], 1)  # about 9.4 MiB: the baseline does not fit
    rc, _, model_dir = train("refused", memory_budget_mib=budget)
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert re.search(r"the estimated tensor peak is [\d.]+ MiB, more than "
                     rf"train\.memory_budget_mib={budget:g}; ",
                     line), line
    assert "it fits with " in line and "or set train.auto_fit: true" in line
    assert not model_dir.exists()

    rc, fitted, model_dir = train("fitted", memory_budget_mib=budget, auto_fit=True)
    assert rc == 0
    assert fitted["auto_fit_changes"] != "none"
    assert fitted["mem_total_peak_mib"] <= budget  # measured, not only predicted, within budget
    recorded = json.loads((model_dir / "params.json").read_text())["train"]
    for change in fitted["auto_fit_changes"].split(","):
        key, value = change.split("=")
        assert str(recorded[key]).lower() == value

    rc, _, _ = train("impossible", memory_budget_mib=0.5, auto_fit=True)
    assert rc == 2
    assert "nothing fits: loss_chunk_tokens=256" in one_error_line(capsys.readouterr().err, "train")


def test_eight_bit_adamw_and_sparse_embedding_gradients(train: Callable[..., Any]) -> None:
    vocab, width, context, batch = 2533, 64, 32, 8  # tiny profile
    rc, adamw, _ = train("adamw")
    rc8, adamw8, _ = train("adamw8bit", optimizer="adamw8bit", cuda_alloc_conf="expandable_segments:True")
    assert rc == rc8 == 0
    # allocator settings apply on CUDA only; the metrics say what was in force
    assert adamw8["cuda_alloc_conf"] == ""
    # bitsandbytes' block-wise 8-bit state: two uint8 moments per element and one fp32 absmax
    # per 256-element block each; tensors under 4096 elements keep two fp32 moments; the two
    # 256-entry fp32 quantisation maps are shared by all parameters
    sizes = [vocab * width] + [width * width] * 4 * 2 + [width * 192] * 3 * 2 + [width] * 5
    expected = sum(2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in sizes) + 2 * 256 * 4
    assert sum(sizes) == adamw["params_total"]
    assert adamw8["mem_optimizer_peak_mib"] * 2**20 == pytest.approx(expected, abs=16)
    assert adamw8["mem_optimizer_peak_mib"] < 0.3 * adamw["mem_optimizer_peak_mib"]
    assert adamw8["val_loss"] == pytest.approx(adamw["val_loss"], rel=0.01)  # the same training, 8-bit state

    rc, dense, _ = train("untied", model={"tie_embeddings": False})
    rcs, sparse, _ = train("sparse", optimizer="sparse_adam", model={"tie_embeddings": False})
    assert rc == rcs == 0
    # the embedding's gradient: one row per token of the batch (values + int64 indices)
    # instead of the whole vocab x width matrix
    saved = vocab * width * 4 - batch * context * (width * 4 + 8)
    assert (dense["mem_gradients_peak_mib"] - sparse["mem_gradients_peak_mib"]) * 2**20 == pytest.approx(
        saved, abs=16)
    # SparseAdam's moments are dense
    assert sparse["mem_optimizer_peak_mib"] == dense["mem_optimizer_peak_mib"]
    assert sparse["val_loss"] < 7.0
    for m in (adamw8, sparse):
        for category in ("total", "parameters", "gradients", "optimizer", "activations", "temporaries"):
            assert abs(m[f"est_error_{category}_peak_mib"]) < 0.02, (category, m)


def test_gradual_magnitude_pruning(train: Callable[..., Any]) -> None:
    from safetensors.torch import load_file

    schedule = {"final_sparsity": 0.5, "initial_sparsity": 0.0, "start_step": 4, "end_step": 20, "every": 4,
                "power": 3}
    rc, base, _ = train("dense")
    rcp, pruned, model_dir = train("pruned", prune=schedule)
    assert rc == rcp == 0
    weights = load_file(str(model_dir / "model.safetensors"))
    matrices = {k: v for k, v in weights.items() if k.endswith("proj.weight")}
    assert len(matrices) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for name, w in matrices.items():
        assert int((w == 0).sum()) == w.numel() // 2, name  # each matrix exactly half zero
    assert int((weights["model.embed_tokens.weight"] == 0).sum()) == 0  # embeddings are not pruned
    assert pruned["prune_sparsity"] == 0.5 and base["prune_sparsity"] == 0.0
    # the schedule s(t) = 0.5 - 0.5 (1 - (t - 4) / 16)^3 at steps 8, 12, 16, 20; nothing pruned before 8
    with (model_dir.parent / "plots" / "steps.csv").open() as f:
        sparsity = [float(r["sparsity"]) for r in csv.DictReader(f)]
    assert sparsity[:8] == [0.0] * 8
    assert (sparsity[8], sparsity[12], sparsity[16], sparsity[20], sparsity[29]) == \
        (0.289062, 0.4375, 0.492188, 0.5, 0.5)  # 6 significant digits in the csv
    # the masks: one byte per prunable weight, counted with the parameters
    prunable = sum(w.numel() for w in matrices.values())
    assert (pruned["mem_parameters_peak_mib"] - base["mem_parameters_peak_mib"]) * 2**20 == \
        pytest.approx(prunable, abs=16)
    assert abs(pruned["est_error_total_peak_mib"]) < 0.02
    assert pruned["val_loss"] < 7.0
