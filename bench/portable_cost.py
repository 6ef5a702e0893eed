"""What base.portable costs in speed: training steps and the embed stage (gensim over
OpenBLAS), with the setting on and off, alternating in fresh processes so that drift of a
shared machine hits both alike.

    python -m bench.portable_cost [--rounds 3] [--steps 10] [--tokens data/tokens]

Per round and setting: a fresh interpreter that imports the stages package first (as a stage
does: the pins, or none, are set before torch and numpy load), trains the default model
(params.yaml's train section, AdamW, full logits) for `steps` steps and reports its median
step time after the first two; then `python -m stages.embed` over data/tokens with its own
seconds from its metrics file. Reported: each setting's median over the rounds and on ÷ off.
On a CPU whose own choice is AVX2 with 2 cores (this project's machine) the pins select what
the libraries chose anyway, and the ratio measures only that; on an AVX-512 CPU or one with
more cores, it is the price of the same bytes everywhere.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, machine, params_file, run_stage

TRAIN = """
import sys
sys.argv = ['-m', '--params', {params!r}]
import stages  # the pins (or none) before torch loads
import statistics, time, numpy as np, torch, torch.nn.functional as F
from pathlib import Path
from stages.common.modelling.models import build_model, logits_of
from stages.common.core.params import load_params
from stages.common.harness.portable import pin_threads, provenance
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.modelling.windows import Windows
from stages.train.params import Params
pin_threads()
_, p = load_params(Path({params!r}), 'train', Params)
meta = read_typed(Path({tokens!r}) / 'meta.json', TokensMeta)
windows = Windows(Path({tokens!r}) / 'train.bin', meta.dtype, p.model.context)
torch.manual_seed(0)
model = build_model(p.model, meta.vocab_size, meta.special_ids.model_dump())
optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr)
rng, seconds = np.random.default_rng(0), []
for _ in range({steps}):
    started = time.perf_counter()
    rows = windows.batch(windows.random_starts(rng, p.batch_size))
    logits = logits_of(model, rows[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds.append(time.perf_counter() - started)
print(statistics.median(seconds[2:]), provenance()['machine_capability'], torch.get_num_threads())
"""


def train_step(params: Path, tokens: Path, steps: int) -> tuple[float, str]:
    code = TRAIN.format(params=str(params), tokens=str(tokens), steps=steps)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    median, capability, threads = out.stdout.split()
    return float(median), f"{capability}, {threads} threads"


def embed_seconds(params: Path, tokens: Path, work: Path) -> float:
    return float(run_stage("embed", params, work, tokens=tokens, out=work / "embed")["seconds"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokens", type=Path, default=ROOT / "data" / "tokens")
    args = parser.parse_args()
    if not (args.tokens / "meta.json").is_file():
        raise SystemExit(f"{args.tokens} holds no tokens: run `dvc repro tokenize` first")
    step: dict[bool, list[float]] = {True: [], False: []}
    embed: dict[bool, list[float]] = {True: [], False: []}
    kernels: dict[bool, str] = {}
    with tempfile.TemporaryDirectory(prefix="lmmem-portable-cost-") as tmp:
        for on in (True, False):
            (Path(tmp) / str(on)).mkdir()
        files = {on: params_file(Path(tmp) / str(on), base={"portable": on}) for on in (True, False)}
        for round_ in range(args.rounds):
            for on in ((True, False) if round_ % 2 == 0 else (False, True)):
                seconds, kernels[on] = train_step(files[on], args.tokens, args.steps)
                step[on].append(seconds)
                embed[on].append(embed_seconds(files[on], args.tokens, Path(tmp) / str(on)))
                print(f"round {round_ + 1}, portable {on}: step {seconds * 1000:.0f} ms, embed "
                      f"{embed[on][-1]:.1f} s",
                      flush=True)
    print(f"\nmachine: {machine()}\n")
    print("| portable | kernels | train step ms (median) | embed stage s (median) |")
    print("|---|---|---|---|")
    for on in (False, True):
        print(f"| {str(on).lower()} | {kernels[on]} | {statistics.median(step[on]) * 1000:.0f} | "
              f"{statistics.median(embed[on]):.1f} |")
    print(f"| on ÷ off | | {statistics.median(step[True]) / statistics.median(step[False]):.3f} | "
          f"{statistics.median(embed[True]) / statistics.median(embed[False]):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
