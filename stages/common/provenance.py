"""What the report's provenance table lists beside the params: the libraries with their
versions, and the BLAS libraries every stage found (stages.common.portable records them)."""

from __future__ import annotations

from importlib import metadata
from typing import Any

LIBRARIES = ["torch", "transformers", "tokenizers", "dvc", "prefect", "gensim", "jieba", "nltk", "numpy",
             "bitsandbytes"]


def version(lib: str) -> str:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "not installed"


def one_blas_list(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stages load different BLAS libraries: every stage's list becomes every library as found."""
    libs = dict.fromkeys(lib for m in metrics.values() for lib in str(m.get("machine_blas", "")).split("; ") if lib)
    return {s: {**m, "machine_blas": "; ".join(libs)} if "machine_blas" in m else m for s, m in metrics.items()}
