"""base.allocator: a stage's process executes itself again under the allocator its params ask
for (a preloaded jemalloc or tcmalloc, glibc's tunables), its workers inherit it, a missing
library is one line before any work, and the peak RSS is predicted beside its measurement."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.common.harness import malloc
from stages.common.harness.malloc import LIBDIR, MARK, TUNED, environment, library
from tests.conftest import ROOT, one_error_line, read_metrics, run_cli, run_stage, sh, tiny_repo

NEEDS = pytest.mark.skipif(library("jemalloc") is None or library("tcmalloc") is None,
                           reason="libjemalloc2 and libtcmalloc-minimal4 are installed by .ci/run")


def test_the_environment_sets_one_allocator_and_takes_back_a_parents() -> None:
    tuned = environment("glibc-tuned", {"PATH": "/bin"})
    assert tuned == {"PATH": "/bin", MARK: "glibc-tuned", "MALLOC_ARENA_MAX": "2",
                     "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": "131072"}
    # a parent's tunables go; a user's own preload stays, after the allocator's library
    je = environment("jemalloc", {**tuned, "LD_PRELOAD": "/opt/mine.so"})
    assert not set(TUNED) & set(je) and je[MARK] == "jemalloc"
    assert je["LD_PRELOAD"].split()[1:] == ["/opt/mine.so"] and "jemalloc" in je["LD_PRELOAD"].split()[0]
    back = environment("glibc", je)
    assert back == {"PATH": "/bin", "LD_PRELOAD": "/opt/mine.so"}


@pytest.mark.parametrize("argv, stage", [
    (["python", "-m", "stages.clean", "--params", "p.yaml"], True),
    (["python", "-X", "importtime", "-m", "stages", "train"], True),
    (["python", "-mstages.train"], True),
    (["python", "-m", "pytest", "tests"], False),
    (["python", "-m", "stages.common.harness.warm", "--serve", "x.sock"], False),  # a helper, not a stage
    (["python", "-c", "import stages"], False),
    (["python", "script.py", "-m", "stages.clean"], False),
])
def test_only_a_stage_command_executes_itself_again(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                    stage: bool) -> None:
    monkeypatch.setattr(sys, "orig_argv", argv)
    assert malloc.stage_command() is stage


def ingest_args(work: Path, params: Path) -> list[str]:
    return ["--params", str(params), "--out", str(work / "raw"), "--metrics", str(work / "ingest.json")]


def with_allocator(params_file, name: str) -> Path:  # the conftest fixture
    return params_file(base={"allocator": name}, ingest={"max_docs": 200})


@NEEDS
@pytest.mark.parametrize("name", ["glibc-tuned", "jemalloc", "tcmalloc"])
def test_a_stage_runs_under_the_allocator_its_params_name(tmp_path: Path, params_file, name: str) -> None:
    """Started under glibc as it comes, the stage executes itself again under `name`: its
    metrics say so, and tokenize's forked workers run under it too (they inherit it)."""
    params = with_allocator(params_file, name)
    clean = {k: v for k, v in os.environ.items() if k != MARK and not k.startswith("MALLOC_")
             and k != "LD_PRELOAD"}
    show = ("import os, sys; sys.argv = ['-m']; import stages; "
            "maps = open('/proc/self/maps').read(); "
            "print(os.environ.get('LMMEM_ALLOCATOR'), os.environ.get('MALLOC_ARENA_MAX'), "
            "'libjemalloc' in maps, 'libtcmalloc' in maps)")
    done = subprocess.run([sys.executable, "-m", "stages.ingest", *ingest_args(tmp_path, params)], cwd=ROOT,
                          env={**clean, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    metrics = read_metrics(tmp_path / "ingest.json")
    assert metrics["allocator"] == name
    if name == "glibc-tuned":
        assert "MALLOC_ARENA_MAX=2" in metrics["machine_allocator"]
    else:
        assert f"lib{malloc.LIBRARIES[name][0]}" in metrics["machine_allocator"]
    # what the stage starts inherits it: a child of a process under `name`
    child = subprocess.run([sys.executable, "-c", show], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**environment(name, clean), "PYTHONPATH": str(ROOT)}).stdout.split()
    assert child == [name, "2" if name == "glibc-tuned" else "None", str(name == "jemalloc"),
                     str(name == "tcmalloc")]


@NEEDS
def test_the_warm_interpreter_forks_the_stage_from_a_server_under_its_allocator(tmp_path: Path,
                                                                                params_file) -> None:
    """`python -m stages NAME`: the client executes itself again under the allocator, and the
    server it starts (keyed by the allocator's variables) forks the stage under it too."""
    params = with_allocator(params_file, "tcmalloc")
    done = subprocess.run([sys.executable, "-m", "stages", "ingest", *ingest_args(tmp_path, params)],
                          cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "LMMEM_WARM_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "libtcmalloc_minimal" in read_metrics(tmp_path / "ingest.json")["machine_allocator"]
    # the stage ran in a forked process, not the client
    assert any(tmp_path.rglob("warm-*.sock")), done.stderr


def test_a_missing_library_is_one_line_before_any_work(tmp_path: Path, params_file) -> None:
    params = with_allocator(params_file, "jemalloc")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "previous.txt").write_text("kept")
    empty = tmp_path / "no-libraries"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "stages.ingest", *ingest_args(tmp_path, params)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), LIBDIR: str(empty)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    line = one_error_line(result.stderr, "ingest")
    assert line == (f"lmmem ingest: error: base.allocator jemalloc: libjemalloc.so.2 is not in "
                    f"{LIBDIR}={empty}")
    assert (tmp_path / "raw" / "previous.txt").read_text() == "kept" and not (
        tmp_path / "ingest.json").exists()


def test_a_stage_called_in_this_process_under_another_allocator_is_refused(tmp_path: Path, params_file,
                                                                           capsys: pytest.CaptureFixture[
                                                                               str]) -> None:
    """A test or a flow calling main() cannot change the allocator of a process already running."""
    params = with_allocator(params_file, "glibc-tuned")
    assert run_stage("ingest", ingest_args(tmp_path, params)) == 2
    line = one_error_line(capsys.readouterr().err, "ingest")
    assert line.startswith(
        "lmmem ingest: error: base.allocator glibc-tuned: this process started under glibc")
    assert not (tmp_path / "raw").exists()


def test_under_dvc_repro_the_allocator_reruns_the_stages_and_a_missing_one_leaves_the_outputs(
        tmp_path: Path) -> None:
    repo = tiny_repo(tmp_path / "repo")
    sh("dvc", "repro", "ingest", cwd=repo)
    before = (repo / "data" / "metrics" / "ingest.json").read_bytes()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["base"]["allocator"] = "glibc-tuned"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    assert "base.allocator" in sh("dvc", "status", "ingest", cwd=repo)
    sh("dvc", "repro", "ingest", cwd=repo)
    assert read_metrics(repo / "data" / "metrics" / "ingest.json")["allocator"] == "glibc-tuned"
    tuned = (repo / "data" / "metrics" / "ingest.json").read_bytes()
    params["base"]["allocator"] = "tcmalloc"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    empty = tmp_path / "no-libraries"
    empty.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", LIBDIR: str(empty),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["dvc", "repro", "ingest"], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode != 0
    line = one_error_line(result.stderr, "ingest")
    assert line.endswith(f"base.allocator tcmalloc: libtcmalloc_minimal.so.4 is not in {LIBDIR}={empty}")
    assert "previous outputs dvc.lock records are back" in result.stderr
    assert (repo / "data" / "metrics" / "ingest.json").read_bytes() == tuned != before
    assert any((repo / "data" / "raw").iterdir())


def test_train_predicts_its_peak_rss_beside_the_measurement(tmp_path: Path, tokens: Path,
                                                            params_file) -> None:
    """The prediction is written beside the peak, from the start RSS and the dry run's tensors."""
    from tests.conftest import train_args

    params_file(train={"steps": 3, "warmup_steps": 1, "eval_every": 3, "checkpoint_every": 3})
    result = run_cli("train", train_args(tmp_path, tokens))
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path / "train.json")
    assert metrics["rss_tensor_mib"] == metrics["est_total_peak_mib"] > 0
    assert metrics["rss_weights_mib"] == metrics["est_parameters_peak_mib"] > 0
    assert 0 < metrics["rss_start_mib"] < metrics["peak_rss_mib"]
    assert metrics["rss_prediction_error"] == pytest.approx(
        metrics["rss_predicted_mib"] / metrics["peak_rss_mib"] - 1, abs=1e-3)


def test_the_prediction_adds_the_fitted_overhead_and_says_nothing_without_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.common.memory import rss_prediction

    monkeypatch.setattr(rss_prediction, "OVERHEAD", {"train": {"glibc": (100.0, 1.5, 4.0)}})
    # 200 + 100 + 1.5 × 300 + 4 × 10 = 790 MiB against 800 measured
    assert rss_prediction.figures("train", "glibc", 200.0, 300.0, 10.0, 800.0, prefix="m_") == {
        "m_rss_start_mib": 200.0, "m_rss_tensor_mib": 300.0, "m_rss_weights_mib": 10.0,
        "m_rss_predicted_mib": 790.0,
        "m_rss_prediction_error": pytest.approx(-0.0125)}
    assert rss_prediction.figures("train", "jemalloc", 200.0, 300.0, 10.0, 800.0) == {
        "rss_start_mib": 200.0, "rss_tensor_mib": 300.0, "rss_weights_mib": 10.0}  # not fitted: no guess


@NEEDS
@pytest.mark.parametrize("name, preload, expected", [
    ("glibc", "tcmalloc", "glibc, but malloc is served by libtcmalloc_minimal.so.4 (LD_PRELOAD="),
    ("jemalloc", None, "jemalloc ("),
])
def test_machine_allocator_names_what_actually_serves_malloc(tmp_path: Path, params_file, name: str,
                                                             preload: str | None, expected: str) -> None:
    """A user's own LD_PRELOAD under base.allocator glibc (which leaves it alone) is found by
    asking the dynamic linker which object's malloc the process calls, and said."""
    params = with_allocator(params_file, name)
    clean = {k: v for k, v in os.environ.items() if k != MARK and not k.startswith("MALLOC_")
             and k != "LD_PRELOAD"}
    if preload:
        clean["LD_PRELOAD"] = malloc.library(preload) or ""
    done = subprocess.run([sys.executable, "-m", "stages.ingest", *ingest_args(tmp_path, params)], cwd=ROOT,
                          env={**clean, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    described = read_metrics(tmp_path / "ingest.json")["machine_allocator"]
    assert described.startswith(expected), described
    assert ("but malloc is served by" in described) is bool(preload)
