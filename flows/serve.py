"""Serve the flows as deployments of a running Prefect server, to schedule and watch them in
the Prefect UI.

    prefect config set PREFECT_SERVER_API_PORT=4200 PREFECT_API_URL=http://127.0.0.1:4200/api  # any port
    prefect server start --host 127.0.0.1          # in another terminal; UI on http://127.0.0.1:4200
    python -m flows.serve [--cron "0 3 * * *"]     # until Ctrl-C

Registers `lmmem-pipeline/pipeline` (on `--cron`, else on `flows.schedule` from params.yaml;
none when both are empty), `lmmem-sweep/sweep` (on demand: its points, grid and sweep file
are editable in the UI's Run form) and `lmmem-plan/plan` (on demand: one question to the
planner, stages.plan), then runs what the server schedules. Trigger one with
`prefect deployment run lmmem-pipeline/pipeline` or from the UI.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import serve

from flows.common import ROOT, flow_params, server_url, setup_logging
from flows.pipeline import pipeline
from flows.plan import plan
from flows.sweep import sweep

log = logging.getLogger("lmmem.flows")


def stop_process_group(proc: subprocess.Popen[Any], first: signal.Signals = signal.SIGTERM) -> None:
    """Stop a process started with start_new_session=True and everything it started: `first`,
    then SIGKILL after 30 s."""
    os.killpg(proc.pid, first)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a local server or a rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(home: Path, startup_timeout: float = 300.0, ui: bool = False) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 and a free port, with its SQLite database in
    `home`; yields the API URL once /health answers, stops the server afterwards. With `ui`,
    its UI is served too, calling the API on that port. (Tests, benchmarks and the docs'
    screenshots use it; users run `prefect server start` themselves.)"""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": str(ui).lower()}
    if ui:
        env.update(PREFECT_SERVER_API_PORT=str(port), PREFECT_UI_API_URL=url)
    env.pop("PREFECT_API_URL", None)
    home.mkdir(parents=True, exist_ok=True)
    with (home / "server.log").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + startup_timeout  # slow start-up on a busy machine is known
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("prefect server did not start: " +
                                       (home / "server.log").read_text()[-2000:])
                time.sleep(1)
            yield url
        finally:
            stop_process_group(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default=None, help="the pipeline's schedule (default: flows.schedule)")
    parser.add_argument("--root", default=str(ROOT), help="the DVC repository the flows run in")
    args = parser.parse_args(argv)
    setup_logging()
    if server_url() is None:
        print("error: serving needs a running Prefect server: `prefect config set "
              "PREFECT_SERVER_API_PORT=4200 PREFECT_API_URL=http://127.0.0.1:4200/api`, then `prefect "
              "server start --host 127.0.0.1`")
        return 1
    cron = args.cron if args.cron is not None else flow_params(Path(args.root)).schedule
    deployments = [
        pipeline.to_deployment(name="pipeline", cron=cron or None, parameters={"root": args.root},
                               description="dvc.yaml's stages through DVC, every stage a task"),
        sweep.to_deployment(name="sweep", parameters={"root": args.root},
                            description="a memory sweep: one DVC experiment per point, compared"),
        plan.to_deployment(name="plan", parameters={"root": args.root},
                           description="will a model fit these devices, with which stack (stages.plan)"),
    ]
    log.info("serving lmmem-pipeline/pipeline (%s), lmmem-sweep/sweep and lmmem-plan/plan (on demand)",
             f"cron {cron!r}" if cron else "no schedule")
    serve(*deployments)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
