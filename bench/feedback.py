"""The three clocks of a contributor's feedback, each on a fresh clone of this repository's
committed HEAD:

- `tests`: `make test` in a clone that reuses this checkout's .venv (the suite's own time);
- `ci`: `.ci/run` in a clone with no .venv (it builds one from requirements.lock; the apt
  packages may already be on this machine: said in the output);
- `tiny`: `dvc repro` of the tiny profile (tests/params.tiny.yaml) with its stages' own
  seconds beside its wall time (bench.main_job), and their ratio, the orchestration overhead.

    python -m bench.feedback [--parts tests ci tiny] [--workers 0 2]

Run one at a time on a quiet machine: they share its cores.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, machine

SUMMARY = re.compile(r"=+ (.*(?:passed|failed).*) in ([\d.]+)s")


def clone(work: Path, name: str, venv: bool) -> Path:
    target = work / name
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    if venv:
        (target / ".venv").symlink_to(ROOT / ".venv")
        # requirements.lock and pyproject.toml as installed: no reinstall
        (ROOT / ".venv" / ".installed").touch()
    return target


def timed(command: list[str], cwd: Path, log: Path) -> tuple[float, int, str]:
    """Wall seconds, exit code and pytest's summary line of `command`, its output in `log`."""
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - started
    found = SUMMARY.findall(log.read_text(errors="replace"))
    return seconds, code, found[-1][0] if found else "no pytest summary"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["tests", "ci", "tiny"],
                        default=["tests", "ci", "tiny"])
    parser.add_argument("--workers", nargs="+", default=None,
                        help="`tests` once per pytest-xdist worker count given (make test TEST_WORKERS=N; "
                             "0: one process), one after the other on the same clone; default: make test as "
                             "it is")
    parser.add_argument("--keep", action="store_true",
                        help="keep the clones and logs (their folder is printed)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmmem-feedback-"))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    print(f"machine: {machine()}; commit {head}; logs in {work}\n", flush=True)
    print("| clock | wall s | exit | result |\n|---|---|---|---|", flush=True)
    if "tests" in args.parts:
        where = clone(work, "tests", venv=True)
        for n in args.workers or [None]:
            command = ["make", "test"] + ([] if n is None else [f"TEST_WORKERS={n}"])
            label = "make test" if n is None else f"make test, {n} pytest-xdist workers"
            seconds, code, said = timed(command, where, work / f"make-test-{n}.log")
            print(f"| {label} (the venv there) | {seconds:,.1f} ({seconds / 60:.1f} min) | {code} | {said} |",
                  flush=True)
    if "ci" in args.parts:
        apt = all(shutil.which(b) for b in ("chromium",))
        seconds, code, said = timed([".ci/run"], clone(work, "ci", venv=False), work / "ci.log")
        print(f"| .ci/run (no venv; apt packages {'already here' if apt else 'installed by it'}) | "
              f"{seconds:,.1f} "
              f"({seconds / 60:.1f} min) | {code} | {said} |", flush=True)
    if "tiny" in args.parts:
        done = subprocess.run([sys.executable, "-m", "bench.main_job", "--params", "tests/params.tiny.yaml"],
                              cwd=ROOT,
                              capture_output=True, text=True, check=False)
        (work / "tiny.md").write_text(done.stdout + done.stderr)
        wall = re.search(r"\*\*dvc repro\*\* \| \*\*([\d.]+)\*\*", done.stdout)
        own = sum(float(m) for m in re.findall(r"^\| [\w@-]+ \| [\d.-]+ \| ([\d.]+) \|$", done.stdout, re.M))
        ratio = float(wall.group(1)) / own if wall and own else float("nan")
        print(f"| tiny profile's dvc repro | {wall.group(1) if wall else '?'} | {done.returncode} | stages' "
              f"own {own:,.1f} s: overhead {ratio:.2f} x |", flush=True)
        print("\n" + done.stdout)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
