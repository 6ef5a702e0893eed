"""The CUDA caching allocator's settings (PYTORCH_CUDA_ALLOC_CONF), e.g.
expandable_segments:True to cut fragmentation: handed to the allocator before the run builds
anything and recorded in the metrics. On CPU nothing is applied."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from pydantic import Field

from stages.common.core.params import Section
from stages.train.techniques.base import Technique

log = logging.getLogger("lmmem.train")

# keys PYTORCH_CUDA_ALLOC_CONF understands (torch 2.x CUDA caching allocator)
CUDA_ALLOC_KEYS = ("backend", "max_split_size_mb", "max_non_split_rounding_mb", "roundup_power2_divisions",
                   "garbage_collection_threshold", "expandable_segments", "release_lock_on_cudamalloc",
                   "pinned_use_cuda_host_register", "pinned_num_register_threads",
                   "pinned_use_background_threads",
                   "pinned_max_cached_size_mb", "pinned_max_round_threshold_mb",
                   "per_process_memory_fraction",
                   "graph_capture_record_stream_reuse")


class Fields(Section):
    cuda_alloc_conf: str = Field("", description=(
        "CUDA allocator settings (PYTORCH_CUDA_ALLOC_CONF), e.g. expandable_segments:True to cut "
        "fragmentation; recorded in the metrics"))


class Allocator(Technique):
    name = "allocator"
    Fields = Fields

    def refuse(self, p: Any) -> str | None:
        for item in filter(None, p.cuda_alloc_conf.split(",")):
            key, sep, value = item.partition(":")
            if not sep or not value or key.strip() not in CUDA_ALLOC_KEYS:
                return (f"cuda_alloc_conf: {item!r} is not key:value with a key of "
                        f"{', '.join(CUDA_ALLOC_KEYS)}")
        return None

    def start(self, p: Any, device: torch.device) -> dict[str, Any]:
        """Through the environment before CUDA starts, through torch once it has; the settings
        in force ("" for the defaults) go to the metrics."""
        if device.type != "cuda":
            if p.cuda_alloc_conf:
                log.info("train.cuda_alloc_conf %r has no effect on %s", p.cuda_alloc_conf, device)
            return {"cuda_alloc_conf": ""}
        if p.cuda_alloc_conf:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = p.cuda_alloc_conf
            if torch.cuda.is_initialized():
                torch.cuda.memory._set_allocator_settings(p.cuda_alloc_conf)
        return {"cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}


TECHNIQUE = Allocator()
