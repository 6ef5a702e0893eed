"""lmmem pipeline stages: one module (or package) per DVC stage, run as `python -m stages.<name>`
(or `python -m stages <name>`, through the warm interpreter).

Importing lmmem changes nothing: what follows happens only in a process started as a stage,
first thing, before numpy, scipy or torch load (the package runs before the stage's module).
`base.portable` pins what selects the numeric kernels and the thread counts
(stages.common.harness.portable); a stage started under another allocator than
`base.allocator` executes itself again under it (stages.common.harness.malloc); under `dvc
repro` (DVC_STAGE set) the watcher starts, so that a stage killed at any moment gets the
outputs DVC deleted put back (stages.common.harness.restore). What the stage starts (workers,
ranks, the warm server) inherits the pins, the allocator and LMMEM_WATCHED.
"""

import os
import sys

from stages.common.harness import malloc

WATCHER = None
if malloc.stage_command():  # a stage's process, not a library import (a notebook, a test, a rank)
    from stages.common.harness.portable import apply, requested

    apply(requested(sys.argv))
    malloc.start_under(malloc.requested(sys.argv))
    if os.environ.get("DVC_STAGE") and "LMMEM_WATCHED" not in os.environ and "RANK" not in os.environ:
        os.environ["LMMEM_WATCHED"] = str(os.getpid())
        from stages.common.harness.restore import Watcher

        WATCHER = Watcher(os.environ["DVC_STAGE"])
