"""The report: byte-for-byte reproducible, hostile text escaped, the Markdown twin holding the
same numbers as the HTML, and the summary's choices on hand-made figures."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.common.core.eval_results import MEASURED
from stages.report.comparison import front
from tests.conftest import ROOT, run_stage

HOSTILE = "<script>alert(1)</script>"


def row(name: str, size: float, ppl: float, ms: float, f1: float) -> dict[str, Any]:
    return {"name": name, "status": "ok", "bytes_on_disk": int(4_000_000 * size), "size_ratio": size,
            "params": 1_000_000, "nonzero_params": 1_000_000, "val_ppl": ppl, "test_ppl": ppl + 1,
            "top1": 0.2,
            "top5": 0.4, "ms_per_token_b1": ms, "ms_per_token_batch": ms / 5, "tensor_peak_mib": 50.0,
            "rss_peak_mib": 300.0, "load_seconds": 1.0, "cls_f1_macro": f1, "cls_accuracy": f1,
            "generations": [f"{HOSTILE} | <b>{name}</b>", "质量 | 不错"],
            "greedy": [f"{HOSTILE} | <i>{name}</i>", "质量 | 好 好 好 好"], "greedy_repetition": 0.4}


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """The committed pipeline metrics and training curve, a hand-made evaluation, params with
    a hostile prompt."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for stage in ("ingest", "clean", "tokenize", "embed", "train", "compress", "evaluate"):
        shutil.copy(ROOT / "data" / "metrics" / f"{stage}.json", metrics / f"{stage}.json")
    point = {"prompt": 16, "peak_phase": "decode", "peak_step": 112, "weights_mib": 12.5, "kv_cache_mib": 4.0,
             "activations_mib": 0.25, "logits_mib": 0.5, "peak_mib": 17.25, "kv_cache_end_mib": 4.0,
             "kv_cache_predicted_mib": 4.0}
    generation = {"generation": [{**point, "batch": 8, "context": 128}, {**point, "batch": 1, "context": 128,
                                                                         "peak_mib": 13.5}],
                  "kv_cache_error": 0.0,
                  "max_batch": [{"context": 128, "budget_mib": 32.0, "batch": 37, "line_batch": 37,
                                 "line_mib": 31.75, "checked_mib": 31.5}],
                  "kv_quant": [{"bits": 0, "batch": 8, "context": 128, "kv_cache_end_mib": 4.0,
                                "kv_cache_predicted_mib": 4.0, "peak_mib": 17.25, "activations_mib": 0.25,
                                "ppl": 200.0, "tokens": 2048},
                               {"bits": 8, "batch": 8, "context": 128, "kv_cache_end_mib": 1.0625,
                                "kv_cache_predicted_mib": 1.0625, "peak_mib": 15.5, "activations_mib": 1.5,
                                "ppl": 200.02, "tokens": 2048}],
                  "kv8_ms_per_token": 2.5}  # the model's ms_per_token_batch: 2.0
    sparse = {"sparse": {"modules": 28, "weights_mib": 7.0, "dense_weights_mib": 12.82,
                         "forward_peak_mib": 48.0,
                         "forward_peak_b1_mib": 12.5, "dense_forward_peak_b1_mib": 18.25,
                         "generation_peak_b1_mib": 7.5, "dense_generation_peak_b1_mib": 13.0,
                         "max_logit_diff": 2.5e-6}, "sparse_ms_per_token_b1": 15.0}  # a's: 12.0 dense
    results = [{**row("model", 1.0, 100.0, 10.0, 0.60), **generation},
               {**row("a", 0.30, 105.0, 12.0, 0.65), **sparse},
               row("b", 0.20, 115.0, 8.0, 0.55), row("c", 0.25, 109.0, 9.0, 0.50),
               {"name": "bad", "status": "failed", "reason": '<img src=x onerror="alert(1)">'},
               {"name": "word2vec-bow", "status": "ok", "cls_f1_macro": 0.70, "cls_accuracy": 0.70}]
    (tmp_path / "eval").mkdir()  # as evaluate writes them: the machine's figures in the metrics only
    evaluated = json.loads((metrics / "evaluate.json").read_text(encoding="utf-8"))
    evaluated.update({f"{r['name']}_{k}": r.pop(k) for r in results for k in MEASURED if k in r})
    (metrics / "evaluate.json").write_text(json.dumps(evaluated), encoding="utf-8")
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results), encoding="utf-8")
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["evaluate"]["prompts"] = [HOSTILE, "质量"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    # train's peak step, module by module, as stages.common.memory.timeline writes it
    timeline = tmp_path / "timeline.csv"
    timeline.write_text("sample,step,phase,module,parameters_mib,layers.0_mib,lm_head_mib,(no module)_mib\n"
                        "0,1,forward,layers.0.mlp,10,2,0,0.5\n1,1,forward,lm_head,10,2,8,0.5\n"
                        "2,1,backward,layers.0,10,1,6,0\n", encoding="utf-8")
    (tmp_path / "eval" / "timeline.csv").write_text(
        "sample,step,phase,module,weights_mib,layers.0_mib,lm_head_mib\n0,0,prefill,layers.0,12.5,1,0\n"
        "1,0,prefill,lm_head,12.5,1,0.5\n2,112,decode,<b>layers.0</b>,12.5,4,0\n", encoding="utf-8")
    return {"metrics-dir": metrics, "steps": ROOT / "data" / "plots" / "train" / "steps.csv",
            "timeline": timeline,
            "eval": tmp_path / "eval", "params-file": tmp_path / "params.yaml"}


def report(inputs: dict[str, Path], out: Path) -> Path:
    args = [f"--{k}={v}" for k, v in inputs.items()]
    assert run_stage("report", [*args, f"--out={out}", f"--metrics={out}.json", "--params",
                                str(inputs["params-file"])]) == 0
    return out


def test_the_same_artifacts_give_the_same_bytes(inputs: dict[str, Path], tmp_path: Path) -> None:
    first, second = report(inputs, tmp_path / "one"), report(inputs, tmp_path / "two")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert {"report.html", "report.md", "loss.svg", "memory.svg", "size_vs_perplexity.svg",
            "curves"} <= set(names)
    for name in ("validation.csv", "metered.csv"):
        assert (first / "curves" / name).read_bytes() == (second / "curves" / name).read_bytes()
    for name in names:
        if name != "curves":
            assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_hostile_text_shows_as_text(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = report(inputs, tmp_path / "r")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;a&lt;/b&gt;" in page
    assert "<i>" not in page and "&lt;i&gt;a&lt;/i&gt;" in page  # the greedy generations' table
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "<script" not in markdown and "<img" not in markdown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markdown
    for svg in out.glob("*.svg"):
        assert "<script" not in svg.read_text(encoding="utf-8")


def numbers(text: str) -> list[str]:
    return re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)


def test_markdown_twin_holds_the_same_numbers_as_the_html(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = report(inputs, tmp_path / "r")
    page = (out / "report.html").read_text(encoding="utf-8")
    body = re.sub(r"<figure>.*?</figure>|<style>.*?</style>|<title>.*?</title>", " ", page, flags=re.S)
    page_text = html.unescape(re.sub(r"<[^>]+>", " ", body))
    markdown = (out / "report.md").read_text(encoding="utf-8")
    md_text = html.unescape("\n".join(line for line in markdown.splitlines() if not line.startswith("![")))
    assert numbers(page_text) == numbers(md_text)
    assert len(numbers(page_text)) > 100


def test_summary_picks_from_the_figures(inputs: dict[str, Path], tmp_path: Path) -> None:
    markdown = (report(inputs, tmp_path / "r") / "report.md").read_text(encoding="utf-8")
    # within 10 % of perplexity 100: a (0.30), c (0.25); b is smaller but 1.15 x
    assert ("smallest variant within 10 % of the trained model's perplexity is c: 0.250 × the bytes at "
            "1.090 × the perplexity") in markdown
    assert "The fastest at batch 1 is b (8.00 ms per token, 0.800 × the trained model)" in markdown
    assert "best language model's macro F1 is 0.650 (a); the bag-of-Word2Vec baseline 0.700" in markdown
    assert "| bad | failed: <img" not in markdown and "| bad | failed: &lt;img" in markdown
    assert "| 50.0 | 0.40 | 0.650 |" in markdown  # a's inference peak, greedy repetition, probe F1


def test_generation_memory_shows_the_largest_point_and_the_batch_within_the_budget(
        inputs: dict[str, Path], tmp_path: Path) -> None:
    markdown = (report(inputs, tmp_path / "r") / "report.md").read_text(encoding="utf-8")
    assert "# Generation memory" in markdown
    assert "| model | 8 × 128 | 17.25 | 12.50 | 4.00 | 0.25 | 0.50 | 4.000 | 4.000 | 0.00 % |" in markdown
    assert "| model | 128 | 37 | 31.75 | 31.50 |" in markdown and "fits 32.0 MiB" in markdown
    assert "| a | 8 × 128" not in markdown  # a row without generation figures has none
    # the quantized cache beside the exact one: 4 / 1.0625 = 3.76 × smaller, perplexity 200.02 / 200, latency
    # 2.5 / 2.0
    assert "| exact | 4.000 | 4.000 | 1.00 | 17.25 | 200.00 | 1.0000 | 2.00 | 1.00 |" in markdown
    assert "| 8 | 1.062 | 1.062 | 3.76 | 15.50 | 200.02 | 1.0001 | 2.50 | 1.25 |" in markdown
    # a kept sparse: 7.5 / 13.0 = 0.577 of its dense generation peak
    assert "# Sparse weights at run time" in markdown
    assert ("| a | 28 | 12.82 → 7.00 | 50.0 → 48.0 | 18.25 → 12.50 | 13.00 → 7.50 | 0.577 | 12.00 → 15.00 | "
            "2.5e-06 |"
            in markdown)


def test_memory_by_module_draws_each_timeline_and_lists_its_peak(inputs: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    out = report(inputs, tmp_path / "r")
    markdown = (out / "report.md").read_text(encoding="utf-8")
    section = markdown.split("# Memory by module", 1)[1]
    # training: the largest sample is the head's, 10 + 2 + 8 + 0.5 = 20.5 MiB; its bands by size
    assert "sample 1, forward, in `lm_head`), 20.50 MiB:" in section
    assert ("| parameters | 10.00 | 48.8% |\n| lm_head | 8.00 | 39.0% |\n| layers.0 | 2.00 | 9.8% |\n"
            "| (no module) | 0.50 | 2.4% |") in section
    # generation: the last decode step's, 12.5 + 4 = 16.5 MiB, the head's band at 0 left out
    assert "sample 2, decode, in `&lt;b&gt;layers.0&lt;/b&gt;`), 16.50 MiB:" in section
    assert "| lm_head | 0.00" not in section
    train_svg = (out / "timeline-train.svg").read_text(encoding="utf-8")
    assert train_svg.count("<polygon") == 4 and "<script" not in train_svg
    assert ">forward<" in train_svg and ">backward<" in train_svg  # where each phase starts
    html = (out / "report.html").read_text(encoding="utf-8")  # a module name is text, not markup
    assert "&lt;b&gt;layers.0&lt;/b&gt;" in html and "<b>layers.0</b>" not in html


def test_each_stage_peak_rss_is_listed_beside_its_prediction(inputs: dict[str, Path], tmp_path: Path) -> None:
    train = json.loads((inputs["metrics-dir"] / "train.json").read_text(encoding="utf-8"))
    train.update(peak_rss_mib=800.0, rss_start_mib=230.0, rss_tensor_mib=300.0, rss_predicted_mib=760.0,
                 rss_prediction_error=760 / 800 - 1, allocator="jemalloc",
                 machine_allocator="jemalloc (libjemalloc.so.2)")
    (inputs["metrics-dir"] / "train.json").write_text(json.dumps(train), encoding="utf-8")
    markdown = (report(inputs, tmp_path / "r") / "report.md").read_text(encoding="utf-8")
    assert "| train | 230.0 | 300.0 | 760.0 | 800.0 | -5.0% |" in markdown
    allocator = next(line for line in markdown.splitlines()
                     if line.startswith("| C allocator (base.allocator) |"))
    assert "jemalloc (libjemalloc.so.2) (train)" in allocator  # the other stages' glibc beside it


def test_curves_for_dvc_plots_keep_only_filled_cells(inputs: dict[str, Path], tmp_path: Path) -> None:
    """The training CSV's sparse columns, dense: the steps that have a value, with that value."""
    import csv

    out = report(inputs, tmp_path / "r")
    with inputs["steps"].open(newline="") as f:
        steps = list(csv.DictReader(f))
    for name, column in (("validation.csv", "val_loss"), ("metered.csv", "tensor_peak_mib")):
        with (out / "curves" / name).open(newline="") as f:
            rows = list(csv.DictReader(f))
        expected = [(r["step"], r[column]) for r in steps if r[column] != ""]
        assert [(r["step"], r[column]) for r in rows] == expected and 0 < len(expected) < len(steps)


def test_a_run_on_two_ranks_lists_each_rank(inputs: dict[str, Path], tmp_path: Path) -> None:
    train_file = inputs["metrics-dir"] / "train.json"
    train = json.loads(train_file.read_text(encoding="utf-8"))
    train.update({"dist_world_size": 2, "dist_strategy": "zero1"})
    for rank, (optimizer, total) in enumerate([(12.34, 321.5), (8.76, 301.25)]):
        train.update({f"rank{rank}_mem_parameters_peak_mib": 31.39,
                      f"rank{rank}_mem_gradients_peak_mib": 31.39,
                      f"rank{rank}_mem_optimizer_peak_mib": optimizer,
                      f"rank{rank}_mem_total_peak_mib": total,
                      f"rank{rank}_est_total_peak_mib": total * 1.01, f"rank{rank}_saving_vs_ddp": 0.125
                      + rank / 10})
    train_file.write_text(json.dumps(train), encoding="utf-8")
    md = (report(inputs, tmp_path / "out") / "report.md").read_text(encoding="utf-8")
    assert "| workspace | – | 2 × zero1 |" in md
    assert "| workspace | 2 × zero1 | 0 | 31.39 | 31.39 | 12.34 | 321.5 | 324.7 | +1.00 % | 12.5 % |" in md
    assert "| workspace | 2 × zero1 | 1 | 31.39 | 31.39 | 8.76 | 301.2 | 304.3 | +1.00 % | 22.5 % |" in md
    one_rank = (report({**inputs, "metrics-dir": ROOT / "data" / "metrics"}, tmp_path / "one") / "report.md")
    assert "| rank |" not in one_rank.read_text(encoding="utf-8")


def test_pareto_front() -> None:
    points = [("a", 1.0, 5.0), ("b", 2.0, 4.0), ("c", 3.0, 6.0), ("d", 0.5, 9.0), ("e", 2.0, 4.5)]
    assert front(points) == ["d", "a", "b"]


def test_no_metrics_is_one_line_and_no_output(tmp_path: Path, inputs: dict[str, Path]) -> None:
    empty = tmp_path / "nothing"
    empty.mkdir()
    args = {**inputs, "metrics-dir": empty}
    rc = run_stage("report", [*[f"--{k}={v}" for k, v in args.items()], f"--out={tmp_path / 'r'}",
                              f"--metrics={tmp_path / 'r.json'}", "--params", str(inputs["params-file"])])
    assert rc == 2 and not (tmp_path / "r").exists()


def test_the_plan_section_answers_each_device_and_sets_others_beside_it(inputs: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """A real plan of the tiny llama (stages.plan) drawn: each device's answer, and the asked
    stack beside accelerate's and Korthikanti et al.'s figures."""
    from stages.plan.catalog import architecture
    from stages.plan.dryrun import Question
    from stages.plan.planner import plan

    q = Question(architecture(str(ROOT / "stages" / "plan" / "tiny-llama.json")), "pretrain", batch_size=2,
                 micro_batch_size=2, context=64, train={"precision": "bf16"})
    found = plan(q, {"tiny": 0.001, "large": 1.0}, reserve_mib=0.5, max_seconds=60)
    (tmp_path / "plan").mkdir()
    (tmp_path / "plan" / "plans.json").write_text(json.dumps([{**found, "parameters": 164160,
                                                               "published_parameters": None}]),
                                                  encoding="utf-8")
    markdown = (report({**inputs, "plan": tmp_path / "plan"},
                       tmp_path / "r") / "report.md").read_text(encoding="utf-8")
    assert "## Plan: will it fit, and with which stack" in markdown
    asked = found["tried"][0]
    large = next(line for line in markdown.splitlines() if line.startswith("| tiny-llama | pretrain |")
                 and "large (1 GiB)" in line)
    assert f"| yes | as asked | {asked['peak_mib']:,.1f} | 1.00 |" in large
    tiny = next(line for line in markdown.splitlines() if "tiny (0 GiB)" in line)
    assert "| no | nothing tried fits |" in tiny  # 1 MiB less half of it held back: not even the weights
    beside = next(line for line in markdown.splitlines() if line.startswith("| tiny-llama | pretrain | ")
                  and line.count("|") == 7)
    assert f"{found['others']['accelerate_training_mib']:,.1f}" in beside


def test_a_metric_that_is_not_a_finite_number_is_marked_not_hidden(inputs: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    train = json.loads((inputs["metrics-dir"] / "train.json").read_text(encoding="utf-8"))
    train.update(peak_rss_mib=float("nan"), val_ppl=float("inf"))
    (inputs["metrics-dir"] / "train.json").write_text(json.dumps(train), encoding="utf-8")  # NaN, Infinity
    markdown = (report(inputs, tmp_path / "r") / "report.md").read_text(encoding="utf-8")
    assert ("**NOT FINITE: train.peak_rss_mib (nan), train.val_ppl (inf)**: these figures are not "
            "measurements") in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| train |")
               and "NOT FINITE (nan)" in line)
    # the cell says so, not a dash as for a missing one
    assert "–" not in row.split("NOT FINITE (nan)")[0][-4:]
