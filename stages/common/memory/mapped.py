"""Weights mapped, not copied, and the memory the OS counts per process.

`mapped_tensors` maps a safetensors file privately (copy-on-write) and makes each tensor a
view of its pages: loading reads nothing, a page comes in when the model first touches it,
and processes that map the same file share those pages (the page cache's) until one writes
to a tensor. transformers 5's `from_pretrained` maps model.safetensors the same way;
`file_backed_mib` says how much of a file a process holds through such a mapping.

`smaps` reads `/proc/<pid>/smaps_rollup`: RSS counts every resident page of the process,
shared ones in full in each process that maps them; PSS divides each shared page among the
processes that share it (summed over processes it is the memory they take together); USS is
the pages the process alone holds (what freeing it gives back).
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of a private mapping of it."""
    with open(path, "rb") as f:
        pages = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    size = struct.unpack("<Q", pages[:8])[0]
    header = json.loads(pages[8:8 + size])
    start = 8 + size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(pages, dtype=dtype, count=count, offset=start + begin) if count else \
            torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(info["shape"])
    return tensors


def file_backed_mib(path: Path, pid: int | str = "self") -> float:
    """MiB of `path`'s pages resident in a process's mappings of it (0: it holds a copy, or
    nothing, of that file)."""
    resident, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's first line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            resident += int(line.split()[1])
    return resident / 1024


def smaps(pid: int | str = "self") -> dict[str, float]:
    """RSS, PSS and USS of a process, in MiB (Linux)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])  # kB
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"rss_mib": fields["Rss"] / 1024, "pss_mib": fields["Pss"] / 1024, "uss_mib": uss / 1024}
