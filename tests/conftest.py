"""Shared helpers: tiny params files in tmp_path and in-process stage runs."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "params.tiny.yaml"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def tiny_params() -> dict[str, Any]:
    return yaml.safe_load(TINY.read_text(encoding="utf-8"))


def deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def params_file(tmp_path: Path) -> Callable[..., Path]:
    """Write the tiny profile with nested overrides: params_file(embed={"window": 3})."""

    def make(**overrides: Any) -> Path:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(deep_update(tiny_params(), overrides), allow_unicode=True),
                        encoding="utf-8")
        return path

    return make


def run_stage(name: str, args: list[str]) -> int:
    """Run a stage's main() in this process; returns its exit code."""
    module = __import__(f"stages.{name}", fromlist=["main"])
    return module.main(args)


def as_stage(module: str) -> str:
    """Python code that makes a `python -c` process one started as `python -m <module>`: the
    stages package then pins, restarts under its allocator and watches as a stage does."""
    return f"import sys; sys.orig_argv = [sys.executable, '-m', {module!r}]; "


def run_cli(name: str, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m stages.<name>` in a fresh process, as DVC does."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, env=env, timeout=600, check=False)


def train_args(work: Path, tokens: Path) -> list[str]:
    """The train stage's arguments for a run in `work` (its params.yaml there, every output
    under it) on the `tokens` fixture's data."""
    return ["--params", str(work / "params.yaml"), "--tokens", str(tokens), "--embed", str(
        tokens.parent / "embed"),
        "--out", str(work / "model"), "--plots", str(work / "plots"), "--checkpoints", str(work / "ckpt"),
            "--metrics", str(work / "train.json")]


def read_metrics(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def kill_at_checkpoint(args: list[str], state: Path, step: int, timeout: float) -> int:
    """Start `python -m stages.train` (args), SIGKILL it and everything it started (its own
    process group: a launcher and its ranks go down together, as with a lost machine) once
    its checkpoint state.json has reached `step`; returns the step of the checkpoint left."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= step:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return json.loads(state.read_text())["step"]


def one_error_line(stderr: str, stage: str) -> str:
    """The stage's error as printed: exactly one line, no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith(f"lmmem {stage}: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="session")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile's tokens and embeddings (data/tokens, data/embed), made once per run."""
    work = tmp_path_factory.mktemp("tokens")
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(deep_update(tiny_params(), {"tokenize": {"gold": ""}}),
                                     allow_unicode=True))
    d = work / "data"
    for stage, args in (("ingest", ["--out", d / "raw"]),
                        ("clean", ["--raw", d / "raw", "--out", d / "clean"]),
                        ("tokenize", ["--clean", d / "clean", "--out", d / "tokens"]),
                        ("embed", ["--tokens", d / "tokens", "--out", d / "embed"])):
        assert run_stage(stage, ["--params", str(params), "--metrics", str(d / f"{stage}.json"),
                                 *map(str, args)]) == 0
    return d / "tokens"


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "lmmem test", "GIT_AUTHOR_EMAIL": "test@lmmem.invalid",
                "GIT_COMMITTER_NAME": "lmmem test", "GIT_COMMITTER_EMAIL": "test@lmmem.invalid"}


@functools.cache
def docs_generate() -> ModuleType:
    """docs/generate.py (the documentation's generated pages) as a module: the section models
    and the pages it writes."""
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sh(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command (git, dvc, ...) with this interpreter's bin first on PATH; fail the test
    with its output when it fails; return stdout + stderr."""
    env = {**os.environ, **GIT_IDENTITY, **(env or {}), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


# What the tests of the DVC and Prefect wiring compress and evaluate: one variant of each kind
# of file (a cast, int8, sparse storage) instead of the tiny profile's thirteen. Every variant
# is made and measured by test_compress and test_evaluate.
WIRING_VARIANTS = ("fp16", "int8", "prune50")
# ... and the configurations they compare: the baseline and one technique (test_compare runs others).
WIRING_CONFIGS = ("baseline", "chunked-loss")
# ... and the fine-tuning runs: the quickest and the one that makes the most (test_finetune runs all).
WIRING_RUNS = ("head", "qlora")
# ... and the domain-adaptation run: the one that quantizes the tied embedding (test_adapt runs three).
WIRING_ADAPT = ("qlora",)


def tiny_repo(repo: Path, env: dict[str, str] | None = None) -> Path:
    """A git + DVC repository in `repo` with the stages, the built-in corpus, dvc.yaml, the
    tiny profile as params.yaml (its variants: WIRING_VARIANTS only, its configurations
    WIRING_CONFIGS, its fine-tuning runs WIRING_RUNS, its adaptation runs WIRING_ADAPT) and lmmem's
    DVC config (its default remote: a folder beside `repo`), all committed."""
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "corpus", repo / "data" / "corpus")
    for name in ("dvc.yaml", "requirements.lock", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    params = tiny_params()
    params["compress"]["variants"] = {name: params["compress"]["variants"][name] for name in WIRING_VARIANTS}
    params["compare"]["configs"] = {name: params["compare"]["configs"][name] for name in WIRING_CONFIGS}
    params["finetune"]["runs"] = {name: params["finetune"]["runs"][name] for name in WIRING_RUNS}
    params["finetune"]["baseline"] = WIRING_RUNS[0]
    params["adapt"]["runs"] = {name: params["adapt"]["runs"][name] for name in WIRING_ADAPT}
    params["adapt"]["baseline"] = WIRING_ADAPT[0]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False),
                                      encoding="utf-8")
    sh("git", "init", "-q", "-b", "main", cwd=repo, env=env)
    sh("dvc", "init", "-q", cwd=repo, env=env)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # its plots template and default remote
    shutil.copytree(ROOT / "plots", repo / "plots")
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "tiny pipeline", cwd=repo, env=env)
    return repo
