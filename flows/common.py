"""What the flows share: the `flows` params section, DVC's own stage graph, DVC runs whose
lines go to Prefect's log, and metrics published as Prefect artifacts.

DVC owns caching and Prefect orchestrates: every stage runs through DVC (a subprocess, so
a flow run and `dvc repro` produce the same artifacts and skip the same work), and what
DVC says about each stage (ran, skipped, restored from its run-cache) becomes the state of
the task that ran it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import networkx as nx
from prefect.settings import get_current_settings
from pydantic import Field

from stages.common.core.errors import StageError
from stages.common.core.params import Section, read_params_file, validate_section

ROOT = Path(__file__).resolve().parent.parent

# What DVC prints about each stage it looked at, and the task state name it becomes.
STATUS_LINES = {  # a stage of another dvc.yaml is named like sub/dvc.yaml:train
    "ran": re.compile(r"Running stage '([^']+)'"),
    "skipped": re.compile(r"Stage '([^']+)' didn't change, skipping"),
    "restored": re.compile(r"Stage '([^']+)' is cached - skipping run, checking out outputs"),
}
STATE_NAMES = {"ran": "Ran", "skipped": "Skipped", "restored": "Restored"}

log = logging.getLogger("lmmem.flows")


class FlowParams(Section):
    """The `flows` section of params.yaml (read by the flows, never by a stage)."""

    retries: int = Field(
        1, ge=0, le=10, description="a failed stage or sweep point is run again this many times")
    retry_delay_seconds: float = Field(5.0, ge=0.0, description="wait before a retry")
    concurrency: int = Field(
        1, ge=1,
        description="sweep points run at once, each in its own temporary workspace (1 on a 2-core machine)")
    task_runner: Literal["threads", "dask"] = Field(
        "threads",
        description="threads (this machine) or dask (prefect-dask: dask_address, else a LocalCluster)")
    dask_address: str = Field(
        "", description='a running Dask scheduler, tcp://host:8786; "" = start a LocalCluster')
    schedule: str = Field(
        "", description='cron for the served pipeline deployment ("0 3 * * *"); "" = run on demand only')
    push: bool = Field(
        True, description=("after a pipeline run, dvc push the outputs to the default DVC remote "
                           "(.dvc/config); false = keep them here"))
    max_sweep_hours: float = Field(24.0, gt=0.0, le=8760.0, description=(
        "refuse, before any point runs, a sweep whose points would take longer at most (each point: the "
        "seconds of the stages it can rerun, from the workspace's metrics)"))


def flow_params(root: Path) -> FlowParams:
    """The `flows` section of root/params.yaml (defaults where it is absent)."""
    return validate_section("flows", read_params_file(root / "params.yaml").get("flows"), FlowParams)


def dvc_env() -> dict[str, str]:
    """The environment DVC and the stage commands see: this interpreter's bin first (the
    stage commands say `python`), analytics off (no network here)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}


def stage_name(stage: Any, root: Path) -> str:
    """The name `dvc repro` takes from root: `train`, or `sub/dvc.yaml:train` for a stage
    of another dvc.yaml (DVC's own `addressing` is relative to the current directory)."""
    dvcfile = Path(stage.dvcfile.path).resolve()
    if dvcfile == (root / "dvc.yaml").resolve():
        return stage.name
    return f"{os.path.relpath(dvcfile, root.resolve())}:{stage.name}"


@dataclass
class StagePlan:
    """The stages a flow run looks at, from DVC's own graph: in dependency order, what each
    depends on (transitively), and which `dvc status` finds changed now. A stage not changed
    whose upstream stages all skip has nothing to do: the flow says so without starting DVC."""

    order: list[str]
    upstream: dict[str, set[str]]
    changed: set[str]

    def needs_dvc(self, stage: str, acted: set[str]) -> bool:
        """Whether `dvc repro` must look at `stage`, given the stages DVC ran or restored so far."""
        return stage in self.changed or bool(self.upstream[stage] & acted)


def stage_plan(root: Path, targets: list[str] | None = None) -> StagePlan:
    """dvc.yaml's stages in dependency order, read from DVC's own graph, with their status.
    With targets: those stages and every stage they depend on (what `dvc repro <targets>`
    would look at). A stage whose status cannot be read now (another DVC process holds its
    lock) counts as changed: DVC decides when it gets there."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    from stages.common.harness.specials import dvc_dependencies, problems, refusal

    if special := problems(dvc_dependencies(root), root):  # before DVC hashes one for ever
        raise StageError(refusal(special))
    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge goes from a stage to a stage it depends on
        names = {stage: stage_name(stage, root) for stage in graph.nodes}
        ordered = [names[stage] for stage in reversed(list(nx.topological_sort(graph)))]
        unknown = [t for t in targets or [] if t not in ordered]
        if unknown:
            raise StageError(f"no stage named {', '.join(map(repr, unknown))} in dvc.yaml "
                             f"(stages: {', '.join(ordered)})")
        wanted = set(targets or ordered)
        for stage, name in names.items():
            if name in wanted:
                wanted |= {names[s] for s in nx.descendants(graph, stage)}
        upstream = {name: {names[s] for s in nx.descendants(graph, stage)} for stage, name in names.items()
                    if name in wanted}
        try:
            with repo.lock:  # as `dvc status` reads it; another DVC process holding it: DVC decides per stage
                changed = {name for stage, name in names.items() if name in wanted and stage.status()}
        except DvcException:
            changed = set(wanted)
    return StagePlan([name for name in ordered if name in wanted], upstream, changed)


class DvcFailed(RuntimeError):
    """DVC (or the stage it ran) exited non-zero; the message is DVC's own."""


class Refused(DvcFailed):
    """The stage refused its input or params (its `lmmem <stage>: error:` line): the same run
    fails the same way again, so it is not retried."""


def retry_unless_refused(task: Any, task_run: Any, state: Any) -> bool:
    """The tasks' retry condition (Prefect's retry_condition_fn): a refusal is final."""
    return not isinstance(state.data, Refused)


STAGE_ERROR = re.compile(r"^lmmem [\w-]+: error: ")
# a stage's log line (stage.setup_logging)
LOG_LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
PROGRESS_EVERY = 60.0  # seconds: a progress bar still running is logged at most this often


@dataclass
class DvcRun:
    """One DVC command's outcome: its exit code, its lines, and what it said per stage."""

    command: list[str]
    returncode: int
    lines: list[str] = field(default_factory=list)
    stages: dict[str, str] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return any(STAGE_ERROR.match(line) for line in self.lines)

    def error(self) -> str:
        """The failure in DVC's and the stage's words: the stage's `lmmem <stage>: error:` line and
        DVC's ERROR lines."""
        picked = [ln for ln in self.lines if STAGE_ERROR.match(ln)]
        picked += [ln for ln in self.lines if ln.startswith("ERROR")]
        tail = picked or self.lines[-3:]
        return f"`{' '.join(self.command[2:])}` exited {self.returncode}: " + " | ".join(tail)

    def fail(self) -> DvcFailed:
        """The exception a task raises for this run: Refused (not retried) or DvcFailed."""
        return (Refused if self.refused else DvcFailed)(self.error())


def level_of(line: str) -> int:
    """The level a line is logged at: DVC's ERROR and WARNING lines and the stage's error line
    and log lines keep theirs; everything else is INFO."""
    if STAGE_ERROR.match(line) or line.startswith("ERROR"):
        return logging.ERROR
    if line.startswith("WARNING"):
        return logging.WARNING
    found = LOG_LEVEL.match(line)
    return getattr(logging, found.group(1)) if found else logging.INFO


LOG_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ [A-Z]+ ")  # a stage's log line begins so


def _shown(segment: bytes) -> str:
    """A line as logged: a progress bar's state that a log line was written after, without a
    newline between them, gives way to that log line."""
    text = segment.decode("utf-8", errors="replace").rstrip()
    found = LOG_START.search(text, 1)
    return text[found.start():] if found else text


def output_lines(fd: int) -> Iterator[str]:
    """The lines a child writes to `fd`, until it closes. A progress bar redraws itself with
    carriage returns: each line yields its last state only (a finished bar: one line), and a
    bar still running yields its current state at most every PROGRESS_EVERY seconds."""
    buffer, shown = b"", time.monotonic()
    while chunk := os.read(fd, 65536):
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            last = next((seg for seg in reversed(raw.split(b"\r")) if seg.strip()), b"")
            if last.strip():
                yield _shown(last)
        if b"\r" in buffer and time.monotonic() - shown >= PROGRESS_EVERY:
            drawn = [seg for seg in buffer.split(b"\r")[:-1] if seg.strip()]
            if drawn:
                shown = time.monotonic()
                yield _shown(drawn[-1])
    last = next((seg for seg in reversed(buffer.split(b"\r")) if seg.strip()), b"")
    if last.strip():
        yield _shown(last)


def run_dvc(args: list[str], root: Path, log: logging.Logger | logging.LoggerAdapter) -> DvcRun:
    """Run `dvc --wait-for-lock <args>` in root, each output line into `log` as it comes, at
    its own level (a concurrent `dvc repro` makes this wait for the repo lock instead of
    failing)."""
    command = [sys.executable, "-m", "dvc", "--wait-for-lock", *args]
    run = DvcRun(command, -1)
    with subprocess.Popen(command, cwd=root, env=dvc_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for line in output_lines(proc.stdout.fileno()):
            run.lines.append(line)
            log.log(level_of(line), "%s", line)
            for status, pattern in STATUS_LINES.items():
                for stage in pattern.findall(line):
                    run.stages[stage] = status
        run.returncode = proc.wait()
    return run


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """A flat metrics mapping as table rows (metric, value); nested values as JSON."""
    return [{"metric": key, "value": value if isinstance(value, (int, float, str, bool)) or value is None
             else json.dumps(value, sort_keys=True)} for key, value in sorted(metrics.items())]


def read_metrics(root: Path, stage: str) -> dict[str, Any] | None:
    """A stage's data/metrics/<stage>.json; a foreach stage's (compare@bf16)
    data/metrics/compare/bf16.json."""
    path = root / "data" / "metrics" / f"{stage.replace('@', '/')}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of one shape as a Markdown table, columns in the first row's order."""
    if not rows:
        return "(no rows)\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if r[h] is None else str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def setup_logging() -> None:
    """The flows' INFO lines visible on the console: Prefect sets the root logger to WARNING
    when it sets up logging, so lmmem's own logger gets INFO itself (its records go to the
    root's handlers whatever the root's level)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # where nothing is set up yet
    logging.getLogger("lmmem").setLevel(logging.INFO)


def server_url() -> str | None:
    url = get_current_settings().api.url
    return str(url) if url else None


def announce_server() -> None:
    """Say which Prefect API the runs go to (and that they vanish without a server)."""
    url = server_url()
    if url:
        log.info("Prefect API: %s (runs, logs and artifacts are kept there)", url)
    else:
        log.warning("no Prefect server configured (PREFECT_API_URL is unset): this run uses a temporary "
                    "local server that stops with it; start one with `prefect server start` to keep runs "
                    "and use the UI")
