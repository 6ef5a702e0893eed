"""Prefect flows against a real Prefect server on loopback (`prefect server start`, SQLite in a
temporary PREFECT_HOME), driving DVC in a temporary git repo on the tiny profile."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, sh, tiny_repo

pytestmark = pytest.mark.e2e
STAGES = ["ingest", "clean", "tokenize", "embed", "warmstart", "train", "compress", "evaluate", "report"]


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
    return tiny_repo(tmp_path_factory.mktemp("flowrepo"))


def artifact(key: str) -> Any:
    """The latest artifact with this key, read back from the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read() -> Any:
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                                sort=ArtifactSort.CREATED_DESC, limit=1)
            return found[0] if found else None

    return asyncio.run(read())


def task_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

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
            logs = await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))
            return "\n".join(entry.message for entry in logs)

    return asyncio.run(read())


def git_clean(repo: Path) -> str:
    return sh("git", "status", "--porcelain", cwd=repo)


def test_pipeline_runs_every_stage_then_skips_every_stage(server: str, repo: Path) -> None:
    from flows.pipeline import pipeline

    state = pipeline(root=str(repo), return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {stage: "ran" for stage in STAGES}
    runs = {run.name: run for run in task_runs(state.state_details.flow_run_id)}
    assert {name: run.state.name for name, run in runs.items()} == {**{stage: "Ran" for stage in STAGES},
                                                                     "dvc push": "Pushed"}
    assert any(f.is_file() for f in (repo.parent / "lmmem-dvc-remote").rglob("*"))  # .dvc/config's default remote
    train = artifact("train-metrics")
    rows = {row["metric"]: row["value"] for row in json.loads(train.data)}
    stored = json.loads((repo / "data" / "metrics" / "train.json").read_text())
    assert rows["val_ppl"] == pytest.approx(stored["val_ppl"]) and rows["steps"] == stored["steps"]
    summary = artifact("pipeline-summary")
    assert "| evaluate | ran |" in summary.data and "size_ratio" in summary.data
    report = artifact("report")
    assert report.data == (repo / "data" / "report" / "report.md").read_text(encoding="utf-8")
    sh("git", "add", "-A", cwd=repo)  # dvc.lock, the uncached metrics and plots, data/.gitignore
    sh("git", "commit", "-qm", "pipeline ran", cwd=repo)

    again = pipeline(root=str(repo), return_state=True)
    assert again.result() == {stage: "skipped" for stage in STAGES}
    runs = task_runs(again.state_details.flow_run_id)
    assert sorted(run.state.name for run in runs) == ["Skipped"] * len(STAGES) + ["Up to date"]
    assert git_clean(repo) == ""


def test_failing_stage_fails_its_task_with_dvcs_message_after_retries(server: str, repo: Path) -> None:
    from flows.pipeline import pipeline

    before = (repo / "params.yaml").read_bytes()
    state = pipeline(stages=["train"], overrides=["train.steps=-1"], root=str(repo), return_state=True)
    assert state.is_failed()
    runs = task_runs(state.state_details.flow_run_id)
    assert len(runs) == 1 and runs[0].state.is_failed()
    retries = yaml.safe_load(before)["flows"]["retries"]
    assert runs[0].run_count == retries + 1  # retried per params
    assert "train.steps" in runs[0].state.message and "greater than or equal to 1" in runs[0].state.message
    assert (repo / "params.yaml").read_bytes() == before and git_clean(repo) == ""


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


def test_served_deployment_triggered_through_the_api_completes(server: str, repo: Path) -> None:
    from prefect.deployments import run_deployment

    from flows.serve import stop_process_group

    env = {**os.environ, "PREFECT_API_URL": server, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--root", str(repo)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
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
        assert sorted(r.state.name for r in task_runs(run.id)) == ["Skipped", "Up to date"]
    finally:
        stop_process_group(proc, signal.SIGINT)
