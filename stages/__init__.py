"""lmmem pipeline stages: one module per DVC stage, run as `python -m stages.<name>`.

Under `dvc repro` (DVC_STAGE in the environment) the stage's process starts its watcher
here, before the stage module's imports (tens of seconds for torch and transformers): a stage
killed at any moment after this gets the outputs DVC deleted put back (stages.common.harness.restore).
Processes the stage starts inherit LMMEM_WATCHED and start none of their own.

Before that, first thing in every stage's process, `base.portable` pins what selects the
numeric kernels and the thread counts (stages.common.harness.portable), before numpy, scipy or torch
load; the stage's workers and the warm server inherit it. Then a stage started under another
allocator than `base.allocator` executes itself again under it (stages.common.harness.malloc).
"""

import os
import sys

from stages.common.harness import malloc
from stages.common.harness.portable import apply, requested

apply(requested(sys.argv))
malloc.start_under(malloc.requested(sys.argv))

WATCHER = None
if os.environ.get("DVC_STAGE") and "LMMEM_WATCHED" not in os.environ and "RANK" not in os.environ:
    os.environ["LMMEM_WATCHED"] = str(os.getpid())
    from stages.common.harness.restore import Watcher

    WATCHER = Watcher(os.environ["DVC_STAGE"])
