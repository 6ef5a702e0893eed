"""Fresh worker processes that start fast: each task runs in a process of its own (its memory
peaks are its own), forked from a server that imported the heavy libraries once, instead of a
new interpreter importing torch and transformers again for every task.

When the work stops on an exception (Ctrl-C, an error in the stage), the tasks not started are
cancelled and the running ones killed: a stopped evaluation does not go on measuring the
models still queued before it exits."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
from collections.abc import Iterator

import torch

from stages.common.core.lifetime import die_with

# what every evaluation process imports: paid once, in the fork server
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama",
           "transformers.models.gpt2.modeling_gpt2", "stages.common.weights.loading",
           "stages.common.memory.tensor_meter"]


def cores() -> int:
    """CPUs this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def fresh_processes(workers: int,
                    preload: list[str] = PRELOAD) -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """A pool of `workers` processes, each running one task and exiting (max_tasks_per_child=1),
    forked from a fork server with `preload` imported."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1,
                                                  initializer=die_with, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        # no public handle before 3.14
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()  # the pool breaks: what is queued fails at once instead of starting
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def share_cores(threads: int) -> None:
    """In a worker: use `threads` of the cores for torch's intra-op parallelism."""
    torch.set_num_threads(max(1, threads))
