"""Take the documentation's screenshots with headless Chromium, from real runs on loopback:
the report (data/report/report.html of this checkout), `dvc plots show` of this checkout, and
the Prefect UI showing a flow run of the pipeline (a tiny-profile repository in a temporary
folder, a Prefect server with its UI on a free port of 127.0.0.1).

    python docs/screenshots.py [--out docs/images] [--only report plots prefect]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIDTH = 1280


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise SystemExit("screenshots: no chromium here (apt-get install chromium)")
    return found


def shoot(url: str, png: Path, height: int, wait_ms: int = 0) -> None:
    """A screenshot of `url`, `wait_ms` of the page's own time given to its scripts first."""
    budget = [f"--virtual-time-budget={wait_ms}"] if wait_ms else []
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={WIDTH},{height}", *budget, f"--screenshot={png}", url],
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0 or not png.is_file():
        raise SystemExit(f"screenshots: chromium could not take {png.name}: {done.stderr[-1000:]}")
    print(f"wrote {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")


def env_with_bin(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **(extra or {}), "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def report(out: Path) -> None:
    page = ROOT / "data" / "report" / "report.html"
    if not page.is_file():
        raise SystemExit("screenshots: no data/report/report.html: run `make repro` first")
    shoot(page.as_uri(), out / "report.png", 1400)


def plots(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dvc", "plots", "show", "-o", str(Path(tmp) / "plots")], cwd=ROOT, env=env_with_bin(),
                       check=True, capture_output=True, text=True, timeout=600)
        shoot((Path(tmp) / "plots" / "index.html").as_uri(), out / "dvc-plots.png", 1240, wait_ms=5000)


def wait_for(url: str, proc: subprocess.Popen[str], log: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"screenshots: prefect server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(1)


def latest_flow_run(api: str) -> str:
    request = urllib.request.Request(f"{api}/flow_runs/filter", method="POST",
                                     data=json.dumps({"sort": "START_TIME_DESC", "limit": 1}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())[0]["id"]


def artifact_of(api: str, run: str, key: str) -> str:
    """The id of the run's artifact `key`."""
    body = {"artifacts": {"key": {"any_": [key]}}, "flow_runs": {"id": {"any_": [run]}}}
    request = urllib.request.Request(f"{api}/artifacts/filter", method="POST", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())[0]["id"]


def prefect(out: Path) -> None:
    """A real flow run of the pipeline (ingest, clean, tokenize of the tiny profile) seen in the UI."""
    from flows.serve import free_port, stop_process_group
    from tests.conftest import tiny_repo

    with tempfile.TemporaryDirectory() as tmp:
        repo = tiny_repo(Path(tmp) / "repo")
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = env_with_bin({"PREFECT_HOME": str(Path(tmp) / "prefect"), "PREFECT_API_URL": api,
                            "PREFECT_SERVER_API_PORT": str(port), "PREFECT_UI_API_URL": api,
                            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        log = Path(tmp) / "server.log"
        with log.open("w") as sink:
            server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                                       "127.0.0.1",
                                       "--port", str(port)], env=env, stdout=sink, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True)
            try:
                wait_for(f"{api}/health", server, log)
                subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(repo), "--stages",
                                "tokenize"],
                               cwd=repo, env=env, check=True, capture_output=True, text=True, timeout=900)
                run = latest_flow_run(api)
                shoot(f"http://127.0.0.1:{port}/runs/flow-run/{run}", out / "prefect-flow-run.png", 1000,
                      wait_ms=20000)
                artifact = artifact_of(api, run, "tokenize-metrics")
                shoot(f"http://127.0.0.1:{port}/artifacts/artifact/{artifact}", out / "prefect-artifact.png",
                      900, wait_ms=20000)
            finally:
                stop_process_group(server)


SHOTS = {"report": report, "plots": plots, "prefect": prefect}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--only", nargs="*", choices=list(SHOTS), default=list(SHOTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        SHOTS[name](args.out.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
