"""Step time of memory techniques against the baseline, alternating in one process: the
slowdown behind each auto-fit move's cost.

    python -m bench.step_speed [--steps 6] [--repeats 3] [--only NAME ...] [--tokens data/tokens]

A configuration is one of bench.train_grid's (the baseline, each technique's, the stacks).
Each is built once from params.yaml's train section with its keys changed; then every round
runs `steps` optimizer steps of each in turn on the same seeded batches, `repeats` rounds,
so that drift of a shared machine hits all alike (separate processes minutes apart, as the
grid runs them, differ by more than most techniques cost). Reported: each configuration's
median step time and tokens/s, and the baseline's step time over its own (the throughput
ratio; a move's cost is its slowdown times its perplexity ratio at equal steps, from the grid).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import numpy as np
import torch

from bench.common import ROOT, machine, parse_training, training_parser
from bench.train_grid import BASELINE, GRID
from stages import train as stage
from stages.common.core.params import load_params
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.modelling.windows import Windows
from stages.train.build import build
from stages.train.params import with_changes
from stages.train.step import train_step

CPU = torch.device("cpu")


def alternate(configs: dict[Any, Any], meta: TokensMeta, windows: Windows, seed: int, steps: int,
              repeats: int) -> tuple[dict[Any, list[float]], dict[Any, list[float]]]:
    """`steps` optimizer steps of each configuration in turn, `repeats` rounds, each from the
    same initialisation on the same seeded batches: (step seconds, step losses) per name."""
    parts = {name: build(p, meta, CPU, seed) for name, p in configs.items()}
    rngs = {name: np.random.default_rng(seed) for name in configs}
    seconds: dict[Any, list[float]] = {name: [] for name in configs}
    losses: dict[Any, list[float]] = {name: [] for name in configs}
    for repeat in range(repeats):
        for name, p in configs.items():
            for i in range(steps):
                rows = windows.batch(windows.random_starts(rngs[name], p.batch_size))
                started = time.perf_counter()
                out = train_step(parts[name], rows, p, CPU, repeat * steps + i, None)
                seconds[name].append(time.perf_counter() - started)
                losses[name].append(sum(x.item() for x in out))
            logging.warning("round %d: %s %.0f ms/step", repeat, name,
                            statistics.median(seconds[name]) * 1000)
    return seconds, losses


def main() -> int:
    parser = training_parser(__doc__, steps=6, only=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_training(parser, logging.WARNING)
    tokens = args.tokens
    unknown = set(args.only or []) - set(GRID)
    if unknown:
        raise SystemExit(f"unknown configurations: {', '.join(sorted(unknown))}; known: {', '.join(GRID)}")
    base, params = load_params(ROOT / "params.yaml", "train", stage.Params)
    meta = read_typed(tokens / "meta.json", TokensMeta)
    windows = Windows(tokens / "train.bin", meta.dtype, params.model.context)
    chosen = {name: with_changes(params, overrides) for name, overrides in GRID.items()
              if args.only is None or name == BASELINE or name in args.only}
    seconds, _ = alternate(chosen, meta, windows, base.seed, args.steps, args.repeats)
    positions = params.batch_size * params.model.context
    ref = statistics.median(seconds[BASELINE])
    print(f"\nmachine: {machine()}; torch threads {torch.get_num_threads()}; {args.repeats} rounds x "
          f"{args.steps} steps of {positions:,} positions per configuration\n")
    print("| configuration | median ms/step | tokens/s | throughput x baseline | slowdown |")
    print("|---|---|---|---|---|")
    for name, times in seconds.items():
        ms = statistics.median(times) * 1000
        print(f"| {name} | {ms:,.0f} | {positions / ms * 1000:,.0f} | {ref * 1000 / ms:.3f} | "
              f"{ms / (ref * 1000):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
