"""report: one self-contained HTML page and its Markdown twin of what each memory technique
saved and cost, from the pipeline's artifacts and every DVC experiment of this commit.

Reads data/metrics/<stage>.json of every stage, data/plots/train/steps.csv and timeline.csv,
data/eval/results.json and timeline.csv, params.yaml (provenance: what differs from the defaults) and the
experiments under git's refs/exps of HEAD (read from git: the report runs inside `dvc repro`, which
holds DVC's lock). Writes data/report/report.html (plots inline as SVG, no script, no
font or style fetched from anywhere), report.md with the same tables and numbers, and the
figures as .svg files beside it, and curves/*.csv (the training CSV's sparse columns, dense)
for dvc.yaml's plots. The same artifacts give the same bytes: no clock time in the body,
fixed ordering, SVG coordinates rounded.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import logging
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from stages.common.core.artifacts import atomic_dir, read_json
from stages.common.core.errors import StageError
from stages.common.core.eval_results import eval_rows
from stages.common.core.params import BaseParams, Section, read_params_file
from stages.common.harness.experiments import experiment_records, head_revision
from stages.common.harness.stage import stage_main
from stages.report import by_module, comparison, finetuning, serving, training
from stages.report import plan as planned
from stages.report.charts import scatter
from stages.report.document import Doc, num, ratio
from stages.report.provenance import (LIBRARIES, flat, machine_rows, not_finite, one_blas_list, rss_rows,
                                      version)

log = logging.getLogger("lmmem.report")

STAGES = ["ingest", "clean", "tokenize", "embed", "train", "domain", "compress", "evaluate"]
WORKSPACE = "workspace"  # the run of the checked-out params (data/metrics), beside the experiments


class Params(Section):
    title: str = Field("lmmem: what each memory technique saved and cost", description="the page's heading")
    experiments: bool = Field(
        True,
        description="compare the DVC experiments of this commit (git refs/exps) beside the workspace run")
    generation_chars: int = Field(160, description="each generation shown up to this many characters")


@dataclass(frozen=True)
class Paths:
    metrics_dir: Path = Path("data/metrics")
    steps: Path = Path("data/plots/train/steps.csv")
    timeline: Path = Path("data/plots/train/timeline.csv")  # train's peak step, module by module
    eval: Path = Path("data/eval")
    plan: Path = Path("data/plan")
    params_file: Path = Path("params.yaml")
    out: Path = Path("data/report")


# ----------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    params: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    steps: list[dict[str, str]]
    results: list[dict[str, Any]]
    experiments: list[dict[str, Any]]
    compared: list[dict[str, Any]]  # the compare stage's configurations
    tuned: list[dict[str, Any]]  # the finetune stage's runs
    adapted: list[dict[str, Any]]  # the adapt stage's runs


def read_inputs(paths: Paths, params: Params) -> Inputs:
    metrics = {s: read_json(paths.metrics_dir / f"{s}.json") for s in STAGES
               if (paths.metrics_dir / f"{s}.json").is_file()}
    if not metrics:
        raise StageError(f"{paths.metrics_dir} holds no stage metrics: run the pipeline first")
    steps: list[dict[str, str]] = []
    if paths.steps.is_file():
        with paths.steps.open(newline="", encoding="utf-8") as f:
            steps = list(csv.DictReader(f))
    results = eval_rows(paths.eval / "results.json", paths.metrics_dir / "evaluate.json") \
        if (paths.eval / "results.json").is_file() else []
    experiments = experiment_records(Path.cwd(), paths.metrics_dir.as_posix()) if params.experiments else []
    given = read_params_file(paths.params_file)
    return Inputs(given, metrics, steps, results, experiments,
                  comparison.read_compared(paths.metrics_dir, given),
                  finetuning.read_tuned(paths.metrics_dir, given),
                  finetuning.read_tuned(paths.metrics_dir, given, "adapt"))


def defaults() -> dict[str, Any]:
    """Every stage section's defaults (its Params model), keyed like params.yaml."""
    out: dict[str, Any] = {"base": BaseParams().model_dump()}
    for stage in [*STAGES, "report"]:
        model = importlib.import_module(f"stages.{stage}").Params
        out[stage] = model().model_dump()
    out["compare"] = importlib.import_module("stages.compare").Settings().model_dump()
    for section in ("finetune", "domain", "adapt"):  # a section of a stage that reads several
        out[section] = importlib.import_module(f"stages.{section}").Settings().model_dump()
    return out


# ----------------------------------------------------------------------------- sections


def configurations(inputs: Inputs, paths: Paths) -> list[dict[str, Any]]:
    """The training runs to compare: the workspace's and each experiment's train metrics."""
    train_file = (paths.metrics_dir / "train.json").as_posix()
    runs = []
    if "train" in inputs.metrics:
        runs.append({"name": WORKSPACE, "train": inputs.metrics["train"], "params": inputs.params})
    for exp in inputs.experiments:
        if train_file in exp["metrics"]:
            runs.append({"name": exp["name"], "train": exp["metrics"][train_file], "params": exp["params"]})
    return runs


def summary(inputs: Inputs, runs: list[dict[str, Any]]) -> list[str]:
    lines = []
    base = next((r for r in runs if r["name"] == WORKSPACE), None)
    if len(runs) > 1 and base is not None:
        best_ppl = min(r["train"].get("val_ppl", math.inf) for r in runs)
        fair = [r for r in runs if r["train"].get("val_ppl", math.inf) <= best_ppl * 1.05]
        lean = min(fair, key=lambda r: (r["train"]["mem_total_peak_mib"], r["name"]))
        lines.append(f"Training: of {len(runs)} runs, {lean['name']} held the least tensor memory within 5 "
                     f"% of the best perplexity: {num(lean['train']['mem_total_peak_mib'])} MiB "
                     f"({ratio(lean['train']['mem_total_peak_mib'], base['train']['mem_total_peak_mib'])} "
                     f"the workspace run) at perplexity {num(lean['train'].get('val_ppl'))}, "
                     f"{num(lean['train'].get('tokens_per_sec'), 0)} tokens/s.")
    elif base is not None:
        more = ("the techniques side by side at equal steps: below" if inputs.compared else
                "run a sweep (python -m flows.sweep) or add compare.configs to compare techniques")
        lines.append(f"Training: one run (the workspace's), {num(base['train']['mem_total_peak_mib'])} MiB "
                     f"tensor peak, perplexity {num(base['train'].get('val_ppl'))}; {more}.")
    if (line := comparison.summary_line(inputs.compared, inputs.params)) is not None:
        lines.append(line)
    ok = {r["name"]: r for r in inputs.results if r.get("status") == "ok" and "val_ppl" in r}
    model = ok.get("model")
    if model:
        within = [r for r in ok.values() if r["val_ppl"] <= model["val_ppl"] * 1.10]
        small = min(within, key=lambda r: (r["size_ratio"], r["name"]))
        line = (f"Compression: the smallest variant within 10 % of the trained model's perplexity is "
                f"{small['name']}: {small['size_ratio']:.3f} × the bytes at "
                f"{small['val_ppl'] / model['val_ppl']:.3f} × the perplexity.")
        timed = [r for r in ok.values() if "ms_per_token_b1" in r]  # latency: from the metrics file
        if timed and "ms_per_token_b1" in model:
            fast = min(timed, key=lambda r: (r["ms_per_token_b1"], r["name"]))
            line += (f" The fastest at batch 1 is {fast['name']} ({num(fast['ms_per_token_b1'], 2)} ms per "
                     f"token, {ratio(fast['ms_per_token_b1'], model['ms_per_token_b1'])} the trained model).")
        lines.append(line)
    probes = [r for r in inputs.results if "cls_f1_macro" in r and r["name"] != "word2vec-bow"]
    w2v = next((r for r in inputs.results if r["name"] == "word2vec-bow" and "cls_f1_macro" in r), None)
    if probes:
        best = max(probes, key=lambda r: (r["cls_f1_macro"], r["name"]))
        lines.append(f"Sentiment probe: the best language model's macro F1 is {best['cls_f1_macro']:.3f} "
                     f"({best['name']})" + (f"; the bag-of-Word2Vec baseline {w2v['cls_f1_macro']:.3f}."
                                            if w2v else "."))
    return lines


def provenance(doc: Doc, inputs: Inputs) -> None:
    doc.heading(1, "Provenance")
    canonical = json.dumps(inputs.params, sort_keys=True, ensure_ascii=False, default=str)
    base = inputs.params.get("base", {})
    doc.table(["item", "value"], [
        ["git revision", head_revision(Path.cwd()) or "not a git repository"],
        ["params hash (sha256 of params.yaml's values)", hashlib.sha256(canonical.encode()).hexdigest()[:16]],
        ["seed", str(base.get("seed", "–"))],
        ["device", str(base.get("device", "cpu"))],
        ["portable numerics (base.portable)", str(base.get("portable", True)).lower()],
        *machine_rows(one_blas_list(inputs.metrics)),
        ["this report's machine", f"{platform.machine()}, {os.cpu_count()} cores"],
        ["python", platform.python_version()],
    ] + [[lib, version(lib)] for lib in LIBRARIES])
    doc.para("Peak RSS of each stage's process (MiB), beside its prediction: the RSS at the start of its "
             "work, plus the overhead fitted for the stage and allocator, plus a scale on its tensors "
             "(stages/common/memory/rss_prediction.py).")
    doc.table(["stage", "start", "tensors", "predicted", "measured", "error"], rss_rows(inputs.metrics))
    default = flat(defaults())
    whole = frozenset(k for k, v in default.items() if v == {})  # e.g. compress.variants: names, not fields
    default = {k: (sorted(v) if k in whole else v) for k, v in default.items()}
    given = flat({k: v for k, v in inputs.params.items() if k != "flows"}, whole=whole)
    changed = [[key, json.dumps(given[key], ensure_ascii=False),
                json.dumps(default.get(key), ensure_ascii=False)]
               for key in given if default.get(key) != given[key]]
    doc.para(f"Params that differ from the defaults ({len(changed)}):")
    doc.table(["param", "value", "default"], changed)


def data_section(doc: Doc, inputs: Inputs) -> None:
    m = inputs.metrics
    doc.heading(1, "Data")
    ingest, clean, tokenize, embed = (m.get(s, {}) for s in ("ingest", "clean", "tokenize", "embed"))
    source = inputs.params.get("ingest", {}).get("source", "–")
    languages = ", ".join(f"{k.removeprefix('docs_lang_')} {num(v)}" for k, v in sorted(ingest.items())
                          if k.startswith("docs_lang_"))
    doc.para(f"Source {source}: {num(ingest.get('docs'))} documents, {num(ingest.get('chars'))} characters "
             f"(by language: {languages or '–'}).")
    doc.table(["split", "documents read", "characters read", "documents kept", "tokens"], [
        [split, num(ingest.get(f"docs_{split}")), num(ingest.get(f"chars_{split}")),
         num(clean.get(f"docs_{split}")),
         num(tokenize.get(f"tokens_{split}"))] for split in ("train", "validation", "test")])
    dropped = [f"{k.removeprefix('dropped_').replace('_', ' ')}: {num(v)}" for k, v in sorted(clean.items())
               if k.startswith("dropped_")]
    doc.para("Cleaning dropped: " + ("; ".join(dropped) or "–")
             + f" (of {num(clean.get('docs_in'))} documents; "
             f"{num(clean.get('html_docs'))} had HTML, {num(clean.get('urls'))} URLs and "
             f"{num(clean.get('emails'))} "
             "e-mail addresses replaced).")
    doc.para(f"Tokenization: vocabulary {num(tokenize.get('vocab_size'))}, unknown-token rate on test "
             f"{num(tokenize.get('unk_rate_test'), 4)}; jieba against the gold segmentation "
             f"({num(tokenize.get('gold_lines'))} lines): precision "
             f"{num(tokenize.get('gold_precision'), 3)}, "
             f"recall {num(tokenize.get('gold_recall'), 3)}, F1 {num(tokenize.get('gold_f1'), 3)}.")
    doc.para(f"Word2Vec: {num(embed.get('w2v_vocab_size'))} words of {num(embed.get('vector_size'))} "
             f"dimensions, vocabulary coverage {num(embed.get('vocab_coverage'), 4)}, analogies answered "
             f"{num(embed.get('analogy_answered'))} of {num(embed.get('analogy_questions'))} "
             f"(coverage {num(embed.get('analogy_coverage'), 3)}), probe words found "
             f"{num(embed.get('probes_found'))} "
             f"of {num(embed.get('probes'))}.")


def compression_section(doc: Doc, inputs: Inputs, params: Params) -> None:
    doc.heading(1, "Compression")
    if not inputs.results:
        doc.para("No evaluation results.")
        return
    model = next((r for r in inputs.results if r["name"] == "model"), {})
    rows = []
    for r in inputs.results:
        if r.get("status") != "ok" or "val_ppl" not in r:
            reason = r.get("reason", "")
            rows.append([r["name"], r.get("status", "–") + (f": {reason}" if reason else "")] + ["–"] * 10
                        + [num(r.get("cls_f1_macro"), 3)])
            continue
        rows.append([r["name"], "ok", num(r["bytes_on_disk"] / 2**20, 2), f"{r['size_ratio']:.3f}",
                     num(r["bytes_on_disk"] / r["params"], 2), num(r["val_ppl"]),
                     ratio(r["val_ppl"], model.get("val_ppl")),
                     num(r["top1"], 3), num(r.get("ms_per_token_b1"), 2), num(r.get("ms_per_token_batch"), 2),
                     num(r["tensor_peak_mib"]), num(r.get("greedy_repetition"), 2),
                     num(r.get("cls_f1_macro"), 3)])
    doc.table(["model", "status", "MiB on disk", "× bytes", "bytes/param", "val ppl", "× ppl", "top-1",
               "ms/token b1", "ms/token batch", "inference peak MiB", "greedy repetition", "probe F1"], rows)
    doc.para("Greedy repetition: 1 − distinct tokens / tokens of each prompt's greedy continuation, "
             "averaged; near 1 when one token repeats, 0 when none does.")
    ok = [r for r in inputs.results if r.get("status") == "ok" and "val_ppl" in r]
    doc.figure("size_vs_perplexity",
               scatter("Size against perplexity", "MiB on disk", "validation perplexity",
                       [(r["name"], r["bytes_on_disk"] / 2**20, r["val_ppl"])
                        for r in ok]),
               "Every evaluated model: bytes on disk against validation perplexity.")
    prompts = inputs.params.get("evaluate", {}).get("prompts", [])
    for key, title in (("generations", "Generations (the same prompts, seeded)"),
                       ("greedy", "Greedy generations")):
        generated = [r for r in inputs.results if r.get(key)]
        if prompts and generated:
            doc.heading(2, title)
            doc.table(["model", *prompts], [[r["name"], *[g[:params.generation_chars] for g in r[key]]]
                                            for r in generated])


def write_curves(folder: Path, steps: list[dict[str, str]]) -> None:
    """The training CSV's sparse columns as dense files of their own (validation on the
    evaluated steps, the tensor peak on the metered ones), for dvc.yaml's plots: DVC draws an
    empty cell as 0, the report skips it, and both must draw the same curves."""
    folder.mkdir()
    for name, column in (("validation.csv", "val_loss"), ("metered.csv", "tensor_peak_mib")):
        with (folder / name).open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["step", column])
            writer.writerows([r["step"], r[column]] for r in steps if r.get(column))


def run(params: Params, paths: Paths, base: BaseParams) -> dict[str, Any]:
    inputs = read_inputs(paths, params)
    runs = configurations(inputs, paths)
    doc = Doc()
    doc.heading(1, "Summary")
    doc.bullets(not_finite(inputs.metrics) + summary(inputs, runs))
    provenance(doc, inputs)
    data_section(doc, inputs)
    training.section(doc, inputs.steps, inputs.params, runs)
    comparison.section(doc, inputs.compared, inputs.params)
    finetuning.section(doc, inputs.tuned, inputs.params, inputs.results)
    finetuning.adapt_section(doc, inputs.adapted, inputs.params, inputs.metrics.get("domain"))
    compression_section(doc, inputs, params)
    serving.section(doc, inputs.results)
    by_module.section(doc, by_module.read_rows(paths.timeline),
                      by_module.read_rows(paths.eval / "timeline.csv"))
    planned.section(doc, planned.read_plans(paths.plan))
    html, markdown = doc.html(params.title), doc.markdown(params.title)
    with atomic_dir(paths.out, "report") as tmp:
        (tmp / "report.html").write_text(html, encoding="utf-8")
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        for name, svg in doc.figures.items():
            (tmp / name).write_text(svg, encoding="utf-8")
        write_curves(tmp / "curves", inputs.steps)
    log.info("report: %d experiments, %d training runs, %d models", len(inputs.experiments), len(runs),
             len(inputs.results))
    return {"html_bytes": len(html.encode()), "markdown_bytes": len(markdown.encode()),
            "experiments": len(inputs.experiments), "training_runs": len(runs), "models": len(inputs.results),
            "configurations_compared": len(inputs.compared), "finetune_runs": len(inputs.tuned),
            "adapt_runs": len(inputs.adapted), "figures": len(doc.figures)}


def main(argv: list[str] | None = None) -> int:
    return stage_main("report", Params, Paths, run, argv, doc=__doc__)

