"""Half-precision products through the fp32 kernel against the CPU's half kernels: the same
figures, the time they take.

    python -m bench.half_products [--variants bf16 fp16] [--batches 4] [--rounds 3]

For each committed half-precision variant (data/compressed/<name>) and the fp32 model, in one
process on the pinned threads: evaluate's quality pass (perplexity, top-1, top-5 over the
same validation windows) natively and inside `half_products_in_float()`, alternating, the
median of `rounds` each. Reported: seconds of each, native ÷ through fp32, and the figures of
both (they differ only by the order of fp32 sums).
"""

from __future__ import annotations

import argparse
import statistics
import time

import stages  # noqa: F401 - the pins before torch loads
from bench.common import ROOT, machine
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.harness.portable import pin_threads
from stages.common.modelling.halfmath import half_products_in_float
from stages.common.weights.loading import load_model_folder
from stages.evaluate.quality import quality, windows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--batches", type=int, default=4, help="validation batches of 16 windows")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pin_threads()
    tokens = ROOT / "data" / "tokens"
    if not (tokens / "meta.json").is_file():
        raise SystemExit("data/tokens holds no tokens: run `dvc repro compress` first")
    meta = read_typed(tokens / "meta.json", TokensMeta)
    print(f"machine: {machine()}\n")
    print("| model | native s | through fp32 s | native ÷ fp32 | perplexity native | through fp32 | top-1 "
          "native | through fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ["model", *args.variants]:
        folder = ROOT / "data" / "model" if name == "model" else ROOT / "data" / "compressed" / name
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder} holds no model: run `dvc repro compress` first")
        model = load_model_folder(folder)
        context = model.config.max_position_embeddings
        batches = windows(tokens, "validation", meta.dtype, context, args.batches, 16)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        figures = {}
        for round_ in range(args.rounds):
            for wide in ((False, True) if round_ % 2 == 0 else (True, False)):
                started = time.perf_counter()
                if wide:
                    with half_products_in_float():
                        figures[wide] = quality(model, batches, 256)
                else:
                    figures[wide] = quality(model, batches, 256)
                seconds[wide].append(time.perf_counter() - started)
        native, wide = statistics.median(seconds[False]), statistics.median(seconds[True])
        print(f"| {name} | {native:.2f} | {wide:.2f} | {native / wide:.2f} | {figures[False]['ppl']:.4f} | "
              f"{figures[True]['ppl']:.4f} | {figures[False]['top1']:.5f} | {figures[True]['top1']:.5f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
