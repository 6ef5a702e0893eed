"""Peak RSS predicted from the tensor estimate: fit the runtime and allocator overhead of
stages.common.memory.rss_prediction on models of some sizes, check the prediction on models of other sizes,
per allocator, each stage run in a fresh process under `base.allocator`.

    python -m bench.rss_prediction [--steps 40] [--allocators glibc jemalloc] [--out /tmp/lmmem-rss] [--reuse]

Why it is built this way: docs/design-notes.md, `bench.rss_prediction`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, machine, params_file, run_stage
from stages.common.harness.malloc import NAMES, missing

FITTED = {"width 64": {"model": {"width": 64}}, "width 256": {"model": {"width": 256}},
          "width 192, batch 4": {"model": {"width": 192}, "batch_size": 4, "micro_batch_size": 4}}
CHECKED = {"width 128 (shipped)": {}, "width 384, 2 layers": {"model": {"width": 384, "layers": 2}},
           "width 96, batch 16": {"model": {"width": 96}, "batch_size": 16, "micro_batch_size": 16}}
DATA_STAGES = ("ingest", "clean", "tokenize", "embed", "warmstart", "domain", "report")
Point = tuple[float, float, float, float]  # start, tensors, weights, peak (MiB)


def solve(points: list[Point], weights: bool) -> tuple[float, float, float]:
    """Least squares of peak − start on (1, tensors, weights), or (`weights` False) on (1,
    tensors) alone: (overhead, per tensor MiB, per weight MiB)."""
    import numpy as np

    a = np.array([[1.0, t, w] if weights else [1.0, t] for _, t, w, _ in points])
    y = np.array([peak - start for start, _, _, peak in points])
    found = [*np.linalg.lstsq(a, y, rcond=None)[0], 0.0]
    return float(found[0]), float(found[1]), float(found[2])


def stage(name: str, params: Path, work: Path, reuse: bool, **paths: Path) -> dict[str, Any]:
    """A stage's metrics: run now, or (`reuse`) read from an earlier run of this benchmark."""
    done = work / "metrics" / f"{name}.json"
    if reuse and done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    return run_stage(name, params, work, **paths)


def train_and_evaluate(name: str, allocator: str, train: dict[str, Any], steps: int, out: Path,
                       reuse: bool, evaluate: bool) -> dict[str, Point]:
    """One configuration: train's start, tensor estimate, weights and peak; the trained model's in
    evaluate (params.yaml's evaluate: the probe, the quantized caches and all)."""
    work = out / allocator / name.replace(" ", "-").replace(",", "")
    work.mkdir(parents=True, exist_ok=True)
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["train"]
    params = params_file(
        work, base={"allocator": allocator},
        train={**train, "steps": steps, "warmup_steps": min(10, steps - 1), "eval_every": steps,
               "checkpoint_every": steps,
               "prune": {**shipped["prune"], "start_step": 0, "end_step": steps - 1}},
        evaluate={"variants": []})
    trained = stage("train", params, work, reuse, tokens=ROOT / "data/tokens", embed=ROOT / "data/warmstart",
                    out=work / "model", plots=work / "plots", checkpoints=work / "ckpt")
    found = {"train": (trained["rss_start_mib"], trained["rss_tensor_mib"],
                       trained.get("rss_weights_mib", trained["est_parameters_peak_mib"]),
                       trained["peak_rss_mib"])}
    if evaluate:
        evaluated = stage("evaluate", params, work, reuse, model=work / "model",
                          compressed=work / "no-variants",
                          tokens=ROOT / "data/tokens", embed=ROOT / "data/embed", out=work / "eval")
        found["evaluate"] = (evaluated["model_rss_start_mib"], evaluated["model_rss_tensor_mib"],
                             evaluated["model_rss_weights_mib"], evaluated["model_rss_peak_mib"])
    return found


def data_stages(allocator: str, out: Path, source: str = "",
                reuse: bool = False) -> dict[str, dict[str, Any]]:
    """Each data stage's metrics on the built-in corpus (or `source`)."""
    work = out / allocator / ("data" if not source else source.replace(":", "-"))
    work.mkdir(parents=True, exist_ok=True)
    params = params_file(work, base={"allocator": allocator},
                         **({"ingest": {"source": source}} if source else {}))
    folders = {"ingest": {"out": work / "raw"}, "clean": {"raw": work / "raw", "out": work / "clean"},
               "tokenize": {"clean": work / "clean", "out": work / "tokens"},
               "embed": {"tokens": work / "tokens", "out": work / "embed"},
               "warmstart": {"embed": work / "embed", "out": work / "warmstart"},
               "domain": {"tokens": work / "tokens", "out": work / "domain"},
               # the report of the repository's pipeline (its metrics, curves and evaluation)
               "report": {"metrics_dir": ROOT / "data/metrics", "steps": ROOT / "data/plots/train/steps.csv",
                          "timeline": ROOT / "data/plots/train/timeline.csv", "eval": ROOT / "data/eval",
                          "params_file": ROOT / "params.yaml", "out": work / "report"}}
    return {name: stage(name, params, work, reuse, **folders[name]) for name in DATA_STAGES}


def data_check(allocators: list[str], source: str, out: Path) -> None:
    """The data stages on another corpus: the error of the prediction each stage records
    (with the overhead stages/common/memory/rss_prediction.py holds, fitted on the built-in corpus)."""
    print(f"\nThe data stages on {source}, with the overhead fitted on the built-in corpus:\n")
    print("| allocator | stage | start MiB | peak RSS MiB | predicted MiB | error |")
    print("|---|---|---|---|---|---|")
    for allocator in allocators:
        if missing(allocator):
            continue
        for stage, m in data_stages(allocator, out, source).items():
            error = m.get("rss_prediction_error")
            print(f"| {allocator} | {stage} | {m['rss_start_mib']:.1f} | {m['peak_rss_mib']:.1f} | "
                  f"{m.get('rss_predicted_mib', '–')} | {'–' if error is None else f'{error:+.1%}'} |",
                  flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--allocators", nargs="*", default=list(NAMES))
    parser.add_argument("--evaluate-under", nargs="*", default=["glibc"],
                        help="the allocators evaluate is fitted and checked under (a minute a configuration)")
    parser.add_argument("--reuse", action="store_true",
                        help="read a stage's metrics from an earlier run in --out "
                        "where there are some, instead of running it again")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lmmem-rss"))
    parser.add_argument("--data-only", action="store_true", help="fit the data stages and the report only")
    parser.add_argument("--check-corpus", default="", help="only run the data stages on this source "
                        "(e.g. builtin:en-news) and print the error of their predictions")
    args = parser.parse_args()
    if args.check_corpus:
        data_check(args.allocators, args.check_corpus, args.out)
        return 0
    if args.data_only:
        fits = {a: data_stages(a, args.out, reuse=args.reuse) for a in args.allocators if not missing(a)}
        print(json.dumps({s: {a: (round(m[s]["peak_rss_mib"] - m[s]["rss_start_mib"], 1), 0.0)
                              for a, m in fits.items()} for s in DATA_STAGES}, indent=1, sort_keys=True))
        return 0
    print(f"machine: {machine()}; train {args.steps} steps, evaluate the trained model alone\n")
    print("| allocator | stage | configuration | start MiB | tensors MiB | weights MiB | peak RSS MiB | "
          "predicted MiB | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for allocator in args.allocators:
        problem = missing(allocator)
        if problem:
            print(f"| {allocator} | {problem} | | | | | | |")
            continue
        data = data_stages(allocator, args.out, reuse=args.reuse)
        runs = {name: train_and_evaluate(name, allocator, train, args.steps, args.out, args.reuse,
                                         allocator in args.evaluate_under)
                for name, train in {**FITTED, **CHECKED}.items()}
        for kind in ("train", "evaluate") if allocator in args.evaluate_under else ("train",):
            # training copies its weights (a checkpoint, the saved model); evaluate's tensors hold them
            overhead, per_tensor, per_weight = solve([runs[name][kind] for name in FITTED],
                                                     weights=kind == "train")
            table.setdefault(kind,
                             {})[allocator] = (round(overhead, 1), round(per_tensor, 3), round(per_weight, 3))
            for name, figures in runs.items():
                start, tensors, weights, peak = figures[kind]
                predicted = start + overhead + per_tensor * tensors + per_weight * weights
                print(f"| {allocator} | {kind} | {name} ({'fitted' if name in FITTED else 'checked'}) | "
                      f"{start:.1f} | "
                      f"{tensors:.1f} | {weights:.1f} | {peak:.1f} | {predicted:.1f} | "
                      f"{predicted / peak - 1:+.1%} |",
                      flush=True)
        for name, m in data.items():
            extra = m["peak_rss_mib"] - m["rss_start_mib"]
            table.setdefault(name, {})[allocator] = (round(extra, 1), 0.0, 0.0)
            print(f"| {allocator} | {name} | built-in corpus (fitted) | {m['rss_start_mib']:.1f} | 0 | 0 | "
                  f"{m['peak_rss_mib']:.1f} | | |", flush=True)
    print("\nOVERHEAD for stages/common/memory/rss_prediction.py:")
    print(json.dumps(table, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
