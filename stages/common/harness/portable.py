"""Portable numerics: with `base.portable` on, the same params give the same bytes on any
x86-64 CPU with AVX2, whatever else the CPU has, and the hardware is in every metrics file.

Why it is built this way: docs/design-notes.md, `stages.common.harness.portable`.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

THREADS = 2  # the default machine's cores; the numbers depend on the count, not on the cores
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2",
        "DNNL_MAX_CPU_ISA": "AVX2", "OPENBLAS_CORETYPE": "Haswell"}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
MARK = "LMMEM_PORTABLE"  # set with the pins: what this module set, so that it can take it back


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return any(line.startswith("flags") and " avx2" in line
                   for line in Path("/proc/cpuinfo").read_text(encoding="utf-8",
                                                               errors="replace").splitlines())
    except OSError:
        return False


def requested(argv: list[str]) -> bool:
    """base.portable of the params file a stage's command line names (--params, else
    params.yaml); on when the file or key is missing or unreadable (the stage itself then
    reports a broken file in one line)."""
    return base_setting(argv, "portable", True) is not False


def base_setting(argv: list[str], key: str, default: Any) -> Any:
    """`base.<key>` of the params file a stage's command line names (--params, else
    params.yaml); `default` when the file or key is missing or unreadable."""
    path = "params.yaml"
    for i, arg in enumerate(argv):
        if arg == "--params" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--params="):
            path = arg.split("=", 1)[1]
    base = _base_section(path)
    return base.get(key, default) if isinstance(base, dict) else default


@functools.lru_cache(maxsize=4)
def _base_section(path: str) -> Any:
    """The `base` section of a params file, read once however many settings are asked of it;
    None when it is missing or unreadable (validated, and reported, by the stage's params loader)."""
    try:
        import yaml

        loaded = yaml.load(Path(path).read_text(encoding="utf-8"),
                           Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        return loaded.get("base", {})
    except Exception:
        return None


def apply(on: bool) -> None:
    """Pin (on) or leave alone (off) what selects the kernels and the thread counts, in this
    process's environment, before numpy, scipy or torch load."""
    if on:
        pins = dict(PINS) if has_avx2() else {}
        pins.update({name: str(THREADS) for name in THREAD_VARIABLES})
        os.environ.update(pins)
        os.environ[MARK] = ",".join(sorted(pins))
    elif MARK in os.environ:  # pinned by a parent under another params file: not this one's choice
        for name in os.environ.pop(MARK).split(","):
            os.environ.pop(name, None)


def pin_threads() -> None:
    """Torch's intra-op threads to the pinned count, in a stage's process once torch is loaded:
    torch takes OMP_NUM_THREADS only up to the cores it finds."""
    torch = sys.modules.get("torch")
    if MARK in os.environ and torch is not None:
        torch.set_num_threads(THREADS)


def pinned_threads() -> int | None:
    """The pinned thread count, or None when this process runs unpinned."""
    return THREADS if MARK in os.environ else None


def provenance() -> dict[str, Any]:
    """Flat `machine_*` figures for a metrics file: the CPU, the ATen capability in use (where
    torch is loaded), the BLAS libraries loaded with their selected cores and threads, torch's
    threads and whether the numerics are pinned."""
    found: dict[str, Any] = {"machine_cpu": cpu_model(), "machine_arch": platform.machine(),
                             "machine_portable": ("no AVX2" if MARK in os.environ and "ATEN_CPU_CAPABILITY"
                                                  not in os.environ[MARK] else MARK in os.environ)}
    blas = []
    torch = sys.modules.get("torch")
    if torch is not None:
        found["machine_capability"] = torch.backends.cpu.get_cpu_capability()
        found["machine_threads"] = torch.get_num_threads()
        mkl = re.search(r"Math Kernel Library Version ([\d.]+)", torch.__config__.show())
        if mkl:
            blas.append(f"torch: MKL {mkl.group(1)}" + (f" (MKL_CBWR={os.environ['MKL_CBWR']})"
                                                        if os.environ.get("MKL_CBWR") else ""))
    if "numpy" in sys.modules:
        from threadpoolctl import threadpool_info

        for lib in threadpool_info():
            if lib.get("user_api") == "blas":
                owner = Path(lib["filepath"]).parent.name.removesuffix(".libs")
                blas.append(f"{owner}: {lib['internal_api']} {lib.get('version') or ''} "
                            f"{lib.get('architecture') or ''} ({lib['num_threads']} threads)".replace("  ",
                                                                                                      " "))
    found["machine_blas"] = "; ".join(sorted(blas)) or "none loaded"  # not in the order they happened to load
    return found
