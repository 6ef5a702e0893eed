"""The compare stage: a configuration is the train section with its keys laid over and the
comparison's run length over both; it trains for real and records the meter beside the
estimate, throughput and perplexity; mistakes are one line that leaves earlier outputs; and
the report draws every configuration against the baseline."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages import compare
from stages.common.core.errors import StageError
from stages.common.core.schema import CATEGORIES
from tests.conftest import ROOT, one_error_line, read_metrics, run_cli, run_stage, tiny_params


def settings(configs: dict[str, Any], **changes: Any) -> compare.Params:
    tiny = tiny_params()
    return compare.Params.model_validate({"train": tiny["train"],
                                          "compare": {**tiny["compare"], "configs": configs, **changes}})


def test_a_configuration_is_the_train_section_its_keys_and_the_comparisons_length() -> None:
    p = settings({"baseline": {}, "mine": {"model": {"layers": 1}, "precision": "bf16"}})
    mine, base = compare.configured(p, "mine"), compare.configured(p, "baseline")
    assert (mine.model.layers, mine.model.width, mine.model.context, mine.precision) == (1, 64, 32, "bf16")
    # the tiny train section
    assert (base.model.layers, base.precision, base.optimizer) == (2, "fp32", "adamw")
    for tp in (mine, base):  # tiny compare: 4 steps, warm-up 2, 2 metered, 2 validation batches
        assert (tp.steps, tp.warmup_steps, tp.meter_steps, tp.eval_every, tp.eval_batches,
                tp.checkpoint_every) \
            == (4, 2, 2, 4, 2, 0)
    # what the configuration leaves alone is the train section's
    assert (mine.lr, mine.batch_size) == (0.003, 8)


@pytest.mark.parametrize("configs, changes, expected", [
    ({"baseline": {}, "long": {"steps": 50}}, {},
     "configuration 'long' sets steps: the comparison sets steps, warmup_steps"),
    ({"baseline": {}, "My Run": {}}, {},
     "configuration name 'My Run': lowercase letters, digits and dashes only"),
    ({"baseline": {}}, {"baseline": "fastest"},
     "baseline 'fastest' is not one of the configurations (baseline)"),
    ({"baseline": {}}, {"meter_steps": 4}, "meter_steps (4) leaves no timed step of 4"),
])
def test_a_comparison_that_cannot_be_made_is_refused_in_one_line(configs: dict[str, Any],
                                                                 changes: dict[str, Any],
                                                                 expected: str) -> None:
    from stages.common.core.params import validate_section

    tiny = tiny_params()
    with pytest.raises(StageError) as info:
        validate_section("", {"train": tiny["train"],
                              "compare": {**tiny["compare"], "configs": configs, **changes}},
                         compare.Params)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("params: compare")


@pytest.mark.parametrize("keys, expected", [
    ({"precison": "bf16"}, "compare.configs.x.precison: unknown key"),
    ({"precision": "fp8"}, "compare.configs.x.precision: must be one of"),
    ({"optimizer_in_backward": True}, "compare.configs.x: "),  # with the train section's clipping: impossible
])
def test_a_configuration_train_refuses_names_the_configuration(keys: dict[str, Any], expected: str) -> None:
    with pytest.raises(StageError) as info:
        compare.configured(settings({"baseline": {}, "x": keys}), "x")
    assert str(info.value).startswith(f"params: {expected}") and "\n" not in str(info.value)
    if "optimizer_in_backward" in keys:
        assert "grad_clip" in str(info.value)


def compare_args(params: Path, tokens: Path, work: Path, name: str) -> list[str]:
    return ["--params", str(params), "--config", name, "--tokens", str(tokens), "--embed",
            str(tokens.parent / "embed"), "--out", str(work / "compare" / name),
            "--metrics", str(work / "metrics" / "compare" / f"{name}.json")]


@pytest.fixture(scope="module")
def compared(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two configurations of the tiny profile trained by `python -m stages.compare`, as DVC runs it."""
    work = tmp_path_factory.mktemp("compare")
    params = work / "params.yaml"
    shutil.copy(ROOT / "tests" / "params.tiny.yaml", params)
    for name in ("baseline", "lean-tiled"):
        result = run_cli("compare", compare_args(params, tokens, work, name))
        assert result.returncode == 0, result.stderr
    return work


def test_each_configuration_trains_and_is_measured_beside_its_estimate(compared: Path) -> None:
    base = read_metrics(compared / "metrics" / "compare" / "baseline.json")
    lean = read_metrics(compared / "metrics" / "compare" / "lean-tiled.json")
    assert (lean["config"], lean["baseline"], lean["steps"]) == ("lean-tiled", "baseline", 4)
    assert json.loads(lean["config_keys"])["mlp_tiles"] == 4
    for m in (base, lean):
        assert math.isfinite(m["val_ppl"]) and m["val_ppl"] > 1 and m["tokens_per_sec"] > 0
        for category in [*CATEGORIES, "total"]:  # the dry run within 2 % of the meter in every category
            measured, estimated = m[f"mem_{category}_peak_mib"], m[f"est_{category}_peak_mib"]
            assert estimated == pytest.approx(measured, rel=0.02, abs=1e-3), category
    # the lean stack holds less than the baseline where it acts: optimizer state (8-bit), gradients
    # (stepped in backward: at most the largest parameter's), the logits (chunked), the activations
    assert lean["mem_optimizer_peak_mib"] < 0.5 * base["mem_optimizer_peak_mib"]
    assert lean["mem_gradients_peak_mib"] < base["mem_gradients_peak_mib"]
    assert lean["mem_total_peak_mib"] < base["mem_total_peak_mib"]
    # the per-step CSV: one row a step; the peak step module by module; the trained weights are not kept
    out = compared / "compare" / "lean-tiled"
    rows = (out / "steps.csv").read_text().splitlines()
    assert rows[0].startswith("step,train_loss") and len(rows) == 1 + 4
    assert sorted(p.name for p in out.iterdir()) == [".lmmem-out", "steps.csv", "timeline.csv"]


@pytest.mark.parametrize("change, expected", [
    ({}, "compare: no configuration 'nope' in compare.configs"),
    ({"configs": {"baseline": {}, "nope": {"loss_chunk_tokens": -4}}},
     "compare.configs.nope.loss_chunk_tokens"),
])
def test_a_failed_configuration_is_one_line_and_leaves_the_previous_outputs(
        compared: Path, tokens: Path, tmp_path: Path, change: dict[str, Any], expected: str) -> None:
    """A name not in params.yaml, or a configuration train refuses: exit 2, one line, and the
    configuration's out and metrics as they were (here: another configuration's, pointed at)."""
    params = tmp_path / "params.yaml"
    data = tiny_params()
    data["compare"].update(change)
    params.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    args = compare_args(params, tokens, compared, "nope")
    target, metrics = compared / "compare" / "nope", compared / "metrics" / "compare" / "nope.json"
    shutil.copytree(compared / "compare" / "baseline", target)  # a previous run's output of this name
    shutil.copy(compared / "metrics" / "compare" / "baseline.json", metrics)
    before = {p: p.read_bytes() for p in [*target.iterdir(), metrics]}
    try:
        result = run_cli("compare", args)
        assert result.returncode == 2
        assert expected in one_error_line(result.stderr, "compare")
        assert {p: p.read_bytes() for p in [*target.iterdir(), metrics]} == before
    finally:
        shutil.rmtree(target)
        metrics.unlink()


def test_the_report_draws_every_configuration_against_the_baseline(compared: Path, tmp_path: Path) -> None:
    metrics = compared / "metrics"
    for stage in ("ingest", "clean", "tokenize", "embed", "train", "compress", "evaluate"):
        shutil.copy(ROOT / "data" / "metrics" / f"{stage}.json", metrics / f"{stage}.json")
    params = yaml.safe_load((compared / "params.yaml").read_text(encoding="utf-8"))
    params["compare"]["configs"]["never-trained"] = {"precision": "bf16"}  # named, no metrics: not drawn
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    out = tmp_path / "report"
    assert run_stage("report", ["--metrics-dir", str(metrics), "--params-file", str(tmp_path / "params.yaml"),
                                "--eval", str(tmp_path / "no-eval"), "--steps",
                                str(tmp_path / "no-steps.csv"),
                                "--out", str(out), "--metrics", str(tmp_path / "report.json"),
                                "--params", str(tmp_path / "params.yaml")]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    base = read_metrics(metrics / "compare" / "baseline.json")
    lean = read_metrics(metrics / "compare" / "lean-tiled.json")
    section = md.split("## Techniques compared", 1)[1]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines()
             if line.startswith("| ")}
    assert "never-trained" not in lines and "| never-trained" not in md
    assert " | 1.000 | " in lines["baseline"] and "– (the train section)" in lines["baseline"]
    assert f" | {lean['mem_total_peak_mib'] / base['mem_total_peak_mib']:.3f} | " in lines["lean-tiled"]
    assert "mlp_tiles=4" in lines["lean-tiled"]
    assert f" | {lean['val_ppl'] / base['val_ppl']:.3f}" in lines["lean-tiled"]
    assert read_metrics(tmp_path / "report.json")["configurations_compared"] == 2
    # the bars: each configuration's categories measured (solid) and estimated (pale) beside
    bars = (out / "compare_memory.svg").read_text(encoding="utf-8")
    assert len(re.findall(r'<rect [^>]*fill-opacity="0.45"', bars)) == 2 * len(CATEGORIES)
    for name in ("compare_pareto.svg", "compare_speed.svg"):
        assert "lean-tiled" in (out / name).read_text(encoding="utf-8")
    assert "Techniques compared: of 2 configurations trained 4 steps each" in md
    assert "the techniques side by side at equal steps: below." in md  # the one-run summary points there
