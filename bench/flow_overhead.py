"""The cost of running the pipeline as a Prefect flow instead of a bare `dvc repro`, on the
tiny profile, side by side in one run.

    python -m bench.flow_overhead [--repeats 3]

Two identical temporary git repos with the tiny profile; a real Prefect server on loopback.
Measured (wall clock, each command in a fresh process as a user runs it): the whole pipeline
from nothing by `dvc repro` in one repo and by `python -m flows.pipeline` in the other, then
`repeats` alternating no-op runs of each (every stage up to date: the flow's own cost shows
most there), and as many no-op flow runs inside this process, as `python -m flows.serve`
runs what the server schedules (Python and Prefect already started: the flow run alone).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, machine
from flows.common import dvc_env
from tests.conftest import GIT_IDENTITY, tiny_repo

log = logging.getLogger("bench.flow_overhead")


def env(api_url: str) -> dict[str, str]:
    return {**dvc_env(), **GIT_IDENTITY, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def timed(command: list[str], cwd: Path, api_url: str) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env(api_url), capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds


def served_runs(repo: Path, api_url: str, repeats: int) -> list[float]:
    """No-op pipeline flow runs in this process, against the server: what a served deployment
    spends per run (one run first, untimed, so that the imports are not counted)."""
    import os

    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = api_url
    with temporary_settings({PREFECT_API_URL: api_url}):
        from flows.pipeline import pipeline

        pipeline(root=str(repo))
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            answers = pipeline(root=str(repo))
            seconds.append(time.perf_counter() - started)
            assert set(answers.values()) == {"skipped"}, answers
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from flows.serve import local_server

    with tempfile.TemporaryDirectory() as tmp, local_server(Path(tmp) / "prefect") as url:
        bare, flow = tiny_repo(Path(tmp) / "bare", env(url)), tiny_repo(Path(tmp) / "flow", env(url))
        dvc = [sys.executable, "-m", "dvc", "repro"]
        pipeline = [sys.executable, "-m", "flows.pipeline", "--root", str(flow)]
        log.info("whole pipeline, dvc repro ...")
        full_bare = timed(dvc, bare, url)
        log.info("whole pipeline, flow ...")
        full_flow = timed(pipeline, ROOT, url)
        noop_bare, noop_flow, noop_served = [], [], []
        for i in range(args.repeats):
            log.info("no-op repeat %d ...", i + 1)
            noop_bare.append(timed(dvc, bare, url))
            noop_flow.append(timed(pipeline, ROOT, url))
        noop_served = served_runs(flow, url, args.repeats)
    nb, nf, ns = statistics.median(noop_bare), statistics.median(noop_flow), statistics.median(noop_served)
    print(f"\nmachine: {machine()}; tiny profile, 9 stages; Prefect server on loopback")
    print("\n| run | dvc repro s | flow s | flow − dvc s | flow / dvc |")
    print("|---|---|---|---|---|")
    print(f"| whole pipeline from nothing | {full_bare:.1f} | {full_flow:.1f} | "
          f"{full_flow - full_bare:+.1f} | "
          f"{full_flow / full_bare:.2f} |")
    print(f"| no-op (all up to date), median of {args.repeats} | {nb:.1f} | {nf:.1f} | {nf - nb:+.1f} | "
          f"{nf / nb:.2f} |")
    print(f"| no-op flow run in a served process (no start-up), median of {args.repeats} | {nb:.1f} | "
          f"{ns:.1f} | "
          f"{ns - nb:+.1f} | {ns / nb:.2f} |")
    print(f"\nno-op runs: dvc {', '.join(f'{t:.1f}' for t in noop_bare)}; "
          f"flow {', '.join(f'{t:.1f}' for t in noop_flow)}; served "
          f"{', '.join(f'{t:.1f}' for t in noop_served)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
