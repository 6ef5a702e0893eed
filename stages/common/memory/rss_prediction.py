"""A stage process's peak RSS, predicted from its tensor estimate plus the runtime and
allocator overhead measured on this machine, and set beside the measured peak.

    predicted = start + overhead + a × tensors + b × weights

Why it is built this way: docs/design-notes.md, `stages.common.memory.rss_prediction`.
"""

from __future__ import annotations

from typing import Any

# stage -> allocator -> (overhead MiB, MiB per tensor MiB, MiB per weight MiB), from `python -m
# bench.rss_prediction --steps 20` on the 2-core AMD EPYC (jemalloc and tcmalloc not fitted yet)
OVERHEAD: dict[str, dict[str, tuple[float, float, float]]] = {
    "clean": {"glibc": (8.1, 0.0, 0.0), "glibc-tuned": (8.1, 0.0, 0.0)},
    "domain": {"glibc": (160.8, 0.0, 0.0), "glibc-tuned": (159.6, 0.0, 0.0)},
    "embed": {"glibc": (120.7, 0.0, 0.0), "glibc-tuned": (116.1, 0.0, 0.0)},
    "evaluate": {"glibc": (-22.7, 1.471, 0.0)},
    "ingest": {"glibc": (10.6, 0.0, 0.0), "glibc-tuned": (10.7, 0.0, 0.0)},
    "report": {"glibc": (211.9, 0.0, 0.0), "glibc-tuned": (211.8, 0.0, 0.0)},
    "tokenize": {"glibc": (173.9, 0.0, 0.0), "glibc-tuned": (167.5, 0.0, 0.0)},
    "train": {"glibc": (199.9, 1.012, 4.345), "glibc-tuned": (201.3, 0.969, 0.284)},
    "warmstart": {"glibc": (9.7, 0.0, 0.0), "glibc-tuned": (9.6, 0.0, 0.0)},
}


def predict(stage: str, allocator: str, start_mib: float, tensor_mib: float,
            weights_mib: float) -> float | None:
    """The predicted peak RSS in MiB; None where no overhead was fitted for `stage` and
    `allocator`."""
    fitted = OVERHEAD.get(stage, {}).get(allocator)
    if fitted is None:
        return None
    overhead, per_tensor, per_weight = fitted
    return start_mib + overhead + per_tensor * tensor_mib + per_weight * weights_mib


def figures(stage: str, allocator: str, start_mib: float, tensor_mib: float, weights_mib: float,
            measured_mib: float, prefix: str = "") -> dict[str, Any]:
    """The flat figures a metrics file gets: the start, the tensor and weight figures, the
    prediction and its error against `measured_mib` (no prediction: the first three only)."""
    out: dict[str, Any] = {f"{prefix}rss_start_mib": start_mib, f"{prefix}rss_tensor_mib": tensor_mib,
                           f"{prefix}rss_weights_mib": weights_mib}
    predicted = predict(stage, allocator, start_mib, tensor_mib, weights_mib)
    if predicted is not None:
        out[f"{prefix}rss_predicted_mib"] = round(predicted, 1)
        out[f"{prefix}rss_prediction_error"] = predicted / measured_mib - 1 if measured_mib else 0.0
    return out
