"""pipeline flow: dvc.yaml's stages as Prefect tasks, in DVC's dependency order.

    python -m flows.pipeline [--stages train evaluate] [-S train.steps=50 ...] [--name NAME]

Why it is built this way: docs/design-notes.md, `flows.pipeline`.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.states import Completed, State

from flows.common import (ROOT, STATE_NAMES, DvcFailed, announce_server, artifact_key, flow_params,
                          markdown_table, metric_rows, read_metrics, retry_unless_refused, run_dvc,
                          setup_logging, stage_plan)
from stages.common.core.errors import StageError
from stages.common.harness.experiments import experiment_records

RAN_EXPERIMENT = re.compile(r"Ran experiment\(s\): ([\w.-]+)")
# [file:]key.path=value as `dvc exp run -S` takes it; Hydra's + (add) and ++ (add or override) too
OVERRIDE = re.compile(r"^(\+{1,2})?([A-Za-z_][\w.-]*:)?[A-Za-z_][\w.-]*=.*$")


def check_overrides(overrides: list[str]) -> None:
    bad = [o for o in overrides if not OVERRIDE.match(o)]
    if bad:
        raise StageError(f"override {bad[0]!r} is not key.path=value (as `dvc exp run -S train.steps=50`)")


@task(cache_policy=NONE, task_run_name="{stage}")
def stage_task(stage: str, root: str, with_dvc: bool = True) -> State:
    """One DVC stage: DVC decides whether it runs; its answer names the task's final state."""
    log = get_run_logger()
    if not with_dvc:  # dvc status found it unchanged and nothing upstream acted
        log.info("dvc status: %s unchanged, its outputs as dvc.lock records them: skipped", stage)
        status = "skipped"
    else:
        run = run_dvc(["repro", "--single-item", stage], Path(root), log)
        if run.returncode != 0:
            raise run.fail()
        status = run.stages.get(stage)
        if status is None:
            raise DvcFailed(f"DVC said nothing about stage {stage!r}: " + " | ".join(run.lines[-3:]))
    metrics = read_metrics(Path(root), stage)
    if metrics is not None:
        create_table_artifact(key=artifact_key(stage, "metrics"), table=metric_rows(metrics),
                              description=f"data/metrics/{stage}.json after DVC {status} the stage")
    return Completed(name=STATE_NAMES[status], message=f"DVC {status} {stage}", data=status)


@task(cache_policy=NONE, task_run_name="experiment {name}")
def experiment_task(root: str, overrides: list[str], targets: list[str], name: str) -> dict[str, str]:
    """The run as one DVC experiment in a temporary workspace; returns DVC's answer per stage."""
    log = get_run_logger()
    args = ["exp", "run", "--temp", *[a for o in overrides for a in ("-S", o)],
            *(["--name", name] if name else []),
            *targets]
    run = run_dvc(args, Path(root), log)
    if run.returncode != 0:
        raise run.fail()
    made = [m.group(1) for ln in run.lines if (m := RAN_EXPERIMENT.search(ln))]
    if made:
        publish_experiment(Path(root), made[-1])
    return run.stages


@task(cache_policy=NONE, task_run_name="dvc push")
def push_task(root: str) -> State:
    """`dvc push`: the outputs to the default DVC remote, for other clones to `dvc pull`. The
    final state is Pushed, or Up to date when the remote had everything."""
    run = run_dvc(["push"], Path(root), get_run_logger())
    if run.returncode != 0:
        raise run.fail()
    said = run.lines[-1] if run.lines else ""
    return Completed(name="Up to date" if "up to date" in said.lower() else "Pushed", message=said, data=said)


def publish_experiment(root: Path, name: str) -> None:
    """The experiment's metrics as DVC recorded them, as one table artifact."""
    found = next((e for e in experiment_records(root) if e["name"] == name), None)
    if found is None:
        return
    rows = [{"file": file, **row} for file, metrics in sorted(found["metrics"].items())
            for row in metric_rows(metrics)]
    create_table_artifact(key=artifact_key("experiment", name, "metrics"), table=rows,
                          description=f"DVC experiment {name}: every metrics file")


def summary_markdown(root: Path, answers: dict[str, str], overrides: list[str]) -> str:
    lines = ["# lmmem pipeline run", ""]
    if overrides:
        lines += ["DVC experiment with " + ", ".join(f"`{o}`" for o in overrides), ""]
    lines += ["| stage | DVC |", "|---|---|"] + [f"| {s} | {a} |" for s, a in answers.items()]
    table = root / "data" / "eval" / "table.csv"
    if not overrides and table.is_file():
        with table.open(newline="", encoding="utf-8") as f:
            lines += ["", "## Evaluation (data/eval/table.csv)", "", markdown_table(list(csv.DictReader(f)))]
    return "\n".join(lines) + "\n"


@flow(name="lmmem-pipeline")
def pipeline(stages: list[str] | None = None, overrides: list[str] | None = None, name: str = "",
             root: str = str(ROOT)) -> dict[str, str]:
    """Run dvc.yaml's stages (all, or `stages` and what they depend on) through DVC. With
    `overrides` (`train.steps=50`, as `dvc exp run -S`), one DVC experiment instead."""
    log = get_run_logger()
    here, overrides = Path(root), list(overrides or [])
    check_overrides(overrides)
    settings = flow_params(here)
    plan = stage_plan(here, stages)
    order = plan.order
    retry = {"retries": settings.retries, "retry_delay_seconds": settings.retry_delay_seconds,
             "retry_condition_fn": retry_unless_refused}
    log.info("stages in DVC's order: %s; changed: %s", ", ".join(order),
             ", ".join(s for s in order if s in plan.changed) or "none")
    answers: dict[str, str] = {}
    if overrides:
        said = experiment_task.with_options(**retry)(root, overrides, list(stages or []), name)
        answers = {stage: said.get(stage, "not reached") for stage in order}
    else:
        acted: set[str] = set()
        for stage in order:
            state = stage_task.with_options(**retry)(stage, root, plan.needs_dvc(stage, acted),
                                                     return_state=True)
            if state.is_failed():
                state.result()  # raises the task's error: the flow fails with DVC's message
            answers[stage] = state.result()
            if answers[stage] != "skipped":
                acted.add(stage)
        if settings.push and acted:
            log.info("dvc push: %s", push_task.with_options(**retry)(root))
        elif settings.push:
            log.info("dvc push: not run, no stage ran (`dvc push` sends what an earlier run made)")
    create_markdown_artifact(key="pipeline-summary", markdown=summary_markdown(here, answers, overrides),
                             description="what DVC did with each stage")
    report = here / "data" / "report" / "report.md"
    if not overrides and "report" in answers and report.is_file():
        create_markdown_artifact(key="report", markdown=report.read_text(encoding="utf-8"),
                                 description="data/report/report.md (the HTML twin is beside it)")
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="*", default=None, help="stages to run (and what they depend on)")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                        help="key.path=value: run as a DVC experiment with this param changed")
    parser.add_argument("--name", default="", help="the experiment's name (with -S)")
    parser.add_argument("--root", default=str(ROOT), help="the DVC repository")
    args = parser.parse_args(argv)
    setup_logging()
    announce_server()
    try:
        answers: dict[str, Any] = pipeline(args.stages, args.overrides, args.name, args.root)
    except (StageError, DvcFailed) as exc:
        print(f"error: {exc}")
        return 1
    print(", ".join(f"{stage}: {answer}" for stage, answer in answers.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
