"""Prefect flows against a real Prefect server on loopback (`prefect server start`, SQLite in a
temporary PREFECT_HOME), driving DVC in a temporary git repo on the tiny profile."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, WIRING_ADAPT, WIRING_CONFIGS, WIRING_RUNS, sh, tiny_repo

pytestmark = pytest.mark.e2e
STAGES = ["ingest", "clean", "tokenize", "embed", "warmstart", "train",
          *[f"compare@{c}" for c in WIRING_CONFIGS],
          *[f"finetune@{r}" for r in WIRING_RUNS], "domain", *[f"adapt@{r}" for r in WIRING_ADAPT],
          "compress",
          "evaluate", "plan", "report"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on 127.0.0.1 with its own SQLite database, once for the
    module; this process (and what it starts) talks to it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import local_server

    home = tmp_path_factory.mktemp("prefect-home")
    with local_server(home) as url:
        saved = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                yield url
                from prefect.logging.handlers import APILogHandler

                asyncio.run(APILogHandler.aflush())  # the last log lines reach the server before it stops
        finally:
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a folder of its own: the default remote is a folder beside the repository, and the e2e
    # module's pipeline pushes the same bytes (the outputs are portable): its push would find them
    return tiny_repo(tmp_path_factory.mktemp("flows") / "repo")


def artifact(key: str) -> Any:
    """The latest artifact with this key, read back from the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read() -> Any:
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
                key])),
                sort=ArtifactSort.CREATED_DESC, limit=1)
            return found[0] if found else None

    return asyncio.run(read())


def task_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[
                flow_run_id])))

    return asyncio.run(read())


def point_runs() -> list[Any]:
    """Every sweep point's task run on the server (points run in the sweep's subflow)."""
    from prefect.client.orchestration import get_client

    async def read() -> list[Any]:
        async with get_client() as client:
            return [r for r in await client.read_task_runs() if r.name.startswith("sweep-")]

    return asyncio.run(read())


def task_logs(task_run_id: Any) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    async def read() -> str:
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[
                task_run_id])))
            return "\n".join(entry.message for entry in logs)

    return asyncio.run(read())


def task_log_entries(task_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[
                task_run_id])))

    return asyncio.run(read())


def git_clean(repo: Path) -> str:
    return sh("git", "status", "--porcelain", cwd=repo)


BAR = re.compile(r"^([\w ]+): +(?:\d+%\||\d+ [\w ]+ \[\d\d:\d\d)")  # tqdm's line, with a total or without


def test_progress_bar_redraws_become_one_line_and_levels_are_kept() -> None:
    from flows.common import level_of, output_lines

    read, write = os.pipe()
    os.write(write, b"tokenize train:   0%|          | 0/9\rtokenize train:  44%|####4     | 4/9\r"
                    b"tokenize train: 100%|##########| 9/9\n2026-11-29 10:00:00,000 WARNING lmmem: low\n"
                    b"lmmem train: error: train.steps: 0\nERROR: failed to reproduce 'train'\n"
                    b"\ringest: 0 docs [00:00, ? docs/s]2026-11-29 10:00:01,000 WARNING lmmem.ingest: "
                    b"skipped\nno newline at the end"
             )
    os.close(write)
    lines = list(output_lines(read))
    os.close(read)
    assert lines == ["tokenize train: 100%|##########| 9/9", "2026-11-29 10:00:00,000 WARNING lmmem: low",
                     "lmmem train: error: train.steps: 0", "ERROR: failed to reproduce 'train'",
                     "2026-11-29 10:00:01,000 WARNING lmmem.ingest: skipped", "no newline at the end"]
    assert [level_of(ln) for ln in lines] == [logging.INFO, logging.WARNING, logging.ERROR, logging.ERROR,
                                              logging.WARNING, logging.INFO]


def test_pipeline_runs_every_stage_then_skips_every_stage(server: str, repo: Path) -> None:
    """Over a minute, and must be: the whole tiny pipeline runs through the flow and a real
    Prefect server, each stage a task, before the second run finds every stage cached."""
    from flows.pipeline import pipeline

    state = pipeline(root=str(repo), return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {stage: "ran" for stage in STAGES}
    runs = {run.name: run for run in task_runs(state.state_details.flow_run_id)}
    assert {name: run.state.name for name, run in runs.items()} == {**{stage: "Ran" for stage in STAGES},
                                                                    "dvc push": "Pushed"}
    # .dvc/config's default remote
    assert any(f.is_file() for f in (repo.parent / "lmmem-dvc-remote").rglob("*"))
    train = artifact("train-metrics")
    rows = {row["metric"]: row["value"] for row in json.loads(train.data)}
    stored = json.loads((repo / "data" / "metrics" / "train.json").read_text())
    assert rows["val_ppl"] == pytest.approx(stored["val_ppl"]) and rows["steps"] == stored["steps"]
    compared = {row["metric"]: row["value"]
                for row in json.loads(artifact("compare-chunked-loss-metrics").data)}
    assert compared["mem_total_peak_mib"] == json.loads(
        (repo / "data" / "metrics" / "compare" / "chunked-loss.json").read_text())["mem_total_peak_mib"]
    from flows.common import PROGRESS_EVERY

    for stage in ("tokenize", "train"):  # a progress bar: one line when it ends, not one per redraw
        for _ in range(30):  # the log handler sends its lines on its own schedule
            bars = [ln for ln in task_logs(runs[stage].id).splitlines() if BAR.match(ln)]
            if bars:
                break
            time.sleep(1)
        names = [BAR.match(ln).group(1) for ln in bars]  # type: ignore[union-attr]
        # besides its last state, a bar still running is logged once every PROGRESS_EVERY seconds
        # at most (a slow machine's task runs past it)
        allowed = 1 + int(runs[stage].total_run_time.total_seconds() // PROGRESS_EVERY)
        assert bars and all(names.count(name) <= allowed for name in names), (allowed, bars)
    assert [ln for ln in bars if "100%|" in ln], bars  # train's bar has a total: drawn to its end
    summary = artifact("pipeline-summary")
    assert "| evaluate | ran |" in summary.data and "size_ratio" in summary.data
    report = artifact("report")
    assert report.data == (repo / "data" / "report" / "report.md").read_text(encoding="utf-8")
    sh("git", "add", "-A", cwd=repo)  # dvc.lock, the uncached metrics and plots, data/.gitignore
    sh("git", "commit", "-qm", "pipeline ran", cwd=repo)

    again = pipeline(root=str(repo), return_state=True)
    assert again.result() == {stage: "skipped" for stage in STAGES}
    for _ in range(30):  # the server records the last task run's state a moment after the flow returns
        runs = task_runs(again.state_details.flow_run_id)
        if len(runs) >= len(STAGES):
            break
        time.sleep(1)
    assert sorted(run.state.name for run in runs) == ["Skipped"] * len(STAGES)  # nothing ran: nothing to push
    assert git_clean(repo) == ""


def test_the_command_line_flow_prints_its_info_lines(server: str, repo: Path) -> None:
    """Prefect sets the root logger to WARNING: lmmem's INFO lines ("Prefect API: ...") once
    never printed."""
    env = {**os.environ, "PREFECT_API_URL": server, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--stages", "ingest", "--root",
                             str(repo)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 0, said[-3000:]
    assert f"Prefect API: {server} (runs, logs and artifacts are kept there)" in said
    assert "stages in DVC's order: ingest; changed: none" in said
    assert result.stdout.rstrip().endswith("ingest: skipped")


def test_failing_stage_fails_its_task_with_dvcs_message_after_retries(server: str, repo: Path) -> None:
    from flows.pipeline import pipeline

    before = (repo / "params.yaml").read_bytes()
    state = pipeline(stages=["train"], overrides=["train.steps=-1"], root=str(repo), return_state=True)
    assert state.is_failed()
    runs = task_runs(state.state_details.flow_run_id)
    assert len(runs) == 1 and runs[0].state.is_failed()
    assert yaml.safe_load(before)["flows"]["retries"] >= 1
    assert runs[0].run_count == 1  # a refused param fails the same way again: not retried
    assert "train.steps" in runs[0].state.message and "greater than or equal to 1" in runs[0].state.message
    for _ in range(30):  # the log handler sends its lines on its own schedule
        errors = [e for e in task_log_entries(runs[0].id) if e.message.startswith("lmmem train: error: ")]
        if errors:
            break
        time.sleep(1)
    assert errors and all(e.level == logging.ERROR for e in errors)
    assert (repo / "params.yaml").read_bytes() == before and git_clean(repo) == ""


def test_a_stage_that_crashes_is_retried(server: str, repo: Path) -> None:
    """A crash (a traceback, a kill: no `lmmem <stage>: error:` line) may pass on a second
    try: retried per flows.retries. A report whose work raises stands for one; its previous
    outputs come back each time (the workspace stays clean)."""
    from flows.pipeline import pipeline

    module = repo / "stages" / "report" / "__init__.py"
    source = module.read_text(encoding="utf-8")
    crash = ("\n\ndef run(*args, **kwargs):  # main() finds this one: the last `run` of the module\n"
             "    raise RuntimeError('a crash')\n")
    module.write_text(source + crash, encoding="utf-8")
    try:
        state = pipeline(stages=["report"], root=str(repo), return_state=True)
    finally:
        module.write_text(source, encoding="utf-8")
    assert state.is_failed()
    runs = {run.name: run for run in task_runs(state.state_details.flow_run_id)}
    assert runs["report"].state.is_failed()
    assert runs["report"].run_count == yaml.safe_load((repo / "params.yaml").read_text())["flows"][
        "retries"] + 1
    assert {name: run.state.name for name, run in runs.items() if name != "report"} == {
        stage: "Skipped" for stage in STAGES if stage != "report"}
    assert "RuntimeError: a crash" in task_logs(runs["report"].id)
    assert git_clean(repo) == ""


def test_sweep_two_points_compared_and_not_run_twice(server: str, repo: Path) -> None:
    from flows.sweep import sweep

    points = [["train.steps=6"], ["train.steps=8"]]  # the tiny profile warms up 5 steps
    rows = sweep(points=points, targets=["train"], root=str(repo))
    assert [r["point"] for r in rows] == ["train.steps=6", "train.steps=8"]
    assert all(r["experiment"] != "missing" for r in rows)
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo))
    names = {e.get("name") for b in shown for r in (b.get("experiments") or []) for e in r["revs"]}
    assert {r["experiment"] for r in rows} <= names
    assert rows[0]["val ppl"] != rows[1]["val ppl"]  # the params differ, so do the metrics
    assert rows[0]["train tensor peak MiB"] == rows[1]["train tensor peak MiB"]  # steps do not change memory
    table = json.loads(artifact("sweep-comparison").data)
    assert [r["point"] for r in table] == ["train.steps=6", "train.steps=8"]
    report = artifact("sweep-report").data  # the report, regenerated with both experiments
    for r in rows:
        assert f"| {r['experiment']} | train.steps={r['point'].split('=')[1]} |" in report
    assert git_clean(repo) == ""

    assert len(point_runs()) == 2
    state = sweep(points=points, targets=["train"], root=str(repo), return_state=True)
    assert state.is_completed()
    assert [r["val ppl"] for r in state.result()] == [r["val ppl"] for r in rows]
    assert len(point_runs()) == 2  # both experiments exist with these params: nothing ran again


def test_a_sweep_longer_than_its_limit_is_refused_before_any_point_runs(server: str, repo: Path) -> None:
    """Each point's time at most: the workspace run's seconds of the stages it can rerun."""
    from flows.sweep import point_seconds, sweep

    train = json.loads((repo / "data" / "metrics" / "train.json").read_text())["seconds"]
    upstream = sum(json.loads((repo / "data" / "metrics" / f"{s}.json").read_text())["seconds"]
                   for s in ("ingest", "clean", "tokenize", "embed", "warmstart"))
    assert point_seconds(repo, ["train"]) == pytest.approx(train + upstream)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["flows"]["max_sweep_hours"] = 2 * (train + upstream) / 3600  # two points' worth: three are refused
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    runs_before = len(point_runs())
    try:
        state = sweep(points=[["train.steps=9"], ["train.steps=10"], ["train.steps=11"]], targets=["train"],
                      root=str(repo), return_state=True)
    finally:
        sh("git", "checkout", "--", "params.yaml", cwd=repo)
    assert state.is_failed()
    assert "sweep: 3 points would take up to" in state.message
    assert "more than flows.max_sweep_hours" in state.message
    assert len(point_runs()) == runs_before  # nothing ran


def test_sweep_of_a_fine_tuning_param_compares_the_run(server: str, repo: Path) -> None:
    """A finetune run's keys are swept like any param: the comparison has each run's memory and
    accuracy, and a larger LoRA rank holds more adapter memory."""
    from flows.sweep import sweep

    run = WIRING_RUNS[-1]  # qlora
    points = [[f"finetune.runs.{run}.lora_rank=2"], [f"finetune.runs.{run}.lora_rank=16"]]
    rows = sweep(points=points, targets=[f"finetune@{run}"], root=str(repo))
    assert [r["point"] for r in rows[:2]] == [p[0] for p in points]  # then the earlier sweeps' points
    small, large = rows[:2]
    assert 0 < small[f"finetune {run} adapters MiB"] < large[f"finetune {run} adapters MiB"]
    assert small[f"finetune {run} MiB"] < large[f"finetune {run} MiB"]
    assert 0 <= small[f"finetune {run} accuracy"] <= 1 and 0 <= large[f"finetune {run} accuracy"] <= 1
    assert git_clean(repo) == ""


def test_sweep_on_a_dask_local_cluster(server: str, repo: Path) -> None:
    """flows.task_runner: dask runs the points on a Dask LocalCluster (prefect-dask); the
    `flows` section is not part of what makes a point the same."""
    from flows.sweep import sweep

    committed = (repo / "params.yaml").read_text()
    params = yaml.safe_load(committed)
    params["flows"].update(task_runner="dask", concurrency=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))  # uncommitted: same commit
    before = {r.id for r in point_runs()}
    state = sweep(points=[["train.steps=8"], ["train.steps=7"]], targets=["train"], root=str(repo),
                  return_state=True)
    assert state.is_completed(), state.message
    new = [r for r in point_runs() if r.id not in before]
    assert len(new) == 1  # train.steps=8 exists already, with the same params (flows aside)
    for _ in range(30):  # the worker process sends its task's log lines on its own schedule
        if "on dask worker tcp://127.0.0.1:" in task_logs(new[0].id):
            break
        time.sleep(1)
    assert "on dask worker tcp://127.0.0.1:" in task_logs(new[0].id)
    rows = state.result()
    assert rows[0]["point"] == "train.steps=8" and rows[1]["experiment"] != "missing"
    assert rows[1]["val ppl"] not in (None, rows[0]["val ppl"])
    (repo / "params.yaml").write_text(committed)
    assert git_clean(repo) == ""


def test_a_failed_sweep_point_keeps_the_others_and_the_comparison_accumulates(server: str,
                                                                              repo: Path) -> None:
    """One bad point once failed the whole sweep, left its good points uncompared and the old
    comparison.csv in place; and each sweep replaced comparison.csv with its own points."""
    from flows.sweep import sweep

    state = sweep(points=[["train.steps=9"], ["train.steps=0"]], targets=["train"], root=str(repo),
                  return_state=True)
    assert state.is_failed()
    assert "1 of 2 sweep points failed" in state.message and "train.steps=0: " in state.message
    with (repo / "data" / "sweep" / "comparison.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    points = [row["point"] for row in rows]
    assert points[:2] == ["train.steps=9", "train.steps=0"]
    assert rows[0]["experiment"].startswith("sweep-") and float(rows[0]["val ppl"]) > 0
    assert rows[1]["experiment"].startswith("failed: ") and "train.steps" in rows[1]["experiment"]
    # the earlier sweeps' points
    assert {"train.steps=6", "train.steps=7", "train.steps=8"} <= set(points[2:])
    failed = [run for run in point_runs() if run.state.is_failed()]
    assert len(failed) == 1 and failed[0].run_count == 1  # refused: not retried
    assert git_clean(repo) == ""


def test_served_deployment_triggered_through_the_api_completes(server: str, repo: Path) -> None:
    """About a minute, and must be: a served deployment's worker starts, picks the run up from
    the API and runs the pipeline's flow to its end, as a user's click in the UI does."""
    from prefect.deployments import run_deployment

    from flows.serve import stop_process_group

    env = {**os.environ, "PREFECT_API_URL": server, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--root", str(repo)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                run = run_deployment("lmmem-pipeline/pipeline", parameters={"stages": ["ingest"]}, timeout=0)
                break
            except Exception:  # the deployment is not registered yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(2)
        from prefect.client.orchestration import get_client

        async def wait() -> Any:
            async with get_client() as client:
                for _ in range(300):
                    flow_run = await client.read_flow_run(run.id)
                    if flow_run.state.is_final():
                        return flow_run
                    await asyncio.sleep(1)
                return flow_run

        finished = asyncio.run(wait())
        assert finished.state.is_completed(), finished.state.message
        assert finished.parameters["root"] == str(repo)
        assert sorted(r.state.name for r in task_runs(run.id)) == ["Skipped"]
        # a plan from the UI's Run form: the planner's question, its answer as the run's artifact
        run = run_deployment("lmmem-plan/plan", timeout=0, parameters={
            "arch": "stages/plan/tiny-llama.json", "devices_gib": [0.002, 1.0], "batch_size": 2,
            "micro_batch_size": 2, "context": 64, "reserve_mib": 0.5, "max_seconds": 60})
        finished = asyncio.run(wait())
        assert finished.state.is_completed(), finished.state.message
        answer = artifact("plan").data
        assert "device-1 (1,024 MiB, 0 held back): fits with as asked" in answer
        assert "device-0 (2 MiB): nothing tried fits" in answer
    finally:
        stop_process_group(proc, signal.SIGINT)
    said = proc.stdout.read() if proc.stdout else ""
    assert ("serving lmmem-pipeline/pipeline (no schedule), lmmem-sweep/sweep and lmmem-plan/plan "
            "(on demand)") in said, said[-2000:]


def test_the_documented_server_steps_work_on_any_port(tmp_path: Path) -> None:
    """Started with `--port` before PREFECT_API_URL was set, the UI pointed at port 4200. The
    documentation's own lines (docs/flows.md), run on another port: the server listens there
    and tells its UI to call the API there."""
    import urllib.request

    from flows.serve import free_port, stop_process_group

    page = (ROOT / "docs" / "flows.md").read_text(encoding="utf-8")
    steps = [ln.split("#")[0].strip() for ln in page.splitlines()
             if ln.startswith(("PORT=", "prefect config set PREFECT_SERVER_API_PORT",
                               "prefect server start"))]
    assert [s.split()[0] for s in steps] == ["PORT=4200", "prefect", "prefect"], steps
    port = free_port()
    script = "\n".join([f"PORT={port}", steps[1], f"exec {steps[2]}"])
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("PREFECT_API_URL", "PREFECT_SERVER_API_PORT", "PREFECT_UI_API_URL", "PREFECT_PROFILE"):
        env.pop(name, None)
    with (tmp_path / "server.log").open("w") as out:
        proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings",
                                                timeout=5) as response:
                        settings = json.loads(response.read())
                        break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline, (
                        tmp_path / "server.log").read_text()
                    time.sleep(1)
        finally:
            stop_process_group(proc)
    assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
