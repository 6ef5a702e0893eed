"""The stage contract, written once: every stage's `main()` is a call to `stage_main`.

A stage module provides
- `Params`: a pydantic model of its params.yaml section (see stages.common.core.params);
- `Paths`: a frozen dataclass of its input and output paths, each a `--name` option;
- `run(params, paths, base) -> metrics`: the work, returning flat figures (None where this
  process writes no outputs: a distributed run's node without rank 0).

`stage_main` parses the path options, loads and validates params, checks that the process
runs under `base.allocator`, sets up logging, seeds every generator, resets the peak-RSS
meter, calls `run`, adds `seconds`, `peak_rss_mib` and its prediction (stages.common.memory.rss_prediction:
from `rss_start_mib`, `rss_tensor_mib` and `rss_weights_mib` where `run` returns them, else
from the RSS at the reset and no tensors), and writes data/metrics/<stage>.json. A StageError becomes one line
on stderr and exit code 2; outputs are written atomically by the stage itself, so a
failure leaves no partial output. Under `dvc repro`, which deletes a stage's outputs before
running it, a failure puts the previous ones back from DVC's cache (stages.common.harness.restore).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel

from stages import WATCHER
from stages.common.core.artifacts import check_replaceable, write_json
from stages.common.core.errors import StageError
from stages.common.core.params import BaseParams, load_params
from stages.common.harness import malloc
from stages.common.harness.portable import pin_threads, provenance
from stages.common.harness.restore import put_back, under_dvc
from stages.common.memory import rss_prediction
from stages.common.memory.rss_meter import peak_rss_mib, reset_peak_rss, start_rss_mib

log = logging.getLogger("lmmem")

P = TypeVar("P", bound=BaseModel)
Metrics = dict[str, float | int | str | bool]
RSS_LINE = {"compare": "train", "adapt": "train", "finetune": "train"}  # the training loop's overhead


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (when the stage uses it) torch; gensim takes the seed as a param."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _build_parser(name: str, paths_cls: type, doc: str | None, estimate: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if estimate:
        parser.add_argument("--estimate", action="store_true",
                            help="print the predicted memory as JSON and exit, without running the stage")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    for field in dataclasses.fields(paths_cls):
        if not field.metadata.get("cli", True):  # set by the code that builds the Paths, not a user
            continue
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            type=str if field.type in ("str", str) else Path,  # a name (compare's --config), else a path
            default=field.default,
            help=f"(default: {field.default})",
        )
    parser.add_argument(
        "--metrics", type=Path, default=Path(f"data/metrics/{name}.json"), help="metrics file"
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def round_metrics(metrics: dict[str, Any]) -> Metrics:
    """Flat metrics with floats rounded to 6 significant digits (stable, readable diffs)."""
    out: Metrics = {}
    for key, value in sorted(metrics.items()):
        if isinstance(value, (np.floating, np.integer)):
            value = value.item()
        if isinstance(value, float):
            value = float(f"{value:.6g}")
        out[key] = value
    return out


def check_writable(metrics: Path) -> None:
    """The metrics file can be written (its folder made, a file created there), or a one-line error."""
    if metrics.is_dir():
        raise StageError(f"--metrics {metrics}: is a folder, not a file")
    try:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        probe = metrics.parent / f".{metrics.name}.probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise StageError(f"--metrics {metrics}: cannot be written ({exc.strerror or exc})") from None


def stage_main(
    name: str,
    params_cls: type[P],
    paths_cls: type,
    run: Callable[[P, Any, BaseParams], dict[str, Any] | None],
    argv: Sequence[str] | None = None,
    doc: str | None = None,
    estimate: Callable[[P, Any, BaseParams], dict[str, Any]] | None = None,
    section: str | tuple[str, ...] | None = None,
) -> int:
    """Run one stage from the command line; returns the process exit code. A stage that can
    predict its memory passes `estimate`, which `--estimate` runs instead of the stage. A
    stage that reads another stage's section of params.yaml names it as `section`; one that
    reads several names them all, and its Params has one field per section."""
    code = 1  # an exception escaping the stage leaves it at 1
    watcher = WATCHER if under_dvc(name) else None  # started by stages/__init__.py, told here how it ended
    try:
        code = _stage_main(name, params_cls, paths_cls, run, argv, doc, estimate, section)
        return code
    except SystemExit as exc:  # argparse: --help (0) or a bad option (2)
        code = exc.code if isinstance(exc.code, int) else 1
        raise
    finally:
        if code != 0 and under_dvc(name):
            put_back(os.environ["DVC_STAGE"])  # DVC's name: compare@bf16 for an item of compare's foreach
        if watcher is not None:
            watcher.ended()


def _stage_main(
    name: str,
    params_cls: type[P],
    paths_cls: type,
    run: Callable[[P, Any, BaseParams], dict[str, Any] | None],
    argv: Sequence[str] | None,
    doc: str | None,
    estimate: Callable[[P, Any, BaseParams], dict[str, Any]] | None,
    section: str | tuple[str, ...] | None,
) -> int:
    args = _build_parser(name, paths_cls, doc, estimate is not None).parse_args(argv)
    setup_logging(args.log_level)
    reset_peak_rss()
    started = time.perf_counter()
    try:
        base, params = load_params(args.params, section or name, params_cls)
        malloc.check(base.allocator)  # started under it by stages/__init__.py, or one line why not
        paths = paths_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(paths_cls)
                             if f.metadata.get("cli", True)})
        seed_everything(base.seed)
        pin_threads()  # base.portable: the same thread count on every machine
        if getattr(args, "estimate", False):  # writes nothing
            print(json.dumps(round_metrics(estimate(params, paths, base)), indent=2, sort_keys=True))  # type: ignore[misc]
            return 0
        for output in ("out", "plots"):  # refused before any work: a folder this stage did not write
            if hasattr(paths, output):
                check_replaceable(getattr(paths, output), name)
        check_writable(args.metrics)  # before the work: not after the output was swapped in
        metrics = run(params, paths, base)
        if metrics is None:  # a distributed run's node without rank 0: its outputs are rank 0's to write
            return 0
    except (StageError, OSError) as exc:  # OSError: unreadable input, full disk (the OS names the file)
        print(f"lmmem {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmmem {name}: interrupted", file=sys.stderr)
        return 130
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    # a stage that resets the peak per item (compress: per variant) reports the largest itself
    if peak_rss_mib() > metrics.get("peak_rss_mib", 0.0):  # else the stage's own (with its own start)
        metrics["peak_rss_mib"], metrics["rss_start_mib"] = peak_rss_mib(), start_rss_mib()
    metrics.update(rss_prediction.figures(RSS_LINE.get(name, name), base.allocator,
                                          metrics.get("rss_start_mib", start_rss_mib()),
                                          metrics.get("rss_tensor_mib", 0.0),
                                          metrics.get("rss_weights_mib", 0.0),
                                          metrics["peak_rss_mib"]))
    metrics.update(provenance())  # the machine and the kernels behind these figures
    metrics.update(allocator=base.allocator, machine_allocator=malloc.describe())
    write_json(args.metrics, round_metrics(metrics))
    log.info("%s done in %.1f s, peak RSS %.1f MiB", name, metrics["seconds"], metrics["peak_rss_mib"])
    return 0
