"""A plan from the Prefect UI: one question to the planner (`python -m stages.plan --arch ...`,
in a process of its own), its answer as the flow run's artifacts (the plan as Markdown, every
stack tried as a table). `python -m flows.serve` registers it as `lmmem-plan/plan`: its
parameters (architecture, workload, devices, shape, the stack's train keys) are editable in
the UI's Run form.

    python -m flows.plan --arch llama-3-8b --workload qlora --device-gib 24 --device-gib 80
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import ROOT, announce_server, setup_logging


def question_args(arch: str, workload: str, devices_gib: list[float], batch_size: int, micro_batch_size: int,
                  context: int, prompt: int, world_size: int, strategy: str, dtype: str,
                  train: dict[str, Any],
                  reserve_mib: float, max_seconds: float) -> list[str]:
    """The planner's command line for these parameters."""
    args = ["--arch", arch, "--workload", workload, "--batch-size", str(batch_size), "--micro-batch-size",
            str(micro_batch_size), "--context", str(context), "--prompt", str(prompt), "--world-size",
            str(world_size),
            "--strategy", strategy, "--dtype", dtype, "--reserve-mib", str(reserve_mib), "--max-seconds",
            str(max_seconds)]
    for gib in devices_gib:
        args += ["--device-gib", str(gib)]
    for key, value in train.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


@flow(name="lmmem-plan")
def plan(arch: str = "llama-3-8b", workload: str = "pretrain", devices_gib: list[float] | None = None,
         batch_size: int = 8, micro_batch_size: int = 1, context: int = 2048, prompt: int = 512,
         world_size: int = 1,
         strategy: str = "ddp", dtype: str = "bf16", train: dict[str, Any] | None = None,
         reserve_mib: float = 2048.0,
         max_seconds: float = 180.0, root: str = str(ROOT)) -> dict[str, Any]:
    """Will `arch` fit these devices for `workload`, with which stack (stages.plan)?"""
    log = get_run_logger()
    args = question_args(arch, workload, devices_gib or [24.0, 80.0], batch_size, micro_batch_size, context,
                         prompt,
                         world_size, strategy, dtype, {"precision": "bf16"} if train is None else train,
                         reserve_mib,
                         max_seconds)
    common = [sys.executable, "-m", "stages.plan", *args]
    done = subprocess.run([*common, "--json"], cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                           else "the planner failed")
    found = json.loads(done.stdout)
    from stages.plan import render

    text = render(found)
    log.info("%s", text)
    create_markdown_artifact(key="plan", markdown=f"# Plan: {arch}, {workload}\n\n```\n{text}\n```\n",
                             description="the planner's answer for each device")
    create_table_artifact(key="plan-stacks", table=[
        {"stack": r["stack"], "peak_mib": round(r["peak_mib"], 1), "cost": round(r["cost"], 3),
         "phase": r["phase"], "step": r["step"]} for r in found["tried"]],
        description="every stack tried, per rank")
    return {device: answer["stacks"][0]["stack"] if answer["stacks"] else "nothing tried fits"
            for device, answer in found["devices"].items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--workload", default="pretrain")
    parser.add_argument("--device-gib", type=float, action="append")
    parser.add_argument("--root", default=str(ROOT))
    args = parser.parse_args(argv)
    setup_logging()
    announce_server()
    try:
        answers = plan(args.arch, args.workload, args.device_gib, root=str(Path(args.root)))
    except RuntimeError as exc:
        print(f"error: {exc}")
        return 1
    print(json.dumps(answers, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
