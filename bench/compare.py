"""The comparison of the main job, run the way `dvc repro` runs it: every configuration of
params.yaml's compare.configs (or those named) as `python -m stages.compare --config NAME`,
one process after another on the same tokens, then the table the report draws, with each
stage's wall time (the comparison's share of the main job).

    python -m bench.compare [--only NAME ...] [--steps N] [--tokens data/tokens]

Prints per configuration: the tensor peak by category and in total, × the baseline's, the
dry run's largest error over the categories, tokens/s and the validation perplexity, each
beside the baseline's; then the total wall time and the report's summary line (the leanest configuration
within 1.03 × the baseline's perplexity).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, params_file, parse_training, run_stage, training_parser
from stages.common.core.params import load_params
from stages.common.core.schema import CATEGORIES
from stages.compare import Params
from stages.report import comparison

log = logging.getLogger("bench.compare")


def main() -> int:
    args = parse_training(training_parser(__doc__, steps=0, only=True))  # --steps 0: compare.steps
    with tempfile.TemporaryDirectory() as tmp:
        params = params_file(Path(tmp), compare={"steps": args.steps} if args.steps else {})
        _, p = load_params(params, ("train", "compare"), Params)
        names = [n for n in p.compare.configs if args.only is None or n == p.compare.baseline
                 or n in args.only]
        results: dict[str, dict[str, Any]] = {}
        seconds: dict[str, float] = {}
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            log.info("%s ...", name)
            started = time.perf_counter()
            results[name] = run_stage("compare", params, work, config=Path(name), tokens=args.tokens,
                                      embed=args.tokens.parent / "embed", out=work / "out")
            seconds[name] = time.perf_counter() - started
    base = results[p.compare.baseline]
    print(f"\nmachine: {machine()}; {p.compare.steps} optimizer steps of {p.train.batch_size} sequences "
          "each\n")
    print("| configuration | " + " | ".join(CATEGORIES)
          + " | tensor peak MiB | × baseline | largest estimate error | "
          "tokens/s | × baseline | val ppl | × baseline | stage wall s |")
    print("|---|" + "---|" * (len(CATEGORIES) + 8))
    worst = 0.0
    for name, m in results.items():
        errors = [abs(m[f"est_error_{c}_peak_mib"]) for c in [*CATEGORIES, "total"]
                  if f"est_error_{c}_peak_mib" in m]
        worst = max(worst, *errors)
        cells = " | ".join(f"{m[f'mem_at_peak_{c}_mib']:.1f}" for c in CATEGORIES)
        print(f"| {name} | {cells} | {m['mem_total_peak_mib']:.1f} | "
              f"{m['mem_total_peak_mib'] / base['mem_total_peak_mib']:.3f} | {max(errors):.2%} | "
              f"{m['tokens_per_sec']:.0f} | {m['tokens_per_sec'] / base['tokens_per_sec']:.3f} | "
              f"{m['val_ppl']:.1f} | "
              f"{m['val_ppl'] / base['val_ppl']:.3f} | {seconds[name]:.1f} |")
    print(f"\nlargest estimate error over every configuration and category: {worst:.2%}")
    print(f"all {len(results)} stages: {sum(seconds.values()):.0f} s wall")
    rows = [{"name": name, **m} for name, m in results.items()]  # the report's summary line, as it says it
    print(comparison.summary_line(rows, {"compare": p.compare.model_dump()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
