"""The planner's dry run beside what people use today, on the same configurations: accelerate's
`estimate-memory` (its formula on the same model, built on the meta device: the hub is not
reached), DeepSpeed's `estimate_zero2/zero3_model_states_mem_needs` where it installs on this
CPU, and the activation formula of Korthikanti et al. (2022), per training configuration;
and each catalog plan's wall time (the target: under 5 minutes an architecture).

    python -m bench.plan_compare [--archs gpt2 llama-2-7b ...] [--context 1024] [--deepspeed PATH]
    python -m bench.plan_compare --times [--archs ...]

Why it is built this way: docs/design-notes.md, `bench.plan_compare`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

GIB = 2**30
DEFAULT_ARCHS = ["gpt2", "qwen2.5-0.5b", "llama-2-7b", "llama-3-8b"]


def korthikanti_gib(config: Any, seq: int, batch: int, checkpointed: bool) -> float:
    from stages.plan.others import korthikanti_mib

    return korthikanti_mib(config, seq, batch, checkpointed) / 1024


def accelerate_gib(model: Any) -> dict[str, float]:
    """accelerate's estimate-memory on this model (stages.plan.others): fp32 and bf16 training."""
    from stages.plan.others import accelerate_mib

    return {p: accelerate_mib(model, p)["training"] / 1024 for p in ("fp32", "bf16")}


def deepspeed_gib(model: Any, path: str | None) -> dict[str, float] | None:
    """DeepSpeed's ZeRO-2 and ZeRO-3 model-state estimates for 1 GPU on 1 node (no offload), in a
    process of its own (importing DeepSpeed patches torch in this one), or None where it does not
    import here."""
    import json
    import os
    import subprocess

    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    largest = max(p.numel() for p in model.parameters())
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]) if sys.argv[1] else None\n"
            "from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as z3\n"
            "from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as z2\n"
            "p, big = int(sys.argv[2]), int(sys.argv[3])\n"
            "print(json.dumps({'zero2': z2(p, num_gpus_per_node=1, num_nodes=1, cpu_offload=False)[1], "
            "'zero3': z3(p, big, num_gpus_per_node=1, num_nodes=1, cpu_offload=False, "
            "cpu_offload_params=False)[1]}))")
    done = subprocess.run([sys.executable, "-c", code, path or "", str(params), str(largest)],
                          capture_output=True,
                          text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300, check=False)
    if done.returncode != 0:  # not installable or importable on this CPU: said in the table
        print(f"deepspeed: not importable here ({done.stderr.strip().splitlines()[-1][:160]})",
              file=sys.stderr)
        return None
    return {k: v / GIB for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def compare(archs: list[str], context: int, deepspeed: str | None) -> None:
    from stages.plan.catalog import CATALOG, hf_config, meta_model
    from stages.plan.dryrun import Question, estimate

    print("| architecture | precision | checkpointing | lmmem total | lmmem weights+grads+state at the peak "
          "| lmmem activations (their own peak) | accelerate 'Training using Adam' | DeepSpeed ZeRO-2 / "
          "ZeRO-3 states (1 GPU) | Korthikanti activations |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in archs:
        arch = CATALOG[name]
        config, model = hf_config(arch), meta_model(arch)
        acc = accelerate_gib(model)
        ds = deepspeed_gib(model, deepspeed)
        for precision in ("fp32", "bf16"):
            for checkpointed in (False, True):
                q = Question(arch, "pretrain", batch_size=1, micro_batch_size=1, context=context,
                             train={"precision": precision, "activation_checkpointing": checkpointed,
                                    "grad_clip": 0.0})
                found = estimate(q)
                cats = {k: v / 1024 for k, v in found["by_category"].items()}
                states = cats["parameters"] + cats["gradients"] + cats["optimizer"]
                ds_text = f"{ds['zero2']:,.2f} / {ds['zero3']:,.2f}" if ds else "not importable here"
                print(f"| {name} | {precision} | {'full' if checkpointed else 'off'} | "
                      f"{found['peak_mib'] / 1024:,.2f} "
                      f"({found['phase']}) | {states:,.2f} | "
                      f"{found['category_peaks']['activations'] / 1024:,.2f} | {acc[precision]:,.2f} | "
                      f"{ds_text} | {korthikanti_gib(config, context, 1, checkpointed):,.2f} |", flush=True)


def times(archs: list[str]) -> None:
    """Each catalog architecture's plan (pretrain, bf16, batch 8 of 2048 tokens in micro-batches
    of 1, or as many tokens as its positions allow, one 80 GiB device), timed whole in a fresh
    process."""
    import subprocess

    from stages.plan.catalog import architecture
    from stages.plan.dryrun import max_positions

    root = Path(__file__).resolve().parent.parent
    print("| architecture | context | plan's wall time (s) | stacks tried | fits 80 GiB with | out of time |")
    print("|---|---|---|---|---|---|")
    for name in archs:
        context = min(2048, max_positions(architecture(name)))
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "stages.plan", "--arch", name, "--workload", "pretrain",
                               "--device-gib", "80", "--batch-size", "8", "--micro-batch-size", "1",
                               "--context",
                               str(context), "--set", "precision=bf16", "--max-seconds", "280", "--json"],
                              cwd=root,
                              capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            print(f"| {name} | {context} | {seconds:,.1f} | failed: "
                  f"{done.stderr.strip().splitlines()[-1][:80]} | | |",
                  flush=True)
            continue
        import json

        plan = json.loads(done.stdout)
        answer = next(iter(plan["devices"].values()))
        best = answer["stacks"][0]["stack"] if answer["stacks"] else "nothing tried fits"
        print(f"| {name} | {context} | {seconds:,.1f} | {len(plan['tried'])} | {best} | "
              f"{plan['out_of_time']} |",
              flush=True)


def main() -> int:
    from stages.plan.catalog import CATALOG

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=None)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--deepspeed", help="a folder DeepSpeed was installed into (pip install --target)")
    parser.add_argument("--times", action="store_true", help="time each architecture's plan instead")
    args = parser.parse_args()
    if args.times:
        times(args.archs or list(CATALOG))
    else:
        compare(args.archs or DEFAULT_ARCHS, args.context, args.deepspeed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
