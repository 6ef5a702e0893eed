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

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS; False where the OS does not allow it."""
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


def children_peak_rss_mib() -> float:
    """The largest peak RSS among this process's finished (waited-for) children, in MiB."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
