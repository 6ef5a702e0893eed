"""Parallel tokenize: throughput with 2 worker processes against 1 on the same input.
Target: ≥ 1.7× (2.0 is the limit on 2 cores).

    python -m bench.tokenize_parallel [--times 2] [--repeats 2]

The corpus is the default one replicated `times`× (dedupe off so the replicas stay), ingested
and cleaned once; then tokenize runs alternately with workers=1 and workers=2, `repeats`
times each, and the best run of each counts (the least disturbed by other load). Reported:
the whole stage's docs/s, and the segmentation pass alone (the part that runs in parallel;
building the vocabulary, writing ids and the tokenizer files stay in one process).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from bench.common import machine, params_file, replicated_corpus, run_stage

log = logging.getLogger("bench.tokenize_parallel")
TARGET = 1.7


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--times", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = replicated_corpus(work, args.times)
        base = params_file(work, ingest={"source": str(corpus)}, clean={"dedupe": False},
                           tokenize={"gold": ""})
        run_stage("ingest", base, work, out=work / "raw")
        docs = run_stage("clean", base, work, raw=work / "raw", out=work / "clean")["docs_out"]
        best: dict[int, dict] = {}
        for rep in range(args.repeats):
            for workers in (1, 2):
                folder = work / f"w{workers}-{rep}"
                folder.mkdir()
                params = params_file(folder, ingest={"source": str(corpus)},
                                     tokenize={"gold": "", "workers": workers})
                m = run_stage("tokenize", params, folder, clean=work / "clean", out=folder / "tokens")
                log.info("workers=%d run %d: %.1f s (segmentation %.1f s)", workers, rep + 1,
                         m["seconds"], m["segment_seconds"])
                if workers not in best or m["seconds"] < best[workers]["seconds"]:
                    best[workers] = m
    print(f"\nmachine: {machine()}; {docs} documents ({args.times}× the default corpus)")
    print("| workers | stage seconds | docs/s | segmentation seconds | segmentation chars/s |")
    print("|---|---|---|---|---|")
    for workers, m in best.items():
        print(f"| {workers} | {m['seconds']:.2f} | {docs / m['seconds']:.0f} | {m['segment_seconds']:.2f} | "
              f"{m['chars_per_sec']:.0f} |")
    stage = best[1]["seconds"] / best[2]["seconds"]
    segment = best[1]["segment_seconds"] / best[2]["segment_seconds"]
    print(f"\nspeed-up with 2 workers: whole stage {stage:.2f}×, segmentation {segment:.2f}× (target ≥ "
          f"{TARGET}×)")
    ok = stage >= TARGET
    print("target met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
