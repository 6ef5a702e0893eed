"""Artifacts through the DVC remote: push this clone's outputs, then a fresh clone pulls them
and `dvc repro` has nothing to run, timed, in one run.

    python -m bench.remote

Run after `dvc repro` with everything committed. Pushes to this clone's default remote
(`dvc remote list`), clones HEAD into a temporary folder, points the clone at the same
remote (in its .dvc/config.local), and times `dvc pull` and the no-op `dvc repro` there.
Reported: the bytes in the remote and in the clone's workspace outputs, the seconds of each
command, and which stages (none) the clone's `dvc repro` ran.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, machine
from flows.common import dvc_env


def dvc(*args: str, cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(["dvc", *args], cwd=cwd, env=dvc_env(), capture_output=True, text=True,
                            check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed in {cwd}:\n{result.stdout}{result.stderr}")
    return seconds, result.stdout + result.stderr


def last(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> int:
    if subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip():
        raise SystemExit("commit first: the clone is made from HEAD")
    _, listing = dvc("remote", "list", cwd=ROOT)
    default = next((line.split()[1] for line in listing.splitlines() if "(default)" in line), None)
    if default is None or "://" in default:
        raise SystemExit("this benchmark measures a local-folder default remote; `dvc remote list` "
                         f"says:\n{listing}")
    push_s, push_out = dvc("push", cwd=ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        dvc("remote", "add", "--local", "-d", "-f", "same", default, cwd=clone)
        pull_s, pull_out = dvc("pull", cwd=clone)
        repro_s, repro_out = dvc("repro", cwd=clone)
        ran = re.findall(r"Running stage '([\w-]+)'", repro_out)
        outputs = sum(folder_bytes(clone / "data" / d) for d in ("raw", "clean", "tokens", "embed", "model",
                                                                 "compressed", "eval", "report"))
    print(f"\nmachine: {machine()}; remote {default} ({folder_bytes(Path(default)) / 2**20:.0f} MiB)")
    print("\n| step | seconds | what DVC said |")
    print("|---|---|---|")
    print(f"| dvc push (this clone) | {push_s:.1f} | {last(push_out)} |")
    print(f"| dvc pull (fresh clone, {outputs / 2**20:.0f} MiB of outputs) | {pull_s:.1f} | "
          f"{last(pull_out)} |")
    print(f"| dvc repro (fresh clone) | {repro_s:.1f} | {last(repro_out)} (stages run: "
          f"{', '.join(ran) or 'none'}) |")
    return 0 if not ran else 1


if __name__ == "__main__":
    raise SystemExit(main())
