"""The memory meter: process peak RSS, reset at a stage's start.

Linux keeps the high-water mark of a process's resident set in /proc/self/status
(VmHWM). Writing "5" to /proc/self/clear_refs resets it to the current RSS, so a stage
reports its own peak rather than the peak of whatever the interpreter did before
(imports included, on purpose: they are part of what the stage costs).
Worker processes are reported separately: the kernel keeps the largest child's peak.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

from stages.common.core.errors import StageError

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_started: list[float] = []  # the RSS when the peak was last reset in this process


def start_rss_mib() -> float:
    """This process's RSS in MiB when its peak was last reset (now, if it never was)."""
    return _started[-1] if _started else current_rss_mib()


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS; False where the OS does not allow it."""
    _started[:] = [current_rss_mib()]
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError as exc:
        log.warning("cannot reset peak RSS (%s): the peak includes what ran before", exc)
        return False


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process since start or the last reset, in MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: getrusage's maxrss cannot be reset, but is the best left
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 1024, 1)


def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB (0 where the OS does not say)."""
    kib = _status_kib("VmRSS")
    return round(kib / 1024, 1) if kib is not None else 0.0


def _cgroup_room() -> float | None:
    """MiB left under this process's cgroup memory limit (v2 memory.max or v1
    memory.limit_in_bytes); None where there is no limit or no cgroup to read."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            folder, limit_file, usage_file = Path("/sys/fs/cgroup") / path.lstrip(
                "/"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_file, usage_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        try:
            limit = (folder / limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**62:  # v1 writes "no limit" as a huge number
                return max(int(limit) - int((folder / usage_file).read_text()), 0) / 2**20
        except (OSError, ValueError):
            continue
    return None


def available_mib() -> tuple[float, str] | None:
    """Memory a new allocation can still get, in MiB, and where the figure comes from: the
    kernel's MemAvailable, or the room left under this process's cgroup limit where that is
    smaller; None where the OS says neither."""
    found: tuple[float, str] | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = (int(line.split()[1]) / 1024, "MemAvailable")
    except OSError:
        pass
    room = _cgroup_room()
    if room is not None and (found is None or room < found[0]):
        found = (room, "room under the cgroup's memory limit")
    return found


def children_peak_rss_mib() -> float:
    """The largest peak RSS among this process's finished (waited-for) children, in MiB."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


RECORD_COPIES = 6  # peak RSS bytes per byte of the longest record while it is read, decoded and cleaned


def check_record_fits(key: str, max_bytes: int) -> None:
    """Refuse, before any work, a record limit whose one record could not be held in this
    machine's available memory (RECORD_COPIES bytes per byte: docs/BENCHMARKS.md)."""
    found = available_mib()
    need = max_bytes * RECORD_COPIES / 2**20
    if found is not None and need > found[0]:
        raise StageError(f"{key}={max_bytes:,}: one record that long needs about {need:,.0f} MiB while it "
                         "is read, decoded and cleaned, more than this machine's available memory "
                         f"({found[0]:,.0f} "
                         f"MiB, {found[1]}): lower it")
