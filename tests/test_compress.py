"""compress: every variant loads and predicts close to the trained model; quantization touched
the layers it says; pruning reaches the sparsity exactly and the file really shrinks; bad
requests are refused in one line, and a scheme that cannot run is an `unsupported` row."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from stages.common.modelling.models import logits_of
from stages.common.weights import quant, storage
from stages.common.weights.loading import load_model_folder
from tests.conftest import ROOT, as_stage, deep_update, one_error_line, read_metrics, run_stage, tiny_params

IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 8, 1000, 64, 3, 2, 21, 77, 150, 9]])


def trained_model(tokens: Path, folder: Path, **model: Any) -> Path:
    """A tiny model trained for the tiny profile's 30 steps."""
    folder.mkdir(parents=True, exist_ok=True)
    params = folder / "train.yaml"
    params.write_text(yaml.safe_dump(deep_update(tiny_params(), {"train": {"model": model}}),
                                     allow_unicode=True))
    assert run_stage("train",
                     ["--params", str(params), "--tokens", str(tokens), "--out", str(folder / "model"),
                      "--plots", str(folder / "plots"), "--checkpoints", str(folder / "ckpt"),
                      "--metrics", str(folder / "train.json")]) == 0
    return folder / "model"


@pytest.fixture(scope="module")
def llama(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model(tokens, tmp_path_factory.mktemp("llama"))


@pytest.fixture
def compress(tokens: Path, tmp_path: Path) -> Callable[..., tuple[int, dict[str, Any], Path]]:
    """compress(model folder, variants=None) → (exit code, metrics, data/compressed)."""

    def go(model: Path, variants: dict[str, Any] | None = None) -> tuple[int, dict[str, Any], Path]:
        data = tiny_params()
        if variants is not None:
            data["compress"]["variants"] = variants
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(data, allow_unicode=True))
        out, metrics = tmp_path / "compressed", tmp_path / "compress.json"
        rc = run_stage("compress", ["--params", str(params), "--model", str(model), "--tokens", str(tokens),
                                    "--out", str(out), "--metrics", str(metrics)])
        return rc, read_metrics(metrics) if rc == 0 else {}, out

    return go


def test_every_variant_loads_and_predicts_like_the_trained_model(llama: Path,
                                                                 compress: Callable[..., Any]) -> None:
    from transformers import AutoModelForCausalLM

    rc, m, out = compress(llama)
    assert rc == 0
    variants = tiny_params()["compress"]["variants"]
    assert m["unsupported"] == 0 and all(m[f"{v}_status"] == "ok" for v in variants)
    with torch.no_grad():
        reference = logits_of(load_model_folder(llama), IDS)
        for variant in variants:
            logits = logits_of(load_model_folder(out / variant), IDS).float()
            assert logits.shape == reference.shape and torch.isfinite(logits).all(), variant
            if variant in ("fp16", "bf16", "int8", "int8-dynamic", "int4"):  # the same function, rounded
                tolerance = {"fp16": 0.01, "bf16": 0.1, "int4": 0.5}.get(variant, 0.1)
                assert (logits - reference).abs().max() < tolerance, variant
    # formats transformers reads are stock transformers folders
    for variant in ("fp16", "bf16", "structured25", "distill-half"):
        assert type(AutoModelForCausalLM.from_pretrained(str(out / variant))).__name__ == "LlamaForCausalLM"
    # sizes are the real files
    reference_bytes = (llama / "model.safetensors").stat().st_size
    assert m["reference_bytes_on_disk"] == reference_bytes
    for variant in variants:
        files = sum(f.stat().st_size for f in (out / variant).glob("*.safetensors"))
        assert m[f"{variant}_bytes_on_disk"] == files
        assert m[f"{variant}_size_ratio"] == pytest.approx(files / reference_bytes, rel=1e-5)
    assert m["fp16_size_ratio"] < 0.51 and m["int8_size_ratio"] < 0.3 and m["int4_size_ratio"] < m[
        "int8_size_ratio"]


def test_int8_replaces_every_linear_layer_and_the_embedding(llama: Path,
                                                            compress: Callable[..., Any]) -> None:
    rc, m, out = compress(llama, {"int8": {"method": "int8_weight_only", "embeddings": True}})
    assert rc == 0
    layers, per_layer = 2, 7  # tiny llama: q, k, v, o, gate, up, down in each block
    assert m["int8_layers_quantized"] == layers * per_layer + 2  # + the embedding and the head tied to it
    model = load_model_folder(out / "int8")
    assert not any(isinstance(mod, nn.Linear) for mod in model.modules())
    assert isinstance(model.model.embed_tokens, quant.Int8Embedding)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight  # still tied, stored once
    vocab, width, ffn = 2533, 64, 192
    weights = vocab * width + layers * (4 * width * width + 3 * width * ffn)
    scales = (vocab + layers * (5 * width + 2 * ffn)) * 4  # one fp32 per output row
    norms = (2 * layers + 1) * width * 4
    file = out / "int8" / "weights.safetensors"
    header = 8 + int.from_bytes(file.read_bytes()[:8], "little")  # safetensors: length, JSON header, data
    assert m["int8_bytes_on_disk"] - header == weights + scales + norms


def test_gpt2_conv1d_layers_are_quantized_too(tokens: Path, tmp_path: Path,
                                              compress: Callable[..., Any]) -> None:
    from transformers.pytorch_utils import Conv1D

    model_dir = trained_model(tokens, tmp_path / "gpt2", family="gpt2")
    rc, m, out = compress(model_dir, {"int8": {"method": "int8_weight_only", "embeddings": False}})
    assert rc == 0
    assert m["int8_layers_quantized"] == 2 * 4  # c_attn, attn c_proj, c_fc, mlp c_proj per block
    model = load_model_folder(out / "int8")
    assert not any(isinstance(mod, Conv1D) for mod in model.modules())
    with torch.no_grad():
        diff = (logits_of(model, IDS) - logits_of(load_model_folder(model_dir), IDS)).abs().max()
    assert diff < 0.1


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_pruning_is_exact_and_the_file_shrinks(llama: Path, compress: Callable[..., Any],
                                                         scope: str) -> None:
    variants = {"p": {"method": "prune_magnitude", "sparsity": 0.6, "scope": scope, "embeddings": False},
                "p-int8": {"method": "int8_weight_only", "embeddings": True, "base": "p"}}
    rc, m, out = compress(llama, variants)
    assert rc == 0
    model = load_model_folder(out / "p")
    matrices = [mod.weight for name, mod in model.named_modules() if name.endswith("proj")]
    assert len(matrices) == 14
    total = sum(w.numel() for w in matrices)
    zeros = sum(int((w == 0).sum()) for w in matrices)
    if scope == "layer":  # each matrix loses its own 60 %
        assert all(int((w == 0).sum()) == round(0.6 * w.numel()) for w in matrices)
    else:  # one threshold: 60 % of all block weights, wherever they are
        assert zeros == round(0.6 * total)
        assert len({int((w == 0).sum()) / w.numel() for w in matrices}) > 1
    assert m["p_sparsity"] == pytest.approx(zeros / total, rel=1e-6)
    assert int((model.model.embed_tokens.weight == 0).sum()) == 0
    # the same weights stored densely take more room than the sparse file
    dense = out.parent / "dense.safetensors"
    from safetensors.torch import save_model

    save_model(model, str(dense))
    assert m["p_bytes_on_disk"] < 0.9 * dense.stat().st_size
    assert m["p_tensors_bitmask"] == 14
    assert m["p-int8_bytes_on_disk"] < m["p_bytes_on_disk"] and m["p-int8_tensors_bitmask"] == 14


def test_structured_pruning_rebuilds_smaller_blocks(llama: Path, compress: Callable[..., Any]) -> None:
    from transformers import AutoModelForCausalLM

    rc, m, out = compress(llama, {"s": {"method": "prune_structured", "heads": 0.5, "neurons": 0.25}})
    assert rc == 0
    model = AutoModelForCausalLM.from_pretrained(str(out / "s"))
    assert (model.config.num_attention_heads, model.config.intermediate_size) == (2, 144)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (2 * 16, 64) and attn.o_proj.weight.shape == (64, 2 * 16)
    width, layers, vocab = 64, 2, 2533
    kept = vocab * width + layers * (4 * width * 32 + 3 * width * 144 + 2 * width) + width
    assert m["s_params"] == model.num_parameters() == kept
    with torch.no_grad():
        assert torch.isfinite(logits_of(model, IDS)).all()


@pytest.mark.parametrize("variants, message", [
    ({"x": {"method": "int8_weight_only", "base": "nope"}}, "variants.x.base: no variant named 'nope'"),
    ({"a": {"method": "int8_weight_only", "base": "b"}, "b": {"method": "cast", "base": "a"}},
     "is a cycle of bases"),
    ({"p": {"method": "prune_magnitude", "sparsity": 1.0}}, "sparsity: Input should be less than 1"),
    ({"x": {"method": "zip"}}, "compress.variants.x"),
    ({"Bad Name": {"method": "cast"}}, "variant name 'Bad Name'"),
    ({}, "compress.variants is empty"),
])
def test_bad_requests_fail_in_one_line(llama: Path, compress: Callable[..., Any], variants: dict[str, Any],
                                       message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, out = compress(llama, variants)
    assert rc == 2
    assert message in one_error_line(capsys.readouterr().err, "compress")
    assert not out.exists()


def test_a_missing_or_corrupt_model_is_refused(compress: Callable[..., Any], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, _ = compress(tmp_path / "nowhere")
    assert rc == 2 and "cannot load a model" in one_error_line(capsys.readouterr().err, "compress")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    rc, _, out = compress(broken)
    assert rc == 2 and f"{broken}: cannot load a model" in one_error_line(capsys.readouterr().err, "compress")
    assert not out.exists()


def test_a_variant_that_cannot_run_is_an_unsupported_row(llama: Path, compress: Callable[..., Any]) -> None:
    variants = {"int4": {"method": "int4_weight_only", "group_size": 256, "embeddings": False},  # 64 inputs
                "int4-after": {"method": "cast", "base": "int4"},
                "heads3": {"method": "prune_structured", "heads": 0.25,
                           "neurons": 0.0},  # 3 heads of width 64
                "fp16": {"method": "cast", "dtype": "float16"}}
    rc, m, out = compress(llama, variants)
    assert rc == 0
    assert (m["int4_status"], m["int4-after_status"], m["heads3_status"], m["fp16_status"]) == \
        ("unsupported", "unsupported", "unsupported", "ok")
    assert "no layer fits the int4 kernel (64 input features are not a multiple of group_size 256)" in \
        (out / "int4" / "unsupported.json").read_text()
    assert "its base 'int4' is unsupported" in (out / "int4-after" / "unsupported.json").read_text()
    assert "heads fractions that work: 0.75, 0.5" in (out / "heads3" / "unsupported.json").read_text()
    assert m["unsupported"] == 3


def test_quantized_layers_compute_what_their_int8_weights_say() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 64)
    q = quant.Int8Linear.from_float(linear, dynamic=False)
    dequantized = q.qweight.float() * q.scale[:, None]  # independent of the kernel
    assert (dequantized - linear.weight).abs().max() <= q.scale.max() / 2 + 1e-7  # rounding error bound
    assert torch.allclose(q(x), x @ dequantized.T + linear.bias, atol=1e-5)
    dynamic = quant.Int8Linear.from_float(linear, dynamic=True)
    assert (dynamic(x) - linear(x)).abs().max() < 0.05
    q4 = quant.Int4Linear.from_float(linear, group_size=32)
    assert (q4(x) - linear(x)).abs().max() < 0.25


def test_int8_product_equals_the_exact_integer_product_bit_for_bit() -> None:
    """The dynamic layer's CPU product against the exact one (int64 arithmetic, as
    `torch._int_mm`'s int32 accumulation should give), with sums past 2^24 where one fp32
    product over all features would round. The reference is not a library kernel: on an
    AVX-512 CPU with oneDNN pinned to AVX2 (base.portable), `torch._int_mm` saturates
    (bench/int_mm_isa.py, docs/FAULTS.md)."""
    torch.manual_seed(0)
    for k in (128, 2100):
        a = torch.randint(-127, 128, (16, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (24, k), dtype=torch.int8)
        a[:8] = 127  # large same-sign sums in half the rows
        b[:12] = torch.randint(124, 128, (12, k), dtype=torch.int8)
        exact = a.to(torch.int64) @ b.to(torch.int64).t()
        assert int(exact[0, 0]) == 127 * int(b[0].to(torch.int64).sum())  # the reference itself, by hand
        assert torch.equal(quant.int8_product(a, b), exact.float())
    # at k = 2100 the sums pass 2^24: fp32 holds them only rounded, so an fp32 accumulator over all
    # features is exact only where its kernel happens to round each step as the whole sum rounds
    assert (exact.abs() > 2**24).any() and (exact.float().to(torch.int64) != exact).any()


def test_int8_product_is_exact_in_a_pinned_stage_process() -> None:
    """The same check where lmmem runs it: a stage's process, its kernels pinned by base.portable
    (oneDNN's ISA to AVX2 on an AVX-512 CPU, where torch._int_mm is wrong)."""
    code = (as_stage("stages.compress") + "sys.argv = ['-m']; "
            "import stages, os, torch; from stages.common.weights import quant; "
            "torch.manual_seed(0); a = torch.full((4, 128), 127, dtype=torch.int8); "
            "b = torch.randint(124, 128, (6, 128), dtype=torch.int8); "
            "exact = (a.to(torch.int64) @ b.to(torch.int64).t()).float(); "
            "print(os.environ.get('LMMEM_PORTABLE', ''), torch.equal(quant.int8_product(a, b), exact))")
    env = {k: v for k, v in os.environ.items() if k != "LMMEM_PORTABLE"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    pinned, exact = done.stdout.split()
    assert "OMP_NUM_THREADS" in pinned and exact == "True"


@pytest.mark.parametrize("density, dtype, expected", [
    (1.0, torch.float32, "dense"), (0.5, torch.float32, "bitmask"), (0.01, torch.float32, "csr"),
    (0.5, torch.int8, "bitmask"), (0.9, torch.int8, "dense"),
])
def test_sparse_storage_picks_the_smallest_encoding_and_round_trips(tmp_path: Path, density: float,
                                                                    dtype: torch.dtype,
                                                                    expected: str) -> None:
    torch.manual_seed(0)
    t = (torch.randn(96, 200) * 50).to(dtype)
    t[t == 0] = 1
    t = t * (torch.rand(96, 200) < density)
    counts = storage.save_state({"w": t, "tied": t}, tmp_path / "w.safetensors")
    assert counts == {expected: 1}  # the alias is stored once
    back = storage.load_state(tmp_path / "w.safetensors")
    assert torch.equal(back["w"], t) and back["tied"] is back["w"]
    nnz, n = int((t != 0).sum()), t.numel()
    payload = {"dense": n * t.element_size(), "bitmask": math.ceil(n / 8) + nnz * t.element_size(),
               "csr": 97 * 8 + nnz * (2 + t.element_size())}[expected]
    assert payload < (tmp_path / "w.safetensors").stat().st_size < payload + 1024
