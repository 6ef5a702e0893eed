"""Streaming: peak RSS and throughput of ingest, clean and tokenize on the default corpus
replicated 1×, 4× and 16×. Target: peak RSS at 16× ≤ 1.3 × peak RSS at 1×, per stage.

    python -m bench.streaming [--times 1 4 16] [--workdir DIR]

clean runs with dedupe off, so that every replica flows through clean and tokenize (with
dedupe on, the replicas would be dropped as duplicates and tokenize would see 1× each time);
one extra clean run at the largest size with dedupe on shows the duplicate filter's cost.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from bench.common import machine, params_file, replicated_corpus, run_stage

log = logging.getLogger("bench.streaming")
TARGET = 1.3


def measure(times: int, work: Path) -> dict[str, dict]:
    corpus = replicated_corpus(work, times)
    params = params_file(work, ingest={"source": str(corpus)}, clean={"dedupe": False},
                         tokenize={"gold": "", "workers": 2})
    data = work / "data"
    out = {
        "ingest": run_stage("ingest", params, work, out=data / "raw"),
        "clean": run_stage("clean", params, work, raw=data / "raw", out=data / "clean"),
        "tokenize": run_stage("tokenize", params, work, clean=data / "clean", out=data / "tokens"),
    }
    out["corpus_mib"] = {"value": corpus.stat().st_size / 2**20}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--times", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for times in args.times:
            log.info("measuring %d× ...", times)
            results[times] = measure(times, Path(tmp) / f"x{times}")
        big = max(args.times)
        dedupe_params = params_file(Path(tmp) / f"x{big}", clean={"dedupe": True})
        data = Path(tmp) / f"x{big}" / "data"
        dedupe = run_stage("clean", dedupe_params, Path(tmp) / "dedupe", raw=data / "raw",
                           out=Path(tmp) / "dd")

    lo, hi = min(args.times), max(args.times)
    print(f"\nmachine: {machine()}")
    print("| stage | replicas | corpus MiB | documents | seconds | docs/s | peak RSS MiB | worker peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for times, r in results.items():
        for stage in ("ingest", "clean", "tokenize"):
            m = r[stage]
            n = m.get("docs") or m.get("docs_out") or sum(m[f"docs_{s}"]
                                                          for s in ("train", "validation", "test"))
            workers = f"{m['peak_rss_workers_mib']:.1f}" if "peak_rss_workers_mib" in m else "-"
            print(f"| {stage} | {times}× | {r['corpus_mib']['value']:.1f} | {n} | {m['seconds']:.1f} | "
                  f"{n / m['seconds']:.0f} | {m['peak_rss_mib']:.1f} | {workers} |")
    print(f"\nclean with dedupe on at {hi}×: {dedupe['docs_out']} of {dedupe['docs_in']} kept, "
          f"{dedupe['seconds']:.1f} s, peak RSS {dedupe['peak_rss_mib']:.1f} MiB")
    ok = True
    print(f"\npeak RSS ratio {hi}× / {lo}× (target ≤ {TARGET}):")
    for stage in ("ingest", "clean", "tokenize"):
        ratio = results[hi][stage]["peak_rss_mib"] / results[lo][stage]["peak_rss_mib"]
        ok &= ratio <= TARGET
        line = f"  {stage}: {ratio:.3f}"
        if stage == "tokenize":
            wr = results[hi][stage]["peak_rss_workers_mib"] / results[lo][stage]["peak_rss_workers_mib"]
            ok &= wr <= TARGET
            line += f" (workers {wr:.3f})"
        print(line)
    print("target met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
