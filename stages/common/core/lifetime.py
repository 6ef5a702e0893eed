"""Worker processes that die with the stage that made them: a stage killed mid-run (Ctrl-C
twice, a timeout, the OOM killer) leaves no worker behind blocked on a pipe for ever.

A fork pool's workers are the stage's children: the kernel kills them when it exits
(prctl PR_SET_PDEATHSIG). A fork server's workers are the server's children, and the server
lives as long as they do, so each of them also watches the stage itself (a pidfd, or a poll
where there is none) and ends when it does.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with(owner: int) -> None:
    """In a worker, first thing: end this process when process `owner` (the stage) exits."""
    if sys.platform == "linux" and owner == os.getppid():
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        os.kill(owner, 0)
    except ProcessLookupError:  # gone already
        os._exit(1)
    threading.Thread(target=_watch, args=(owner,), name="die-with-stage", daemon=True).start()


def _watch(owner: int) -> None:
    try:
        fd = os.pidfd_open(owner)
        select.select([fd], [], [])  # readable once the process has exited
    except (AttributeError, OSError):  # no pidfd here: poll
        while True:
            time.sleep(0.5)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                continue
    os.kill(os.getpid(), signal.SIGKILL)
