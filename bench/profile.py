"""The default profile: candidate training setups for the default corpus, each trained for the
same wall time on this machine, compared by validation perplexity on the same vocabulary.

    python -m bench.profile [--seconds 120] [--only NAME ...] [--tokens data/tokens]

Why it is built this way: docs/design-notes.md, `bench.profile`.
"""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from bench.common import machine, params_file, parse_training, run_training, training_parser
from stages.common.core.params import merged

log = logging.getLogger("bench.profile")

# The candidates as they were measured (docs/BENCHMARKS.md, "The default profile"): each is
# keys laid over the profile the default was before (OLD) and 8 validation batches, so that
# they mean the same whatever params.yaml's train section says now.
CURRENT = "old default (4 x 256, batch 16)"
OLD: dict[str, Any] = {"model": {"layers": 4, "width": 256, "heads": 4, "context": 128}, "batch_size": 16,
                       "micro_batch_size": 16, "lr": 0.003, "precision": "fp32", "loss_chunk_tokens": 0,
                       "init_from_word2vec": False, "eval_batches": 8}
CHUNKED = {"loss_chunk_tokens": 256}
FAST = {**CHUNKED, "precision": "bf16"}
SMALL_BATCH = {**FAST, "batch_size": 8, "micro_batch_size": 8}
W2V_B8 = {"init_from_word2vec": True, "batch_size": 8, "micro_batch_size": 8}
CHANGES: dict[str, dict[str, Any]] = {
    CURRENT: {},
    "chunked loss": CHUNKED,
    "chunked loss + bf16": FAST,
    "chunked + bf16, lr 6e-3": {**FAST, "lr": 0.006},
    "chunked + bf16, batch 8": SMALL_BATCH,
    "chunked + bf16, batch 8, lr 6e-3": {**SMALL_BATCH, "lr": 0.006},
    "chunked + bf16, batch 8, word2vec start": {**SMALL_BATCH, "init_from_word2vec": True},
    "chunked + bf16, batch 8, 2 layers": {**SMALL_BATCH, "model": {"layers": 2}},
    "chunked + bf16, batch 8, width 128": {**SMALL_BATCH, "model": {"width": 128, "heads": 2}},
    "chunked + bf16, batch 8, width 384": {**SMALL_BATCH, "model": {"width": 384, "heads": 6}},
    "chunked + bf16, batch 16, context 64": {**FAST, "model": {"context": 64}},
    "word2vec start": {"init_from_word2vec": True},
    "word2vec start, batch 8": W2V_B8,
    "word2vec start, batch 8, chunked": {**W2V_B8, **CHUNKED},
    "word2vec start, batch 8, width 128 (the default since)": {**W2V_B8, "model": {"width": 128, "heads": 2}},
    "chunked + bf16, batch 8, word2vec start, width 128": {**SMALL_BATCH, "init_from_word2vec": True,
                                                           "model": {"width": 128, "heads": 2}},
}
CANDIDATES: dict[str, dict[str, Any]] = {name: merged(OLD, changes) for name, changes in CHANGES.items()}
CALIBRATION_STEPS = 6


def curve(plots: Path) -> list[tuple[float, float]]:
    """(training seconds so far, validation perplexity) at each validation step."""
    points, elapsed = [], 0.0
    with (plots / "steps.csv").open() as f:
        for r in csv.DictReader(f):
            elapsed += float(r["step_ms"] or 0) / 1000
            if r["val_loss"]:
                points.append((elapsed, math.exp(float(r["val_loss"]))))
    return points


def train(name: str, overrides: dict[str, Any], steps: int, work: Path, tokens: Path) -> dict[str, Any]:
    warmup = max(1, steps // 10)
    keys: dict[str, Any] = {"steps": steps, "warmup_steps": warmup, "meter_steps": 2, "checkpoint_every": 0,
                            "eval_every": max(1, steps // 8), **overrides}
    work.mkdir(parents=True)
    log.info("%s: %d steps ...", name, steps)
    metrics = run_training(params_file(work, train=keys), work, tokens)
    return {"metrics": metrics, "plots": work / "plots"}


def main() -> int:
    parser = training_parser(__doc__, steps=0, only=True)
    parser.add_argument("--seconds", type=float, default=120.0, help="training-loop seconds per candidate")
    args = parse_training(parser)
    chosen = {n: o for n, o in CANDIDATES.items() if args.only is None or n == CURRENT or n in args.only}
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(chosen.items()):
            try:
                probe = train(name, {**overrides, "eval_batches": 1}, CALIBRATION_STEPS, Path(tmp) / f"p{i}",
                              args.tokens)
                ms = probe["metrics"]["step_ms_median"]
                steps = max(CALIBRATION_STEPS, int(args.seconds * 1000 / ms))
                run = train(name, overrides, steps, Path(tmp) / f"c{i}", args.tokens)
            except SystemExit as exc:  # one candidate that cannot run is a line, not the end of the others
                log.warning("%s failed: %s", name, str(exc).strip().splitlines()[-1])
                continue
            m = run["metrics"]
            points = curve(run["plots"])
            rows[name] = {"step_ms": ms, "steps": steps, "tokens": m["tokens_seen"],
                          "loop_s": points[-1][0] if points else math.nan, "val_ppl": m["val_ppl"],
                          "tokens_per_sec": m.get("tokens_per_sec", math.nan), "curve": points}
            log.info("%s: %d steps, val ppl %.1f", name, steps, m["val_ppl"])
    base = rows[CURRENT]["val_ppl"]
    print(f"\nmachine: {machine()}; {args.seconds:.0f} s of training steps per candidate; tokens "
          f"{args.tokens}\n")
    print("| candidate | step ms | steps | tokens seen | tokens/s | loop s | val ppl | × old default |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step_ms']:.0f} | {r['steps']} | {r['tokens']:,} | {r['tokens_per_sec']:.0f} "
              f"| {r['loop_s']:.0f} | "
              f"{r['val_ppl']:.1f} | {r['val_ppl'] / base:.3f} |")
    print("\nCurves: validation perplexity at (training seconds so far):\n")
    for name, r in rows.items():
        print(f"- {name}: " + ", ".join(f"{ppl:.0f} ({s:.0f} s)" for s, ppl in r["curve"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
