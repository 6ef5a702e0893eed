"""What the report's provenance table lists: the params as dotted keys, the libraries with their
versions, the BLAS libraries every stage found, and the machine each stage's metrics say it ran on
(stages.common.harness.portable records them)."""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

from stages.report.document import num

LIBRARIES = ["torch", "transformers", "tokenizers", "dvc", "prefect", "gensim", "jieba", "nltk", "numpy",
             "bitsandbytes"]


def version(lib: str) -> str:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "not installed"


def one_blas_list(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stages load different BLAS libraries: every stage's list becomes every library as found."""
    libs = dict.fromkeys(lib for m in metrics.values() for lib in str(m.get("machine_blas", "")).split("; ")
                         if lib)
    return {s: {**m, "machine_blas": "; ".join(libs)} if "machine_blas" in m else m
            for s, m in metrics.items()}


MACHINE = {"machine_cpu": "CPU", "machine_arch": "architecture",
           "machine_capability": "ATen CPU capability in use",
           "machine_blas": "BLAS libraries (selected core, threads)", "machine_threads": "torch threads",
           "machine_portable": "numerics pinned", "machine_allocator": "C allocator (base.allocator)"}


def machine_rows(metrics: dict[str, dict[str, Any]]) -> list[list[str]]:
    """What each stage's metrics say it ran on: one value, or each value with its stages
    where they differ (stages run on different machines, or before and after a change)."""
    rows = []
    for key, title in MACHINE.items():
        seen: dict[str, list[str]] = {}
        for stage, figures in metrics.items():
            if key in figures:
                seen.setdefault(str(figures[key]).lower() if isinstance(figures[key], bool)
                                else str(figures[key]),
                                []).append(stage)
        if len(seen) == 1:
            rows.append([title, next(iter(seen))])
        elif seen:
            rows.append([title,
                         "; ".join(f"{value} ({', '.join(stages)})" for value, stages in seen.items())])
    return rows


def rss_rows(metrics: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Each stage process's peak RSS beside its prediction (stages.common.memory.rss_prediction), and
    evaluate's measuring process of the trained model: stage, start, tensors, predicted, measured, error."""
    rows = []
    for stage, figures in metrics.items():
        for who, prefix in ((stage, ""), *([(f"{stage}: model", "model_")] if stage == "evaluate" else [])):
            peak = figures.get(f"{prefix}peak_rss_mib" if not prefix else f"{prefix}rss_peak_mib")
            if peak is None:
                continue
            error = figures.get(f"{prefix}rss_prediction_error")
            rows.append([who, num(figures.get(f"{prefix}rss_start_mib")),
                         num(figures.get(f"{prefix}rss_tensor_mib")),
                         num(figures.get(f"{prefix}rss_predicted_mib")), num(peak),
                         "–" if error is None else f"{error:+.1%}"])
    return rows


def not_finite(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """A bullet naming every metric that is not a finite number (NaN, infinity), else none."""
    bad = [f"{s}.{k} ({v})" for s, m in metrics.items() for k, v in sorted(m.items())
           if isinstance(v, float) and not math.isfinite(v)]
    return [f"**NOT FINITE: {', '.join(bad)}**: these figures are not measurements"] if bad else []


def flat(data: Any, prefix: str = "", whole: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Nested params as dotted keys; a mapping under a key in `whole` (a user-named collection,
    such as compress.variants) stays one value: its sorted names."""
    key = prefix[:-1]
    if isinstance(data, dict) and key in whole:
        return {key: sorted(data, key=str)}
    if isinstance(data, dict) and (data or not key):
        out: dict[str, Any] = {}
        for name in sorted(data, key=str):
            out.update(flat(data[name], f"{prefix}{name}.", whole))
        return out
    return {key: data}
