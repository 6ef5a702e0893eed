"""Fine-tuning methods side by side, run the way `dvc repro` runs them: every run of
params.yaml's finetune.runs as `python -m stages.finetune --run NAME` on data/model and
data/tokens, one process after another, then the table the report draws, with the ratios the
targets are stated in (tensor peak × the full fine-tuning run's, accuracy against it and
against evaluate's bag-of-Word2Vec baseline).

    python -m bench.finetune [--shared '{"activation_checkpointing": false}'] [--only NAME ...]

`--shared` replaces finetune.shared (the settings every run shares) for this run.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, machine, params_file, run_stage
from stages.common.core.params import load_params
from stages.finetune import Params
from stages.report.finetuning import CATEGORIES

log = logging.getLogger("bench.finetune")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=json.loads, default=None,
                        help="finetune.shared for every run (JSON)")
    parser.add_argument("--only", nargs="+", default=None, help="these runs (and the baseline)")
    parser.add_argument("--model", type=Path, default=ROOT / "data" / "model")
    parser.add_argument("--tokens", type=Path, default=ROOT / "data" / "tokens")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        params = params_file(Path(tmp))
        if args.shared is not None:  # the mapping replaced, not merged key by key
            data = yaml.safe_load(params.read_text(encoding="utf-8"))
            data["finetune"]["shared"] = args.shared
            params.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        _, p = load_params(params, ("train", "finetune"), Params)
        names = [n for n in p.finetune.runs if args.only is None or n == p.finetune.baseline
                 or n in args.only]
        results: dict[str, dict[str, Any]] = {}
        seconds: dict[str, float] = {}
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            log.info("%s ...", name)
            started = time.perf_counter()
            results[name] = run_stage("finetune", params, work, run=Path(name), tokens=args.tokens,
                                      model=args.model,
                                      out=work / "out")
            seconds[name] = time.perf_counter() - started
    base = results[p.finetune.baseline]
    evaluated = ROOT / "data" / "eval" / "results.json"
    w2v = next((r for r in json.loads(evaluated.read_text()) if r["name"] == "word2vec-bow"), None) \
        if evaluated.is_file() else None
    print(f"\nmachine: {machine()}; {p.finetune.steps} steps of {p.finetune.batch_size} documents, "
          f"shared: {json.dumps(p.finetune.shared)}\n")
    print("| run | " + " | ".join(CATEGORIES)
          + " | tensor peak MiB | × full | largest estimate error | docs/s | "
          "test accuracy | − full (points) | macro F1 | stage wall s |")
    print("|---|" + "---|" * (len(CATEGORIES) + 9))
    for name, m in results.items():
        errors = [abs(m[f"est_error_{c}_peak_mib"]) for c in [*CATEGORIES, "total"]
                  if f"est_error_{c}_peak_mib" in m]
        cells = " | ".join(f"{m[f'mem_at_peak_{c}_mib']:.2f}" for c in CATEGORIES)
        print(f"| {name} | {cells} | {m['mem_total_peak_mib']:.2f} | "
              f"{m['mem_total_peak_mib'] / base['mem_total_peak_mib']:.3f} | {max(errors):.2%} | "
              f"{m.get('docs_per_sec', 0):.0f} | {m['accuracy']:.4f} | "
              f"{100 * (m['accuracy'] - base['accuracy']):+.2f} | "
              f"{m['f1_macro']:.4f} | {seconds[name]:.1f} |")
    if w2v is not None:
        print(f"\nbag-of-Word2Vec baseline (data/eval/results.json): test accuracy {w2v['cls_accuracy']:.4f}")
    print(f"all {len(results)} runs: {sum(seconds.values()):.0f} s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
