"""Several processes serving one model: RSS, PSS and USS side by side, and how much of the
weights each process holds through a mapping of the file rather than a copy.

    python -m bench.shared_memory [--models data/model data/compressed/int8] [--processes 3]

For each model folder, `processes` fresh interpreters each load it with lmmem's loader
(stages.common.weights.loading: transformers' `from_pretrained` for a transformers folder, lmmem's
encoding for a compressed variant), run one forward pass of 8 × 128 tokens (every weight
touched) and wait; while all of them are alive, each one's /proc/<pid>/smaps_rollup is read
(stages/common/memory/mapped.py). RSS counts a shared page in every process that maps it, PSS
divides it among them (their sum is what the processes take together), USS is what a
process alone holds. "Mapped MiB" is the resident part of the folder's weight file mapped
into each process: weights shared through the page cache rather than copied.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, machine
from stages.common.memory.mapped import smaps

CHILD = """
import sys, json
import stages  # the pins before torch loads
import torch
from pathlib import Path
from transformers import AutoModelForCausalLM  # the libraries' own memory before the snapshot
from transformers.models.llama import modeling_llama
from stages.common.weights.loading import load_model_folder
from stages.common.memory.mapped import file_backed_mib, smaps
from stages.common.harness.portable import pin_threads
pin_threads()
folder = Path(sys.argv[1]).resolve()
before = smaps()
model = load_model_folder(folder)
loaded = smaps()
torch.manual_seed(0)
ids = torch.randint(4, model.config.vocab_size, (8, min(128, model.config.max_position_embeddings)))
with torch.no_grad():
    model(input_ids=ids)
mapped = sum(file_backed_mib(f) for f in folder.glob("*.safetensors"))
print(json.dumps({"load_rss_mib": loaded["rss_mib"] - before["rss_mib"], "mapped_mib": mapped}), flush=True)
sys.stdin.readline()
"""


def serve(folder: Path, processes: int) -> list[dict[str, float]]:
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], cwd=ROOT, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                for _ in range(processes)]
    try:
        ready = [json.loads(child.stdout.readline()) for child in children]  # type: ignore[union-attr]
        return [{**smaps(child.pid), **r} for child, r in zip(children, ready, strict=False)]
    finally:
        for child in children:
            child.communicate("\n", timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="+",
                        default=[ROOT / "data" / "model", ROOT / "data" / "compressed" / "int8"])
    parser.add_argument("--processes", type=int, default=3)
    args = parser.parse_args()
    for folder in args.models:
        if not any(folder.glob("*.safetensors")):
            raise SystemExit(f"{folder} holds no .safetensors file: run `dvc repro compress` first")
    print(f"machine: {machine()}; {args.processes} processes per model\n")
    print("| model | weight files MiB | load adds RSS MiB | mapped MiB | RSS MiB | PSS MiB | USS MiB | RSS "
          "summed | PSS summed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in args.models:
        rows = serve(folder, args.processes)
        files = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
        mean = {key: sum(r[key] for r in rows) / len(rows)
                for key in ("load_rss_mib", "mapped_mib", "rss_mib", "pss_mib", "uss_mib")}
        print(f"| {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder} | {files:.1f} | "
              f"{mean['load_rss_mib']:.1f} | {mean['mapped_mib']:.1f} | {mean['rss_mib']:.1f} | "
              f"{mean['pss_mib']:.1f} | "
              f"{mean['uss_mib']:.1f} | {sum(r['rss_mib'] for r in rows):.1f} | "
              f"{sum(r['pss_mib'] for r in rows):.1f} |",
              flush=True)
    print("\n(each process's figure: the mean of the processes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
