"""Memory by module: the tensor meter's bytes split by the module that made them, sampled at
module boundaries, against bytes computed by hand; the train and evaluate stages' timelines
against their own metered peaks; the report's section."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from stages.common.memory.tensor_meter import TensorMeter
from stages.common.memory.timeline import NO_MODULE, ModuleTimeline, group_of, short_name
from stages.common.modelling.generation import metered_generation
from stages.common.modelling.models import ModelParams, build_model

SPECIAL = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
VOCAB, BATCH, CONTEXT = 300, 2, 16


def tiny_llama(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelParams(family="llama", layers=layers, width=32, heads=2, context=CONTEXT), VOCAB,
                       SPECIAL)


def test_names_drop_the_root_and_its_wrapper_and_group_by_block() -> None:
    assert short_name("LlamaForCausalLM.model.layers.0.mlp.up_proj") == "layers.0.mlp.up_proj"
    assert short_name("LlamaForCausalLM.lm_head") == "lm_head"
    assert short_name("GPT2LMHeadModel.transformer.h.3.attn") == "h.3.attn"
    assert group_of("layers.0.mlp.up_proj") == "layers.0" and group_of("h.11") == "h.11"
    assert group_of("lm_head") == "lm_head" and group_of("embed_tokens") == "embed_tokens"


def test_a_training_step_by_module_holds_every_peak_and_the_logits_in_the_head() -> None:
    model = tiny_llama()
    ids = torch.randint(4, VOCAB, (BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(1))
    meter = TensorMeter()
    meter.track_model(model)
    with ModuleTimeline(meter, ("activations", "temporaries")) as timeline:
        with meter.phase(0, "forward"):
            logits = model(input_ids=ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        with meter.phase(0, "backward"):
            loss.backward()
    meter.close()
    totals = [sum(s.bytes.values()) for s in timeline.samples]
    assert max(totals) == meter.peak.total  # no peak falls between two samples
    # the head's output is the logits: batch × context × vocab float32, made in lm_head
    head = [s for s in timeline.samples if s.phase == "forward" and s.module == "lm_head"]
    assert head and max(s.bytes["lm_head"] for s in head) == BATCH * CONTEXT * VOCAB * 4
    groups = {b for s in timeline.samples for b in s.bytes}
    assert {"parameters", "gradients", "embed_tokens", "layers.0", "layers.1", "norm", "lm_head"} <= groups
    assert NO_MODULE in groups  # the loss is computed outside every module
    assert {s.phase for s in timeline.samples} == {"forward", "backward"}
    # a backward sample is taken inside the layers' backward: their temporaries are theirs
    assert any(s.phase == "backward" and s.module.startswith("layers.") for s in timeline.samples)
    rows = timeline.rows(0)
    assert list(rows[0])[:6] == ["sample", "step", "phase", "module", "parameters_mib", "gradients_mib"]
    assert max(sum(v for k, v in r.items() if k.endswith("_mib")) for r in rows) * 2**20 == meter.peak.total


def metered_step(model: torch.nn.Module, by_module: bool) -> tuple[int, dict[str, int], ModuleTimeline]:
    ids = torch.randint(4, VOCAB, (BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(1))
    meter = TensorMeter()
    meter.track_model(model)
    timeline = ModuleTimeline(meter, ("activations", "temporaries"))
    if by_module:
        timeline.__enter__()
    for step in range(2):
        with meter.phase(step, "forward"):
            loss = model(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
        with meter.phase(step, "backward"):
            loss.backward()
        del loss
        model.zero_grad(set_to_none=True)
    timeline.__exit__()
    meter.close()
    return meter.peak.total, dict(meter.category_peaks), timeline


def test_the_timeline_changes_nothing_the_meter_counts_under_activation_checkpointing() -> None:
    """Recomputed blocks run their forward again inside backward: the tracking holds no tensor
    (torch's ModuleTracker held gradients there: 19 % more temporaries in the tiny model)."""
    model = tiny_llama(layers=3)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    plain = metered_step(model, by_module=False)
    peak, categories, timeline = metered_step(model, by_module=True)
    assert (peak, categories) == plain[:2]
    assert max(sum(s.bytes.values()) for s in timeline.samples) == peak
    # the recomputation is attributed to the blocks, in backward
    assert {s.module.split(".")[0] + "." + s.module.split(".")[1] for s in timeline.samples
            if s.phase == "backward"
            and s.module.startswith("layers.")} == {"layers.0", "layers.1", "layers.2"}


def test_generation_by_block_keeps_the_prefill_and_the_last_steps_and_its_peak() -> None:
    model = tiny_llama().eval()
    prompt = torch.randint(4, VOCAB, (BATCH, 4), generator=torch.Generator().manual_seed(2))
    plain = metered_generation(model, prompt, 12)
    found = metered_generation(model, prompt, 12, by_module=2)
    assert "timeline" not in plain and found["peak_mib"] == plain["peak_mib"]
    rows = found["timeline"]
    assert {r["step"] for r in rows} == {0, 7, 8}  # prefill, then the last two of 8 decode steps
    assert [r["sample"] for r in rows] == list(range(len(rows)))
    assert max(sum(v for k, v in r.items() if k.endswith("_mib")) for r in rows) == found["peak_mib"]
    # the cache is made in the attention of each block: at the end, both blocks hold theirs
    last = rows[-1]
    assert last["layers.0_mib"] > 0 and last["layers.1_mib"] > 0 and last["weights_mib"] > 0


def test_train_writes_its_peak_step_module_by_module(tmp_path: Path, tokens: Path, params_file) -> None:
    from tests.conftest import read_metrics, run_cli, train_args

    params_file(train={"steps": 3, "warmup_steps": 1, "eval_every": 3, "checkpoint_every": 3,
                       "meter_steps": 2})
    result = run_cli("train", train_args(tmp_path, tokens))
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path / "train.json")
    with (tmp_path / "plots" / "timeline.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["step"]) for r in rows} == {metrics["mem_peak_step"]}
    totals = [sum(float(v) for k, v in r.items() if k.endswith("_mib")) for r in rows]
    assert abs(max(totals) - metrics["mem_total_peak_mib"]) <= 1e-4 * metrics["mem_total_peak_mib"]
    assert {r["phase"] for r in rows} >= {"forward", "backward", "optimizer"}
