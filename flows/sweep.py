"""sweep flow: a memory sweep as DVC experiments, one `dvc exp run --temp -S ...` per point.

    python -m flows.sweep --grid train.precision=fp32,bf16 train.activation_checkpointing=false,true
    python -m flows.sweep --file sweep.yaml       # {grid: {key: [values]}} or {points: [[k=v, ...], ...]}
    python -m flows.sweep --grid finetune.runs.lora.lora_rank=4,16 --targets finetune@lora

Why it is built this way: docs/design-notes.md, `flows.sweep`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.states import Completed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import (ROOT, DvcFailed, FlowParams, announce_server, dvc_env, flow_params, markdown_table,
                          retry_unless_refused, run_dvc, setup_logging)
from flows.pipeline import check_overrides
from stages.common.core.errors import StageError
from stages.common.core.params import read_params_file, read_yaml_mapping
from stages.common.harness.experiments import experiment_records, yaml_load

# The comparison's columns: (title, metrics file, key); a missing figure stays empty.
COLUMNS = [
    ("train tensor peak MiB", "data/metrics/train.json", "mem_total_peak_mib"),
    ("estimate MiB", "data/metrics/train.json", "est_total_peak_mib"),
    ("parameters MiB", "data/metrics/train.json", "mem_parameters_peak_mib"),
    ("gradients MiB", "data/metrics/train.json", "mem_gradients_peak_mib"),
    ("optimizer MiB", "data/metrics/train.json", "mem_optimizer_peak_mib"),
    ("activations MiB", "data/metrics/train.json", "mem_activations_peak_mib"),
    ("temporaries MiB", "data/metrics/train.json", "mem_temporaries_peak_mib"),
    ("train peak RSS MiB", "data/metrics/train.json", "peak_rss_mib"),
    ("tokens/s", "data/metrics/train.json", "tokens_per_sec"),
    ("val ppl", "data/metrics/train.json", "val_ppl"),
    ("model MiB on disk", "data/metrics/train.json", "size_on_disk_mib"),
]
# ... and per run of params.yaml's finetune.runs and adapt.runs (stage, title, key): "finetune lora MiB"
RUN_COLUMNS = [
    ("finetune", "MiB", "mem_total_peak_mib"),
    ("finetune", "adapters MiB", "mem_adapters_peak_mib"),
    ("finetune", "accuracy", "accuracy"),
    ("adapt", "MiB", "mem_total_peak_mib"),
    ("adapt", "new-domain ppl", "domain_ppl"),
    ("adapt", "original ppl", "original_ppl"),
]


def columns(params: dict[str, Any]) -> list[tuple[str, str, str]]:
    """COLUMNS, then RUN_COLUMNS for each fine-tuning and adaptation run `params` names."""
    out = list(COLUMNS)
    for stage, title, key in RUN_COLUMNS:
        for name in (params.get(stage) or {}).get("runs") or {}:
            out.append((f"{stage} {name} {title}", f"data/metrics/{stage}/{name}.json", key))
    return out


# ----------------------------------------------------------------------------- points


def parse_value(text: str) -> Any:
    """A -S value as DVC reads it: YAML (true, 3, 0.5, [a, b]) or else the string."""
    try:
        return yaml_load(text)
    except Exception:  # ruamel's errors share no base class worth naming here
        return text


def grid_points(grid: dict[str, list[Any]]) -> list[list[str]]:
    """Every combination of the grid's values, as override lists (key order kept)."""
    if any(not isinstance(v, list) or not v for v in grid.values()):
        raise StageError("sweep grid: every key needs a non-empty list of values")
    keys = list(grid)
    return [[f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in zip(keys, combo,
                             strict=True)] for combo in itertools.product(*(grid[k] for k in keys))]


def read_sweep_file(path: Path) -> list[list[str]]:
    data = read_yaml_mapping(path, "sweep file")  # a mapping, or a one-line error
    if set(data) - {"grid", "points"} or not data:
        raise StageError(f"sweep file {path}: expected `grid:` and/or `points:`, got "
                         f"{', '.join(map(str, data))}")
    points = grid_points(data["grid"]) if "grid" in data else []
    return points + [list(p) for p in data.get("points") or []]


def expected_params(root: Path, overrides: list[str]) -> dict[str, Any]:
    """params.yaml with the overrides applied: what the point's experiment will record."""
    read_params_file(root / "params.yaml")  # a missing or broken file: one clear line
    params = yaml_load((root / "params.yaml").read_text(encoding="utf-8"))
    for override in overrides:
        key, _, value = override.partition("=")
        *path, leaf = key.split(":")[-1].lstrip("+").split(".")
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(value)
    return params


def as_dvc_sets(root: Path, overrides: list[str]) -> list[str]:
    """The overrides as `dvc exp run -S` takes them: a key params.yaml does not hold yet (a
    LoRA rank a run leaves at its default, say) gets Hydra's `++` (add or override); DVC
    refuses to override a key that is not there."""
    params = yaml_load((root / "params.yaml").read_text(encoding="utf-8"))
    out = []
    for override in overrides:
        key = override.partition("=")[0]
        node: Any = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        plain = not key.startswith("+") and ":" not in key
        out.append(f"++{override}" if plain and node is None else override)
    return out


def stages_part(params: dict[str, Any] | None) -> dict[str, Any]:
    """params.yaml without its `flows` section: how a sweep runs does not change what its
    points compute."""
    return {k: v for k, v in (params or {}).items() if k != "flows"}


def point_name(params: dict[str, Any]) -> str:
    """A stable experiment name for a point: a hash of the params it runs with, so the same
    params give the same name and a point after a params.yaml edit gets a new one."""
    canonical = json.dumps(stages_part(params), sort_keys=True, ensure_ascii=False, default=str)
    return "sweep-" + hashlib.sha1(canonical.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- DVC's record


def find_experiment(existing: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any] | None:
    """An experiment of this commit whose params.yaml equals `params` (flows aside)."""
    return next((e for e in existing if stages_part(e["params"]) == stages_part(params)), None)


# ----------------------------------------------------------------------------- tasks and flow


def where() -> str:
    """The Dask worker running this task, or this process."""
    try:
        from distributed import get_worker

        return f"dask worker {get_worker().address}"
    except (ImportError, ValueError):  # ValueError: not inside a Dask worker
        return f"process {os.getpid()}"


@task(cache_policy=NONE, task_run_name="{name}")
def point_task(root: str, overrides: list[str], name: str, targets: list[str]) -> State:
    """One sweep point: one DVC experiment in a temporary workspace."""
    log = get_run_logger()
    log.info("point %s on %s: %s", name, where(), " ".join(overrides) or "(no overrides)")
    args = ["exp", "run", "--temp", *[a for o in as_dvc_sets(Path(root), overrides) for a in ("-S", o)],
            "--name", name, *targets]
    run = run_dvc(args, Path(root), log)
    if run.returncode != 0:
        raise run.fail()
    return Completed(name="Ran", message=f"experiment {name}", data=name)


def task_runner(settings: FlowParams) -> Any:
    """Threads on this machine, or a Dask cluster (an existing scheduler, else a LocalCluster)."""
    if settings.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=settings.concurrency)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise StageError("flows.task_runner: dask needs prefect-dask (pip install prefect-dask)") from None
    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": settings.concurrency, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


@flow(name="lmmem-sweep-points")
def run_points(root: str, points: list[list[str]], names: list[str], targets: list[str], retries: int,
               retry_delay_seconds: float) -> dict[str, str]:
    """The points still to run, at most flows.concurrency at once (the runner is set per run).
    Every point runs to its end whatever the others do; returns the failed ones' messages."""
    runner = point_task.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds,
                                     retry_condition_fn=retry_unless_refused)
    futures = {name: runner.submit(root, overrides, name, targets)
               for overrides, name in zip(points, names, strict=True)}
    failed = {}
    for name, future in futures.items():
        future.wait()
        if not future.state.is_completed():
            failed[name] = future.state.message or future.state.name
    return failed


def flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params as dotted keys (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def overrides_from(base: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """What an experiment changed against params.yaml, as overrides (flows aside)."""
    before, after = flat(stages_part(base)), flat(stages_part(params))
    return [f"{k}={json.dumps(after.get(k), ensure_ascii=False)}" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)]


def comparison(root: Path, wanted: dict[str, list[str]], failed: dict[str, str]) -> list[dict[str, Any]]:
    """One row per point: this sweep's points first (a failed one with its error), then every
    other sweep point of this commit, each with its overrides and the figures of `columns`."""
    records = experiment_records(root)
    existing = {e["name"]: e for e in records}
    rows = []
    base = yaml_load((root / "params.yaml").read_text(encoding="utf-8"))
    shown_columns = columns(base)

    def row(point: str, exp: dict[str, Any] | None, said: str) -> dict[str, Any]:
        found: dict[str, Any] = {"point": point or "(workspace params)", "experiment": exp["name"] if exp
                                 else said}
        for title, file, key in shown_columns:
            value = exp.get("metrics", {}).get(file, {}).get(key) if exp else None
            found[title] = round(value, 4) if isinstance(value, float) and math.isfinite(value) else value
        return found

    shown = set()
    for name, overrides in wanted.items():
        exp = None if name in failed else (
            existing.get(name) or find_experiment(records, expected_params(root, overrides)))
        said = f"failed: {failed[name].splitlines()[0][:300]}" if name in failed else "missing"
        rows.append(row(" ".join(overrides), exp, said))
        shown |= {name, exp["name"] if exp else name}
    for exp in records:
        if exp["name"].startswith("sweep-") and exp["name"] not in shown:
            rows.append(row(" ".join(overrides_from(base, exp["params"])), exp, "missing"))
    return rows


def point_seconds(root: Path, targets: list[str]) -> float:
    """A point's time at most: the workspace run's seconds (data/metrics) of every stage the
    targets need (a cached one is restored, not rerun: an upper bound)."""
    from flows.common import stage_plan

    total = 0.0
    for stage in stage_plan(root, targets or None).order:
        path = root / "data" / "metrics" / (f"{stage.replace('@', '/')}.json")
        if path.is_file():
            with contextlib.suppress(ValueError, OSError, AttributeError):
                total += float(json.loads(path.read_text(encoding="utf-8")).get("seconds", 0.0))
    return total


@flow(name="lmmem-sweep")
def sweep(points: list[list[str]] | None = None, grid: dict[str, list[Any]] | None = None,
          sweep_file: str = "",
          targets: list[str] | None = None, root: str = str(ROOT)) -> list[dict[str, Any]]:
    """Run each point (overrides) as a DVC experiment and compare them. Points come from
    `points`, from every combination of `grid`, and from a sweep file, in that order."""
    log = get_run_logger()
    here = Path(root)
    every = [list(p) for p in points or []] + (grid_points(grid) if grid else [])
    if sweep_file:
        every += read_sweep_file(Path(sweep_file) if Path(sweep_file).is_absolute() else here / sweep_file)
    if not every:
        raise StageError("sweep: no points (give points, grid or sweep_file)")
    for overrides in every:
        check_overrides(overrides)
    settings = flow_params(here)
    existing = experiment_records(here)
    wanted = {point_name(expected_params(here, o)): o for o in every}
    todo = {}
    for name, overrides in wanted.items():
        found = find_experiment(existing, expected_params(here, overrides))
        if found is not None:
            log.info("point %s: experiment %s already has these params: not run again", name, found["name"])
        else:
            todo[name] = overrides
    log.info("%d points, %d to run, %d already done; concurrency %d on %s", len(wanted), len(todo),
             len(wanted) - len(todo), settings.concurrency, settings.task_runner)
    hours = point_seconds(here, list(targets or [])) * math.ceil(len(todo) / settings.concurrency) / 3600
    if hours > settings.max_sweep_hours:
        raise StageError(f"sweep: {len(todo)} points would take up to {hours:,.1f} hours here (each up to "
                         "the seconds of the stages it can rerun), more than flows.max_sweep_hours "
                         f"({settings.max_sweep_hours:g}): "
                         f"fewer points, --targets, or a larger max_sweep_hours")
    failed: dict[str, str] = {}
    if todo:
        failed = run_points.with_options(task_runner=task_runner(settings))(
            root, list(todo.values()), list(todo), list(targets or []), settings.retries,
            settings.retry_delay_seconds)
    rows = comparison(here, wanted, failed)
    create_table_artifact(key="sweep-comparison", table=rows, description="each sweep point's DVC experiment")
    create_markdown_artifact(key="sweep-comparison-md", markdown="# Memory sweep\n\n" + markdown_table(rows))
    out = here / "data" / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "comparison.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = sweep_report(here, log)
    if report is not None:
        create_markdown_artifact(key="sweep-report", markdown=report.read_text(encoding="utf-8"),
                                 description="the report with every experiment of this commit")
    if failed:  # after the comparison of the others: the sweep fails, naming the points
        raise DvcFailed(f"{len(failed)} of {len(wanted)} sweep points failed (the comparison has the rest): "
                        + " | ".join(f"{' '.join(wanted[n])}: {m.splitlines()[0][:300]}"
                                     for n, m in failed.items()))
    return rows


def sweep_report(root: Path, log: Any) -> Path | None:
    """The report regenerated with the new experiments, into data/sweep/report (outside DVC's
    outputs: the workspace stays as it was); None when the pipeline has no report yet."""
    if not (root / "data" / "metrics" / "evaluate.json").is_file():
        log.info("no report: the workspace pipeline has not been run (dvc repro) yet")
        return None
    command = [sys.executable, "-m", "stages.report", "--out", "data/sweep/report", "--metrics",
               "data/sweep/report-metrics.json", "--log-level", "WARNING"]
    result = subprocess.run(command, cwd=root, env=dvc_env(), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log.warning("report failed: %s", (result.stderr.strip().splitlines() or ["?"])[-1])
        return None
    log.info("report with the sweep's experiments: data/sweep/report/report.html")
    return root / "data" / "sweep" / "report" / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", nargs="*", default=[], help="key=v1,v2,... (every combination)")
    parser.add_argument("--point", nargs="*", action="append", default=[], help="one point: key=value ...")
    parser.add_argument("--file", default="",
                        help="a sweep file: {grid: {key: [values]}} and/or {points: [...]}")
    parser.add_argument("--targets", nargs="*", default=None,
                        help="stages each experiment runs (default all)")
    parser.add_argument("--root", default=str(ROOT))
    args = parser.parse_args(argv)
    setup_logging()
    announce_server()
    grid: dict[str, list[Any]] = {}
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            print(f"error: --grid {item!r} is not key=v1,v2,...")
            return 1
        grid[key] = [parse_value(v) for v in values.split(",")]
    try:
        rows = sweep(args.point or None, grid or None, args.file, args.targets, args.root)
    except (StageError, DvcFailed) as exc:
        print(f"error: {exc}")
        return 1
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
