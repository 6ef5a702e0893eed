"""The planner (stages.plan): the catalog's parameter counts against the published ones, the
dry run of an architecture against a real metered step and a real metered generation, the
stacks that fit ordered by cost, the stage's outputs, and its one-line refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stages.common.harness.portable import cpu_model
from stages.plan.catalog import CATALOG, architecture
from stages.plan.dryrun import Question, estimate, parameter_count
from stages.plan.measure import measure
from stages.plan.planner import plan
from tests.conftest import ROOT, one_error_line, read_metrics, run_cli

TINY_CONFIG = ROOT / "stages" / "plan" / "tiny-llama.json"
QWEN_LIKE = {"model_type": "qwen2", "vocab_size": 384, "hidden_size": 48, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 128,
             "tie_word_embeddings": True}


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_each_catalog_architecture_has_exactly_its_published_parameter_count(name: str) -> None:
    arch = CATALOG[name]
    assert arch.published_parameters is not None
    assert parameter_count(arch) == arch.published_parameters  # e.g. Llama-3-8B: 8,030,261,248


@pytest.fixture()
def qwen_like(tmp_path: Path) -> Path:
    # biases on q, k and v, a tied head: not the llama the train stage builds
    path = tmp_path / "qwen-like.json"
    path.write_text(json.dumps(QWEN_LIKE), encoding="utf-8")
    return path


@pytest.mark.parametrize(("workload", "world", "strategy", "stack"), [
    ("pretrain", 1, "ddp", {}), ("pretrain", 1, "ddp", {"activation_checkpointing": True}),
    ("pretrain", 1, "ddp", {"optimizer": "adafactor"}), ("qlora", 1, "ddp", {"precision": "bf16"}),
    ("pretrain", 2, "ddp", {}), ("pretrain", 2, "zero1", {}),
    ("pretrain", 2, "fsdp", {"precision": "bf16", "activation_checkpointing": True})])
def test_the_dry_run_equals_a_real_metered_run_of_the_architecture(qwen_like: Path, workload: str, world: int,
                                                                   strategy: str, stack: dict) -> None:
    """The plan's estimate against two real training steps of the same architecture, metered
    (on 2 ranks through the launcher, each rank's meter): each category's own peak and its
    share of the total's peak within 0.5 %, per rank for what a strategy shards."""
    q = Question(architecture(str(qwen_like)), workload, batch_size=4, micro_batch_size=2, context=32,
                 world_size=world, strategy=strategy, train={"precision": "fp32", **stack})
    predicted, measured = estimate(q), measure(q)
    said = (f"on {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}): estimated "
            f"{predicted['category_peaks']}, "
            f"at the peak {predicted['by_category']}; measured {sorted(measured.items())}")
    assert predicted["peak_mib"] == pytest.approx(measured["mem_total_peak_mib"], rel=0.005), said
    for category, mib in predicted["category_peaks"].items():
        assert mib == pytest.approx(measured[f"mem_{category}_peak_mib"], rel=0.005,
                                    abs=1e-4), (category, said)
    for category, mib in predicted["by_category"].items():
        assert mib == pytest.approx(measured[f"mem_at_peak_{category}_mib"], rel=0.005,
                                    abs=1e-4), (category, said)
    for key, mib in predicted["per_rank"].items():  # rank<r>_est_<category>_peak_mib
        assert mib == pytest.approx(measured[key.replace("_est_", "_mem_")], rel=0.005), (key, said)
    assert len(predicted["per_rank"]) == (4 * world if world > 1 else 0)


@pytest.mark.parametrize("kv_bits", [0, 8])
def test_inference_equals_a_real_metered_generation_and_the_cache_its_closed_form(kv_bits: int) -> None:
    from transformers import AutoModelForCausalLM

    from stages.common.modelling.generation import metered_generation
    from stages.plan.catalog import hf_config

    arch = architecture(str(TINY_CONFIG))
    q = Question(arch, "inference", batch_size=3, context=40, prompt=24, dtype="fp32", kv_bits=kv_bits)
    predicted = estimate(q)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(arch, use_cache=True),
                                             attn_implementation="sdpa").eval()
    real = metered_generation(model, torch.randint(0, 512, (3, 24)), 40, kv_bits=kv_bits)
    assert predicted["peak_mib"] == pytest.approx(real["peak_mib"], rel=0.01)
    assert real["kv_cache_end_mib"] == pytest.approx(predicted["kv_cache_predicted_mib"], rel=0.01)
    if kv_bits == 0:  # 2 x layers x batch x context x kv heads x head size x 4 bytes
        assert predicted["kv_cache_predicted_mib"] * 2**20 == 2 * 2 * 3 * 40 * 2 * 16 * 4


def test_a_plan_lists_the_stacks_that_fit_cheapest_first() -> None:
    q = Question(architecture(str(TINY_CONFIG)), "pretrain", batch_size=2, micro_batch_size=2, context=128,
                 train={"precision": "bf16"})
    found = plan(q, {"small": 0.005, "large": 1.0}, reserve_mib=1.0, max_seconds=120)
    tried = {r["stack"]: r for r in found["tried"]}
    asked = tried["as asked"]
    large, small = found["devices"]["large"], found["devices"]["small"]
    assert large["fits"] and large["stacks"][0] == {"stack": "as asked", "cost": 1.0,
                                                    "peak_mib": asked["peak_mib"]}
    assert asked["peak_mib"] + 1.0 > 0.005 * 1024  # the small device needs moves
    assert small["fits"] and "as asked" not in [s["stack"] for s in small["stacks"]]
    for s in small["stacks"]:
        assert s["peak_mib"] + 1.0 <= 0.005 * 1024
    costs = [s["cost"] for s in small["stacks"]]
    assert costs == sorted(costs) and all(c >= 1.0 for c in costs)
    # beside it, what others estimate: accelerate's bf16 'Training using Adam' is its largest figure, AdamW's
    # two fp32 moments (8 bytes a parameter); Korthikanti et al.: s*b*h*(34 + 5*a*s/h) a layer, 16-bit
    from transformers import AutoModelForCausalLM

    from stages.plan.catalog import hf_config

    with torch.device("meta"):  # accelerate sizes every parameter and buffer (the rotary tables too)
        buffers = sum(b.numel() for b in AutoModelForCausalLM.from_config(hf_config(q.arch)).buffers())
    assert buffers == 16
    assert found["others"]["accelerate_training_mib"] * 2**20 == 8 * (parameter_count(q.arch) + buffers)
    assert found["others"]["korthikanti_activations_mib"] * 2**20 == pytest.approx(
        2 * (128 * 2 * 64 * (34 + 5 * 4 * 128 / 64)))
    best = tried[small["stacks"][0]["stack"]]
    assert best["cost"] == pytest.approx(math.prod(  # each move's measured cost, multiplied
        {"loss_chunk_tokens": 1.0, "mlp_tiles": 1.08, "micro_batch_size": 1.095, "optimizer": 1.16,
         "activation_checkpointing": 1.17}.get(k, 1.0) for k in best["changes"]))


def test_the_stage_writes_every_plan_and_its_figures(tmp_path: Path) -> None:
    import yaml

    from tests.conftest import tiny_params

    params = tiny_params()
    params["plan"]["architectures"] = [str(TINY_CONFIG), "gpt2"]
    params["plan"]["workloads"] = ["inference"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    done = run_cli("plan", ["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "plan"),
                            "--metrics", str(tmp_path / "plan.json")])
    assert done.returncode == 0, done.stderr
    plans = json.loads((tmp_path / "plan" / "plans.json").read_text())
    assert [p["question"]["architecture"] for p in plans] == ["tiny-llama", "gpt2"]
    m = read_metrics(tmp_path / "plan.json")
    assert m["gpt2_parameters"] == m["gpt2_parameters_published"] == 124_439_808
    assert m["tiny_llama_inference_large_fits"] is True and m["plans"] == 2
    gpt2 = plans[1]["tried"][0]  # the weights in bf16: 2 bytes each, the tied head once
    assert gpt2["by_category"]["weights"] * 2**20 == pytest.approx(124_439_808 * 2, rel=1e-3)
    # a cached output: the same bytes on any machine, so no dry run's seconds in it
    assert all("seconds" not in tried for plan in plans for tried in plan["tried"])


def test_the_question_prints_a_plan() -> None:
    done = run_cli("plan", ["--arch", str(TINY_CONFIG), "--workload", "pretrain", "--device-gib", "1",
                            "--batch-size", "2", "--micro-batch-size", "2", "--context", "64", "--set",
                            "precision=bf16",
                            "--reserve-mib", "1"])
    assert done.returncode == 0, done.stderr
    assert "device-0 (1,024 MiB, 1 held back): fits with as asked" in done.stdout
    assert "cost: each move's measured slowdown" in done.stdout


@pytest.mark.parametrize("args, expected", [
    (["--arch", "llama-9"], "plan.architectures: architecture 'llama-9': a catalog name (gpt2, "),
    (["--arch", "gpt2", "--workload", "dance"], "plan.workloads.0: "),
    (["--arch", "gpt2", "--set", "optimizer=nope"], "plan.train.optimizer: "),
    (["--arch", "gpt2", "--set", "precision"], "--set 'precision': KEY=VALUE"),
    (["--arch", "gpt2", "--workload", "inference", "--context", "128", "--prompt", "512"],
     "prompt (512) must be below context (128)"),
    (["--arch", "gpt2", "--batch-size", "2"], "batch_size (2) must be a multiple of micro_batch_size (8)"),
    (["--arch", "gpt2-xl", "--context", "2048", "--micro-batch-size", "1"],
     ("plan: context 2,048 is longer than gpt2-xl's 1,024 positions (its config's n_positions): ask "
      "for 1,024 tokens or fewer")),
])
def test_a_question_that_cannot_be_planned_is_one_line(args: list[str], expected: str) -> None:
    done = run_cli("plan", args)
    assert done.returncode == 2
    assert expected in one_error_line(done.stderr, "plan"), done.stderr


def test_a_config_the_planner_cannot_build_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}),
                                          encoding="utf-8")
    done = run_cli("plan", ["--arch", str(tmp_path)])
    assert done.returncode == 2
    assert "model_type 'bert' is not one the planner builds" in one_error_line(done.stderr, "plan")


@pytest.mark.parametrize("change, expected", [
    ({"devices": {"Big GPU": 80}}, "device 'Big GPU'"),
    ({"architectures": ["llama-3-8b", "gpt2"], "context": 2048},  # the second's positions end at 1,024
     "plan: context 2,048 is longer than gpt2's 1,024 positions (its config's n_positions)"),
])
def test_bad_plan_params_are_refused_before_any_work_and_keep_the_previous_outputs(tmp_path: Path,
                                                                                   change: dict,
                                                                                   expected: str) -> None:
    import yaml

    from tests.conftest import tiny_params

    (tmp_path / "plan").mkdir()
    (tmp_path / "plan" / "plans.json").write_text("[]", encoding="utf-8")
    (tmp_path / "plan" / ".lmmem-out").write_text('{"writer": "plan"}', encoding="utf-8")  # the stage's own
    params = tiny_params()
    params["plan"].update(change)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    done = run_cli("plan", ["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "plan"),
                            "--metrics", str(tmp_path / "plan.json")])
    assert done.returncode == 2
    assert expected in one_error_line(done.stderr, "plan")
    assert (tmp_path / "plan" / "plans.json").read_text() == "[]" and not (tmp_path / "plan.json").exists()


def test_a_device_the_weights_alone_overflow_is_answered_without_a_dry_run() -> None:
    """Llama-3-70B pretrained on one 80 GiB device: 70.55 B weights at 2 bytes at least (no
    technique trains in fewer than 16 bits) cannot fit, said at once; with fsdp over 8 ranks
    the floor is an eighth and the search would go on."""
    from stages.plan.planner import weights_floor

    q = Question(CATALOG["llama-3-70b"], "pretrain", batch_size=8, micro_batch_size=1, context=2048,
                 train={"precision": "bf16"})
    found = plan(q, {"H100": 80.0}, reserve_mib=2048.0, max_seconds=1.0)
    answer = found["devices"]["H100"]
    assert not answer["fits"] and answer["stacks"] == [] and found["tried"] == [] and not found["out_of_time"]
    floor = 70_553_706_496 * 2 / 2**20  # the published count, 2 bytes each
    assert answer["cannot_fit"] == (f"the weights alone need at least {floor:,.0f} MiB a rank (70.55 B "
                                    f"weights at 2 bytes each), more than 81,920 MiB less 2,048 held back")
    sharded = Question(CATALOG["llama-3-70b"], "pretrain", world_size=8, strategy="fsdp")
    assert weights_floor(sharded, 70_553_706_496)[0] == pytest.approx(floor / 8)
    assert weights_floor(Question(CATALOG["llama-3-70b"], "qlora"),
                         70_553_706_496)[0] == pytest.approx(floor / 4)
