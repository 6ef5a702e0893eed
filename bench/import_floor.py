"""What a pipeline run costs before any stage does any work: each stage's imports, timed in
a fresh process (the stage module and the libraries it imports later, inside its run),
and DVC's own cost for a pipeline of nine stages that do nothing.

    python -m bench.import_floor [--repeats 2]

The sum is the floor of `dvc repro` with one process per stage: the tiny profile cannot
run faster than it, whatever its stages' work costs. Each figure is the fastest of
`--repeats` runs; run it alone (it measures CPU time spent importing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import ROOT, machine

# stage -> what its process imports: the module itself, then what its run imports lazily
IMPORTS: dict[str, list[str]] = {
    "ingest": ["stages.ingest"],
    "clean": ["stages.clean"],
    "tokenize": ["stages.tokenize", "jieba", "nltk.tokenize", "tokenizers"],
    "embed": ["stages.embed", "gensim.models"],
    "warmstart": ["stages.warmstart"],
    "train": ["stages.train", "transformers.models.llama.modeling_llama", "torch._subclasses.fake_tensor"],
    "compress": ["stages.compress", "transformers.models.llama.modeling_llama"],
    "evaluate": ["stages.evaluate"],
    "evaluate's fork server": ["stages.common.harness.workers", "transformers.models.llama.modeling_llama",
                               "transformers.models.gpt2.modeling_gpt2", "stages.common.weights.loading"],
    # the report reads every stage's Params for their defaults: it imports each stage module
    "report": ["stages.report", "stages.ingest", "stages.clean", "stages.tokenize", "stages.embed",
               "stages.train",
               "stages.compress", "stages.evaluate"],
}
DVC_STAGES = ["ingest", "clean", "tokenize", "embed", "warmstart", "train", "compress", "evaluate", "report"]


def seconds(command: list[str], cwd: Path, repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"}
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
        best = min(best, time.perf_counter() - started)
    return best


def bare_dvc_repro(work: Path, repeats: int) -> float:
    """`dvc repro` of nine chained stages whose commands copy one small file."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    best = float("inf")
    for attempt in range(repeats):
        repo = work / f"bare-{attempt}"
        repo.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        subprocess.run([dvc, "init", "-q"], cwd=repo, check=True)
        (repo / "seed.txt").write_text("seed\n")
        stages, previous = {}, "seed.txt"
        for name in DVC_STAGES:
            stages[name] = {"cmd": f"mkdir -p out_{name} && cp -r {previous} out_{name}/",
                            "deps": [previous], "outs": [f"out_{name}"]}
            previous = f"out_{name}"
        (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
        best = min(best, seconds([dvc, "repro", "-q"], repo, 1))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {machine()}; fastest of {args.repeats}\n")
    print("| process | imports | seconds |\n|---|---|---|")
    python = seconds([sys.executable, "-c", "pass"], ROOT, args.repeats)
    print(f"| (bare interpreter) | - | {python:.1f} |")
    total = 0.0
    for process, modules in IMPORTS.items():
        took = seconds([sys.executable, "-c", "import " + ", ".join(modules)], ROOT, args.repeats)
        total += took
        print(f"| {process} | {', '.join(modules)} | {took:.1f} |")
    with tempfile.TemporaryDirectory(prefix="lmmem-floor-") as work:
        dvc = bare_dvc_repro(Path(work), args.repeats)
    print(f"| dvc repro, 9 stages that copy a file | - | {dvc:.1f} |")
    print(f"| **floor: imports + DVC** | | **{total + dvc:.1f}** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
