"""Take the documentation's screenshots with headless Chromium, from real runs on loopback:
the report (data/report/report.html of this checkout), `dvc plots show` of this checkout, and
the Prefect UI showing a flow run of the pipeline (a tiny-profile repository in a temporary
folder, a Prefect server with its UI on a free port of 127.0.0.1).

    python docs/screenshots.py [--out docs/images] [--only report plots prefect]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
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


def report(out: Path) -> None:
    page = ROOT / "data" / "report" / "report.html"
    if not page.is_file():
        raise SystemExit("screenshots: no data/report/report.html: run `make repro` first")
    shoot(page.as_uri(), out / "report.png", 1400)


def plots(out: Path) -> None:
    from tests.conftest import sh

    with tempfile.TemporaryDirectory() as tmp:
        sh("dvc", "plots", "show", "-o", str(Path(tmp) / "plots"), cwd=ROOT)
        shoot((Path(tmp) / "plots" / "index.html").as_uri(), out / "dvc-plots.png", 1240, wait_ms=5000)


def first_id(api: str, what: str, query: dict) -> str:
    """The id of the first of `what` (flow_runs, artifacts) the Prefect API's filter returns."""
    request = urllib.request.Request(f"{api}/{what}/filter", method="POST", data=json.dumps(query).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())[0]["id"]


def prefect(out: Path) -> None:
    """A real flow run of the pipeline (ingest, clean, tokenize of the tiny profile) seen in the UI."""
    from flows.serve import local_server
    from tests.conftest import sh, tiny_repo

    with tempfile.TemporaryDirectory() as tmp, local_server(Path(tmp) / "prefect", ui=True) as api:
        repo = tiny_repo(Path(tmp) / "repo")
        sh(sys.executable, "-m", "flows.pipeline", "--root", str(repo), "--stages", "tokenize", cwd=repo,
           env={"PREFECT_API_URL": api})
        site, run = api.removesuffix("/api"), first_id(api, "flow_runs",
                                                       {"sort": "START_TIME_DESC", "limit": 1})
        shoot(f"{site}/runs/flow-run/{run}", out / "prefect-flow-run.png", 1000, wait_ms=20000)
        artifact = first_id(api, "artifacts", {"artifacts": {"key": {"any_": ["tokenize-metrics"]}},
                                               "flow_runs": {"id": {"any_": [run]}}})
        shoot(f"{site}/artifacts/artifact/{artifact}", out / "prefect-artifact.png", 900, wait_ms=20000)


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
