"""End to end: `dvc repro` of the whole pipeline on the tiny profile in a temporary git repo,
a no-op repro, push / fresh clone / pull / no-op repro through the default remote, a param
change that reruns only what depends on it, and a DVC experiment."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, WIRING_ADAPT, WIRING_CONFIGS, WIRING_RUNS, sh, tiny_repo

pytestmark = pytest.mark.e2e
COMPARED = [f"compare@{name}" for name in WIRING_CONFIGS]  # one stage per configuration (foreach)
TUNED = [f"finetune@{name}" for name in WIRING_RUNS]  # one stage per fine-tuning run (foreach)
ADAPTED = [f"adapt@{name}" for name in WIRING_ADAPT]  # one stage per domain-adaptation run (foreach)
STAGES = ["ingest", "clean", "tokenize", "embed", "warmstart", "train", *COMPARED, *TUNED, "domain", *ADAPTED,
          "compress", "evaluate", "plan", "report"]
MODULES = ["ingest", "clean", "tokenize", "embed", "warmstart", "train", "compare", "finetune", "domain",
           "adapt",
           "compress", "evaluate", "plan", "report"]
FOREACH = ("compare", "finetune", "adapt")
PACKAGES = ("stages/train", "stages/finetune", "stages/plan", "stages/report", "stages/compress",
            "stages/ingest",
            "stages/evaluate")  # a dependency as a whole folder


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w@-]+)'", output)


def metrics_of(repo: Path, stage: str) -> dict:
    """data/metrics/<stage>.json; compare@<name>'s is data/metrics/compare/<name>.json (finetune's alike)."""
    return json.loads((repo / "data" / "metrics" / f"{stage.replace('@', '/')}.json").read_text())


def ran_all(output: str) -> bool:
    """Every stage ran, each after the stages it depends on."""
    order = ran(output)
    return sorted(order) == sorted(STAGES) and order[:3] == ["ingest", "clean", "tokenize"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a folder of its own: the default remote is a folder beside the repository, and another
    # module's pipeline pushes the same bytes (the outputs are portable)
    return tiny_repo(tmp_path_factory.mktemp("e2e") / "repo")


def test_repro_runs_every_stage_then_nothing(repo: Path) -> None:
    """Over a minute, and must be: the whole tiny pipeline under a real `dvc repro`, the run
    the other tests of this module read and change."""
    first = sh("dvc", "repro", cwd=repo)
    assert ran_all(first)
    for stage in STAGES:
        metrics = metrics_of(repo, stage)
        assert metrics["seconds"] > 0 and metrics["peak_rss_mib"] > 0
    assert (repo / "data" / "embed" / "vectors.bin").is_file()
    # the report's fine-tuning sections: a row per run, with the run's own figures
    report = (repo / "data" / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Fine-tuning" in report and "## Adapting to a new domain" in report
    for name in WIRING_ADAPT:
        adapted = metrics_of(repo, f"adapt@{name}")
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |") and "→" in line)
        assert f"{adapted['base_domain_ppl']:,.1f} → {adapted['domain_ppl']:,.1f}" in row
        assert f"{adapted['base_original_ppl']:,.1f} → {adapted['original_ppl']:,.1f}" in row
    second = sh("dvc", "repro", cwd=repo)
    assert ran(second) == [] and "Data and pipelines are up to date" in second


def test_push_then_a_fresh_clone_pulls_and_reruns_nothing(repo: Path) -> None:
    """The artifacts beyond this clone: `dvc push` to the committed default remote (a folder
    beside the repository), then a fresh `git clone` next to it pulls and has nothing to run."""
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "pipeline run", cwd=repo)
    assert "files pushed" in sh("dvc", "push", cwd=repo)
    remote = repo.parent / "lmmem-dvc-remote"
    assert any(f.is_file() for f in remote.rglob("*"))

    clone = repo.parent / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=repo.parent)
    assert not (clone / "data" / "model").exists()  # git holds the pipeline, DVC the data
    sh("dvc", "pull", cwd=clone)
    assert (clone / "data" / "model" / "model.safetensors").read_bytes() == \
        (repo / "data" / "model" / "model.safetensors").read_bytes()
    # bytecode this checkout's imports leave (it holds the source's mtime) is not code a stage depends on
    cache = clone / "stages" / "train" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "loop.cpython-311.pyc").write_bytes(b"\xa7\r\r\n" + bytes(12))
    again = sh("dvc", "repro", cwd=clone)
    assert ran(again) == [] and "Data and pipelines are up to date" in again
    assert "up to date" in sh("dvc", "status", cwd=clone)
    # and the clone's own push finds everything there already
    assert "Everything is up to date" in sh("dvc", "push", cwd=clone)


def test_tiny_metrics_match_the_stored_figures(repo: Path) -> None:
    """Counts from the tiny profile (5 % sample of zh-reviews) as measured when it was set up;
    counts are exact on every machine, the gold score within a small tolerance."""
    m = {s: metrics_of(repo, s) for s in STAGES}
    assert (m["ingest"]["docs"], m["ingest"]["skipped_sampled_out"]) == (1741, 33382)
    assert (m["clean"]["docs_out"], m["clean"]["dropped_duplicate"]) == (857, 884)
    assert m["tokenize"]["gold_f1"] == pytest.approx(0.802, abs=0.005)
    assert m["embed"]["deterministic"] is True


def dvc_changed(repo: Path) -> list[str]:
    """The stages `dvc status` says have changed, in dvc.yaml's order."""
    status = json.loads(sh("dvc", "status", "--json", cwd=repo))
    return [stage for stage in STAGES if stage in status]


def restore(repo: Path) -> None:
    """Back to the committed run: git's files (params, dvc.lock, metrics) and DVC's outputs."""
    sh("git", "checkout", "--", ".", cwd=repo)
    sh("dvc", "checkout", "-q", cwd=repo)


def edited(repo: Path, relative: str) -> Path:
    """Append a comment to a source file of the repository (undone by `git checkout`)."""
    path = repo / relative
    path.write_text(path.read_text(encoding="utf-8") + "\n# an edit\n", encoding="utf-8")
    return path


def test_a_word2vec_param_does_not_rerun_train_unless_train_starts_from_it(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["train"]["init_from_word2vec"] is False
    params["embed"]["window"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    try:
        # warmstart reruns and writes the same bytes (no vectors asked for), so DVC leaves train
        # alone; evaluate reads the vectors for its Word2Vec baseline, and the report params.yaml
        assert ran(sh("dvc", "repro", "train", cwd=repo)) == ["embed", "warmstart"]
        assert dvc_changed(repo) == ["evaluate", "report"]
        params["train"]["init_from_word2vec"] = True  # now train starts from the vectors: it reruns
        (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
        assert ran(sh("dvc", "repro", "warmstart", cwd=repo)) == ["warmstart"]
        # every configuration starts from it, and every fine-tuning and adaptation run reads the train section
        assert dvc_changed(repo) == ["train", *COMPARED, *TUNED, *ADAPTED, "evaluate", "report"]
    finally:
        restore(repo)
    assert "up to date" in sh("dvc", "status", cwd=repo)


@pytest.mark.parametrize("module, changed", [
    ("stages/common/weights/quant.py",
     ["compress", "evaluate"]),  # the report: through their outputs, once they run
    ("stages/common/weights/storage.py", ["compress", "evaluate"]),
    ("stages/report/__init__.py", ["report"]),
    ("stages/report/charts.py", ["report"]),
])
def test_editing_a_module_changes_only_the_stages_that_run_it(repo: Path, module: str,
                                                              changed: list[str]) -> None:
    """Quantization or sparse-storage code: compress and evaluate, not train; the report or its
    charts: the report alone."""
    sh("dvc", "repro", cwd=repo)
    edited(repo, module)
    try:
        assert dvc_changed(repo) == changed
    finally:
        sh("git", "checkout", module, cwd=repo)


def test_editing_the_training_loop_reruns_train_and_what_its_bytes_change(repo: Path) -> None:
    sh("dvc", "repro", cwd=repo)
    edited(repo, "stages/train/loop.py")
    try:
        # the comparison, fine-tuning and adaptation run the train package, the plan dry-runs with it; the
        # report lists train's params defaults
        assert dvc_changed(repo) == ["train", *COMPARED, *TUNED, *ADAPTED, "plan", "report"]
        # the same model bytes come out: compress and evaluate do not rerun
        assert sorted(ran(sh("dvc", "repro",
                             cwd=repo))) == sorted(["train", *COMPARED, *TUNED, *ADAPTED, "plan",
                                                    "report"])
    finally:
        restore(repo)


def test_changing_a_compress_param_reruns_compress_and_what_reads_it(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["compress"]["variants"]["prune50"]["sparsity"] = 0.7
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    try:
        assert dvc_changed(repo) == ["compress", "report"]  # the report reads params.yaml whole
        assert ran(sh("dvc", "repro", "compress", cwd=repo)) == ["compress"]
        metrics = json.loads((repo / "data" / "metrics" / "compress.json").read_text())
        assert metrics["prune50_sparsity"] == pytest.approx(0.7, abs=1e-5)
        assert dvc_changed(repo) == ["evaluate", "report"]  # nothing upstream, nothing beside
    finally:
        restore(repo)


def test_a_file_added_to_data_corpus_reruns_its_readers_only(repo: Path) -> None:
    """ingest, tokenize and domain depend on data/corpus; their outputs come out the same (the
    sources are still the built-in corpora), so DVC skips clean, embed and the adaptation runs;
    their metrics (timings) feed the report."""
    extra = repo / "data" / "corpus" / "mine.txt"
    extra.write_text("a corpus of my own\n", encoding="utf-8")
    try:
        assert sorted(ran(sh("dvc", "repro", cwd=repo))) == ["domain", "ingest", "report", "tokenize"]
    finally:
        extra.unlink()
    # back to the committed inputs: DVC's run cache restores those outputs without running; the
    # report, not cached (it shows each run's machine and times), has no run cache in DVC (it
    # keeps none for a stage with an uncached output) and is rendered again, in seconds
    restored = sh("dvc", "repro", cwd=repo)
    assert ran(restored) == ["report"] and "Stage 'ingest' is cached - skipping run" in restored
    assert "up to date" in sh("dvc", "status", cwd=repo)


def recorded_outputs(repo: Path, stage: str) -> dict[str, bytes]:
    """Every file of every output (folder, metrics, plots) dvc.lock records for `stage`."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))["stages"][stage]
    files: dict[str, bytes] = {}
    for out in lock["outs"]:
        path = repo / out["path"]
        for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            files[f.relative_to(repo).as_posix()] = f.read_bytes()
    assert files, f"dvc.lock records no output files for {stage}"
    return files


def failing_repro(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["dvc", "repro", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900, check=False)


@pytest.mark.parametrize("stage, where, value, named", [
    ("ingest", "ingest.sample", 1.5, "sample"),  # refused by its params check
    ("clean", "clean.min_chars", 10**6, "min_chars"),  # more than max_chars
    # refused inside its run, by the segmenting pool, once the output folder is open
    ("tokenize", "tokenize.user_dict", "data/corpus/no-such-dict.txt", "tokenize.user_dict: no such file"),
    ("embed", "embed.window", -2, "window"),
    ("train", "train.steps", 0, "steps"),
    ("train", "train.batch_size", 10**9, "max_hours"),  # refused before the dry run: millions of hours
    # one configuration of the comparison (a foreach item): it alone changes, and fails
    ("compare@chunked-loss", "compare.configs.chunked-loss", {"loss_chunk_tokens": -5},
     "compare.configs.chunked-loss.loss_chunk_tokens"),
    # one fine-tuning run: LoRA on a layer the model has not, refused once the model is read
    ("finetune@qlora", "finetune.runs.qlora",
     {"tune": "lora", "frozen_weights": "nf4", "lora_targets": ["w_proj"]},
     "lora_targets: w_proj is not a Linear layer of this model"),
    # a domain-adaptation run: a language model has no head of its own to train alone
    ("adapt@qlora", "adapt.runs.qlora", {"tune": "head"},
     "tune head: this task's model has no head of its own"),
    ("domain", "domain.max_docs", -1, "max_docs"),
    # read and segmented, then refused: English news is mostly <unk> to the Chinese vocabulary
    ("domain", "domain.source", "builtin:en-news", "more than domain.max_unk_rate"),
    ("compress", "compress.variants.prune50.sparsity", 1.5, "sparsity"),
    ("evaluate", "evaluate.generate_tokens", 10**9, "generate_tokens"),  # refused against the model's context
    ("evaluate", "evaluate.generation_batches", [0, 8], "evaluate.generation_batches.0"),
    ("plan", "plan.devices", {"Big GPU": 80}, "device 'Big GPU'"),
    ("plan", "plan.context", 4096, "plan: context 4,096 is longer than tiny-llama's 256 positions"),
])
def test_a_stage_that_fails_under_dvc_repro_leaves_its_previous_outputs_and_metrics(
        repo: Path, stage: str, where: str, value: object, named: str) -> None:
    """DVC deletes a stage's outputs before running it; the failed stage puts them back from
    DVC's cache, byte for byte, so the workspace still matches dvc.lock."""
    sh("dvc", "repro", cwd=repo)
    before = recorded_outputs(repo, stage)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    *path, key = where.split(".")
    section = params
    for part in path:
        section = section[part]
    section[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    try:
        # a configuration's own keys: its stage alone (and the report, which reads params.yaml)
        if "@" in stage:
            assert dvc_changed(repo) == [stage, "report"]
        result = failing_repro(repo, stage)
        assert result.returncode != 0
        module = stage.split("@")[0]
        errors = [line for line in result.stderr.splitlines() if line.startswith(f"lmmem {module}: error:")]
        assert len(errors) == 1 and named in errors[0], result.stderr
        assert "Traceback" not in result.stderr
        assert "previous outputs dvc.lock records are back" in result.stderr
        assert recorded_outputs(repo, stage) == before
    finally:
        sh("git", "checkout", "--", "params.yaml", cwd=repo)
    # no `dvc checkout`: the outputs and the metrics files (cache: false) are dvc.lock's again
    assert "up to date" in sh("dvc", "status", cwd=repo)


def test_a_report_refused_under_dvc_repro_leaves_the_previous_report(repo: Path) -> None:
    """The report's outputs persist (dvc.yaml: DVC leaves them in place while it runs, and keeps no
    run cache to restore them from): a refused report leaves the previous one, byte for byte."""
    sh("dvc", "repro", cwd=repo)
    before = recorded_outputs(repo, "report")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["report"]["experiments"] = "maybe"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    try:
        result = failing_repro(repo, "report")
        assert result.returncode != 0 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("lmmem report: error:")]
        assert len(errors) == 1 and "report.experiments" in errors[0], result.stderr
        assert recorded_outputs(repo, "report") == before
    finally:
        sh("git", "checkout", "--", "params.yaml", cwd=repo)
    assert "up to date" in sh("dvc", "status", cwd=repo)


def warm_stage(repo: Path) -> int | None:
    """The pid of the newest process forked by the warm server (stages.common.harness.warmserver)
    working in `repo`: not a stage an earlier run left finishing. (A forked stage's
    /proc/<pid>/environ is the server's: the stage's own variables cannot tell it apart.)"""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            server = Path(f"/proc/{fields[1]}/cmdline").read_bytes().split(b"\0")
            if b"stages.common.harness.warmserver" in server \
                    and os.readlink(stat.parent / "cwd") == str(repo):
                found.append((int(fields[19]), int(stat.parent.name)))  # its start time, its pid
        except (OSError, IndexError, ValueError):
            continue
    return max(found)[1] if found else None


def stage_process(root: int, module: str) -> int | None:
    """The pid of the process below `root` running `python -m <module>`, if any."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            stat = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if module.encode() in args and b"-m" in args:
            pid, parent = int(cmdline.parent.name), int(stat[1])
            while parent > 1:  # below root?
                if parent == root:
                    return pid
                try:
                    parent = int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except OSError:
                    break
    return None


def test_a_stage_killed_under_dvc_repro_gets_its_outputs_back_from_its_watcher(repo: Path) -> None:
    """SIGKILL (as the OOM killer sends) leaves the stage no moment to restore anything: its
    watcher, a separate process, sees it die and puts back what DVC deleted."""
    import signal
    import time

    sh("dvc", "repro", cwd=repo)
    before = recorded_outputs(repo, "train")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["steps"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        dvc = subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        stage = watcher = None
        # the stage is running, its watcher has started (a kill before that, in the first instant
        # of the interpreter, has nobody to see it) and DVC has deleted its outputs. DVC's command,
        # `python -m stages train`, starts the watcher and has the stage forked from the warm server
        while stage is None or watcher is None or (repo / "data" / "model").exists():
            assert dvc.poll() is None and time.monotonic() < deadline, \
                "train and its watcher were not seen running"
            time.sleep(0.2)
            client = stage_process(dvc.pid, "stages")
            watcher = stage_process(client, "stages.common.harness.restore") if client else None
            stage = warm_stage(repo)
        os.kill(stage, signal.SIGKILL)  # the stage's own process, as the OOM killer would choose it
        assert dvc.wait(timeout=120) != 0
        deadline = time.monotonic() + 120  # the watcher finishes a moment after DVC reports the failure
        while recorded_outputs_or_none(repo, "train") != before and time.monotonic() < deadline:
            time.sleep(0.5)
        assert recorded_outputs(repo, "train") == before
    finally:
        sh("git", "checkout", "--", "params.yaml", cwd=repo)
    assert "up to date" in sh("dvc", "status", cwd=repo)


def recorded_outputs_or_none(repo: Path, stage: str) -> dict[str, bytes] | None:
    try:
        return recorded_outputs(repo, stage)
    except (AssertionError, OSError):
        return None


def test_restore_puts_back_what_dvc_deleted_before_a_killed_stage(repo: Path) -> None:
    """A stage killed outright (SIGKILL, the OOM killer) cannot restore its outputs itself:
    `python -m stages.common.harness.restore` does, from DVC's cache, the metrics file included."""
    sh("dvc", "repro", cwd=repo)
    before = recorded_outputs(repo, "train")
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))["stages"]["train"]
    for out in lock["outs"]:  # what DVC deletes before it runs train
        path = repo / out["path"]
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out = sh(sys.executable, "-m", "stages.common.harness.restore", "train", cwd=repo)
    assert "train: restored data/model (" in out and "train: restored data/metrics/train.json (1 file)" in out
    assert recorded_outputs(repo, "train") == before
    assert "up to date" in sh("dvc", "status", cwd=repo)
    unknown = subprocess.run([sys.executable, "-m", "stages.common.harness.restore", "trian"], cwd=repo,
                             capture_output=True, text=True, check=False)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "lmmem restore: error: trian: dvc.lock records no outputs for it"
    # exits 0: checked
    persisted = sh(sys.executable, "-m", "stages.common.harness.restore", "report", cwd=repo)
    assert persisted.strip() == ("report: data/metrics/report.json, data/report persist (DVC leaves them in "
                                 "place): nothing to restore")


def test_experiment_on_english_news_lists_its_metrics(repo: Path) -> None:
    """About a minute, and must be: `dvc exp run` reruns every stage from ingest on another
    corpus (English news), which is what it checks."""
    sh("dvc", "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    # clean when the others restored it
    sh("git", "commit", "-q", "--allow-empty", "-m", "tiny baseline", cwd=repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["runs"] = {}  # news has no labels to learn: no fine-tuning (-S would merge, not empty)
    params["adapt"]["runs"] = {}  # nor a second domain in its language:
    params["domain"]["max_unk_rate"] = 1.0  # the Chinese domain corpus is mostly <unk> to it, and unused
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    out = sh("dvc", "exp", "run", "-n", "news", "-S", "ingest.source=builtin:en-news",
             "-S", "ingest.sample=1.0", "-S", "train.precision=bf16", "-S",
             "train.activation_checkpointing=true",
             "-S", "evaluate.variants=[int8]", cwd=repo)
    # no fine-tuning; the plan reads no data (its own params and code only): restored, not run
    assert sorted(ran(out)) == sorted(stage for stage in STAGES if stage not in [*TUNED, *ADAPTED, "plan"])
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo))
    exps = [e for row in shown for e in (row.get("experiments") or [])]
    news = [e for e in exps if e.get("name") == "news"]
    assert news, shown
    data = news[0]["revs"][0]["data"]
    ingest = data["metrics"]["data/metrics/ingest.json"]["data"]
    assert ingest["docs"] == 300 and ingest["docs_lang_en"] == 300
    assert data["params"]["params.yaml"]["data"]["ingest"]["source"] == "builtin:en-news"
    assert data["metrics"]["data/metrics/embed.json"]["data"]["analogy_coverage"] > 0
    train = data["metrics"]["data/metrics/train.json"]["data"]  # every memory column in the row
    for category in ("parameters", "gradients", "optimizer", "activations", "temporaries", "total"):
        assert train[f"mem_{category}_peak_mib"] >= 0 and f"est_{category}_peak_mib" in train
    assert train["mem_total_peak_mib"] > 0 and train["peak_rss_mib"] > 0
    assert train["machine_threads"] == 2 and train["machine_cpu"] and "MKL" in train["machine_blas"]
    assert train["machine_portable"] in (True, "no AVX2")  # base.portable, on by default
    assert data["params"]["params.yaml"]["data"]["train"]["precision"] == "bf16"
    evaluated = data["metrics"]["data/metrics/evaluate.json"]["data"]
    assert evaluated["model_status"] == "ok" and "model_cls_accuracy" not in evaluated  # news has no labels
    # the report compares the experiment with the workspace run, read from git's experiment refs
    sh("git", "checkout", "--", ".", cwd=repo)  # the workspace back to the baseline run
    sh("dvc", "checkout", "-q", cwd=repo)
    out = repo / "report-check"
    sh(sys.executable, "-m", "stages.report", "--out", str(out), "--metrics", str(repo / "report-check.json"),
       cwd=repo)
    markdown = (out / "report.md").read_text(encoding="utf-8")
    row = next(line for line in markdown.splitlines() if line.startswith("| news |"))
    assert 'train.precision=\"bf16\"' in row or 'train.precision="bf16"' in row
    assert f"| {train['mem_total_peak_mib']:,.1f} |" in row
    assert json.loads((repo / "report-check.json").read_text())["experiments"] == 1
    assert "| torch threads | 2 |" in markdown and "| ATen CPU capability in use |" in markdown


def test_the_first_experiment_of_getting_started_runs_as_written(repo: Path) -> None:
    """About a minute, and must be: the getting-started page's first experiment, its commands
    read from the page and run as written, retrains the model in bf16 beside the workspace run,
    shows both rows and puts the experiment in the report; the dry run's estimate answers at once."""
    from tests.test_docs import shell_blocks

    commands = [c for c in shell_blocks(ROOT / "docs" / "getting-started.md")
                if c.startswith(("dvc exp run -n bf16", "dvc exp show", "dvc repro -f --single-item report"))]
    assert len(commands) == 3, commands
    sh("dvc", "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "--allow-empty", "-m", "before the first experiment", cwd=repo)
    said = [sh("bash", "-c", command, cwd=repo) for command in commands]
    assert "train" in ran(said[0]) and "ingest" not in ran(said[0])  # only what reads the model
    # the experiment's row: "└── <rev> [bf16]"
    shown = [line for line in said[1].splitlines() if "[bf16]" in line]
    assert shown and shown[0].rstrip(" |").endswith("| bf16"), said[1]  # its precision column
    header = said[1].splitlines()[0]
    for column in ("mem_total_peak_mib", "mem_activations_peak_mib", "val_ppl", "tokens_per_sec"):
        assert f"data/metrics/train.json:{column}" in header, header
    column = [h.strip() for h in header.split("|")].index("data/metrics/train.json:mem_total_peak_mib")
    peak = metrics_of(repo, "train")["mem_total_peak_mib"]  # the experiment's, applied to the workspace
    assert float(shown[0].split("|")[column]) == pytest.approx(peak, rel=1e-3)
    markdown = (repo / "data" / "report" / "report.md").read_text(encoding="utf-8")
    row = next(line for line in markdown.splitlines() if line.startswith("| bf16 |"))
    assert f"| {peak:,.1f} |" in row, (row, peak)
    done = subprocess.run([sys.executable, "-m", "stages.train", "--estimate"], cwd=repo, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    estimate = json.loads(done.stdout)
    assert estimate["est_total_peak_mib"] > 0
    sh("git", "checkout", "--", ".", cwd=repo)  # the workspace back to the baseline run
    sh("dvc", "checkout", "-q", cwd=repo)


def test_dvc_yaml_declares_every_common_module_each_stage_imports() -> None:
    from stages.common.harness.code_files import closure

    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in MODULES:
        own = f"stages/{stage}" if (ROOT / "stages" / stage).is_dir() else f"stages/{stage}.py"
        # the training runs use the train package whole (its registry finds the techniques at run time)
        runs = [f"stages.{stage}", *(["stages.train"] if stage in FOREACH else [])]
        files = {f.relative_to(ROOT).as_posix() for f in closure(*runs)}
        needed = {f for f in files if not f.startswith(own + "/") and not f.startswith(PACKAGES)} | {own}
        needed |= {package for package in PACKAGES if any(f.startswith(package + "/") for f in files)}
        spec = pipeline[stage]["do"] if stage in FOREACH else pipeline[stage]  # one stage per item
        deps = set(spec["deps"])
        assert needed <= deps, f"{stage}: {sorted(needed - deps)} missing from dvc.yaml deps"
        extra = {d for d in deps if d.startswith("stages/")} - needed
        if stage != "report":  # the report reads every stage's Params (their defaults) besides
            assert extra == set(), f"{stage}: {sorted(extra)} in dvc.yaml deps but not run by the stage"
        assert "base.seed" in spec["params"]
        assert stage in spec["params"] or stage in ("warmstart", *FOREACH)
        metrics = f"data/metrics/{stage}/${{key}}.json" if stage in FOREACH else f"data/metrics/{stage}.json"
        flags = {"cache": False, "persist": True} if stage == "report" else {"cache": False}  # see dvc.yaml
        assert spec["metrics"] == [{metrics: flags}]
        outs = [o if isinstance(o, str) else next(iter(o)) for o in spec["outs"]]
        assert outs and all(o.startswith("data/") for o in outs)
    # a configuration reruns when its own keys or what every configuration shares change, no other's
    compare = pipeline["compare"]["do"]["params"]
    assert "compare.configs.${key}" in compare
    assert "compare.configs" not in compare and "compare" not in compare
    for section, runs in (("finetune", "runs"), ("adapt", "runs")):
        tuned = pipeline[section]["do"]["params"]
        assert f"{section}.{runs}.${{key}}" in tuned
        assert f"{section}.{runs}" not in tuned and section not in tuned


def test_training_does_not_run_quantization_storage_or_charts() -> None:
    """The narrow graph rests on what the stages import: training code reaches no
    quantization, sparse storage, model-folder loading or chart module, and the checkpoint
    fingerprint covers exactly what training runs."""
    from stages.common.harness.code_files import closure

    train = {f.relative_to(ROOT).as_posix() for f in closure("stages.train")}
    assert "stages/train/loop.py" in train and "stages/common/memory/tensor_meter.py" in train
    for module in ("quant", "storage", "loading", "svg", "classify"):
        assert f"stages/common/{module}.py" not in train
    for stage in ("compress", "evaluate"):
        assert not any(f.startswith("stages/train/") for f in
                       (g.relative_to(ROOT).as_posix() for g in closure(f"stages.{stage}")))
