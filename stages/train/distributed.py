"""Training across processes and machines on torch.distributed, with its own engines only.

Why it is built this way: docs/design-notes.md, `stages.train.distributed`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator

from stages.common.core.errors import StageError
from stages.common.core.params import Section

log = logging.getLogger("lmmem.distributed")

FILE_STORE = "LMMEM_FILE_STORE"  # launch_here's store, read by process_group
LOOPBACK = "lo"
ENDPOINT = re.compile(r"^[A-Za-z0-9_.:\[\]-]+:\d{1,5}$")


class DistributedParams(Section):
    nproc: int = Field(
        1, ge=1, le=1024,
        description="processes on this machine; > 1 launches them (gloo on CPU; on CUDA one GPU each, NCCL)")
    nnodes: int = Field(
        1, ge=1, le=4096,
        description="machines; > 1: run the same command on each, rank 0's machine writes the outputs")
    rdzv_endpoint: str = Field(
        "", description='host:port every machine reaches (node 0, say 10.0.0.1:29400); "" = this machine, a '
                        'free port')
    rdzv_id: str = Field(
        "lmmem-train", min_length=1, max_length=128,
        description="names the run at the rendezvous: the same on every machine")
    strategy: Literal["ddp", "zero1", "fsdp"] = Field(
        "ddp", description=("ddp: everything replicated | zero1: optimizer state sharded | fsdp: "
                            "parameters, gradients and optimizer state sharded (FSDP2)"))
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto (gloo on CPU, nccl on CUDA) | gloo | nccl")

    @model_validator(mode="after")
    def _endpoint(self) -> DistributedParams:
        if self.rdzv_endpoint and not ENDPOINT.match(self.rdzv_endpoint):
            raise ValueError(f"rdzv_endpoint {self.rdzv_endpoint!r} is not host:port")
        if self.rdzv_endpoint and not 1 <= int(self.rdzv_endpoint.rsplit(":", 1)[1]) <= 65535:
            raise ValueError(f"rdzv_endpoint {self.rdzv_endpoint!r}: the port must be 1 to 65535")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes is {self.nnodes}: set rdzv_endpoint to host:port of a machine every "
                             f"node reaches (node 0's address, say 10.0.0.1:29400)")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


# ----------------------------------------------------------------------------- launching


def in_worker() -> bool:
    """True in a process started by torch's launcher (elastic_launch or torchrun)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(dp: DistributedParams, worker: Callable[..., Any], *args: Any) -> dict[int, Any]:
    """Run `worker(*args)` in nproc processes on this node (and meet nnodes nodes); returns
    each local rank's return value by global rank. A worker's exception becomes a StageError
    naming the rank and its last line. One machine: `launch_here`; several: torch's elastic
    launcher, whose rendezvous store listens on rdzv_endpoint's port on every interface."""
    if dp.nnodes == 1 and not dp.rdzv_endpoint:
        return launch_here(dp, worker, *args)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=dp.nnodes, max_nodes=dp.nnodes, nproc_per_node=dp.nproc,
                          run_id=dp.rdzv_id, rdzv_backend="c10d",
                          rdzv_endpoint=dp.rdzv_endpoint or "127.0.0.1:0",
                          max_restarts=0, start_method="spawn", monitor_interval=0.2)
    log.info("launching %d process(es) per node on %d node(s), %s, rendezvous %s", dp.nproc, dp.nnodes,
             dp.strategy, config.rdzv_endpoint)
    try:
        return elastic_launch(config, worker)(*args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        lines = [ln.strip() for ln in str(failure.message).splitlines() if ln.strip()]
        raise StageError(
            f"rank {rank} failed: {lines[-1] if lines else f'exit code {failure.exitcode}'}") from None


def launch_here(dp: DistributedParams, worker: Callable[..., Any], *args: Any) -> dict[int, Any]:
    """The ranks of a one-machine run meet through a file (a FileStore in a private temporary
    folder), not a TCP store, and gloo's and NCCL's own sockets bind the loopback interface:
    nothing of the run listens beyond this machine, and no other user can reach its store."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, start_processes

    n = dp.nproc
    log.info("launching %d processes on this machine, %s, meeting through a file store on loopback", n,
             dp.strategy)
    with tempfile.TemporaryDirectory(prefix="lmmem-ranks-") as folder:  # mode 0700
        common = {"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "GROUP_RANK": "0", "ROLE_RANK": "0",
                  FILE_STORE: str(Path(folder) / "store"), "GLOO_SOCKET_IFNAME": LOOPBACK,
                  "NCCL_SOCKET_IFNAME": LOOPBACK}
        envs = {r: {**common, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(n)}
        context = start_processes(name="lmmem-train", entrypoint=worker, args={r: args for r in range(n)},
                                  envs=envs, logs_specs=DefaultLogsSpecs(log_dir=str(Path(folder) / "logs")),
                                  start_method="spawn")
        try:
            result = context.wait(period=0.2)
        finally:
            context.close()
    assert result is not None
    if result.failures:
        rank = min(result.failures)
        failure = result.failures[rank]
        raise StageError(f"rank {rank} failed: exit code {failure.exitcode} (its output is above)")
    return dict(result.return_values)


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank and world size (0 and 1 alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The mean of a number over every rank."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, obj: Any) -> bool:
        """Whether every rank holds the same `obj`."""
        values = self.gather(obj)
        return all(v == values[0] for v in values)


def _comm_device() -> torch.device:
    return torch.device("cuda",
                        torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def process_group(dp: DistributedParams, device_type: str) -> Iterator[Context]:
    """Join the launcher's process group for the length of the block."""
    backend = dp.backend if dp.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if backend == "nccl" and device_type != "cuda":
        raise StageError("train.distributed.backend nccl needs base.device cuda (gloo runs on CPU)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    store = os.environ.get(FILE_STORE)
    if store:  # launch_here's ranks
        dist.init_process_group(backend, init_method=f"file://{store}", rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    else:
        dist.init_process_group(backend)
    try:
        yield Context(dist.get_rank(), dist.get_world_size(), local_rank, dp.strategy)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def fake_process_group(world: int) -> Iterator[Any]:
    """A process group of `world` ranks, this process rank 0, on torch's `fake` backend (its
    collectives move no data) and a device mesh of it: FSDP2 shards and gathers fake tensors
    through it as it would real ones (the fsdp dry run). A process that is a rank of a run
    already (a default group exists) cannot hold a second: StageError."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise StageError("a process that is a rank of a run cannot dry-run fsdp in place")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- strategies


def zero_partition(groups: Sequence[dict[str, Any]], world: int) -> list[list[dict[str, Any]]]:
    """ZeroRedundancyOptimizer's assignment of parameters to ranks: in each group, largest
    first, each to the rank with the fewest elements so far (counted across groups). Returns
    each rank's parameter groups."""
    sizes = [0] * world
    out: list[list[dict[str, Any]]] = [[] for _ in range(world)]
    for group in groups:
        per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
        for p in sorted(group["params"], key=lambda t: t.numel(), reverse=True):
            rank = sizes.index(min(sizes))
            per_rank[rank].append(p)
            sizes[rank] += p.numel()
        for rank in range(world):
            out[rank].append({**group, "params": per_rank[rank]})
    return out


def block_classes(model: torch.nn.Module) -> tuple[type, ...]:
    """The transformer block classes FSDP shards one at a time (transformers names them in
    `_no_split_modules`); none for the LSTM, which is sharded as one unit."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def wrap_model(model: torch.nn.Module, ctx: Context, device: torch.device,
               mesh: Any = None) -> torch.nn.Module:
    """The model as the strategy trains it: DDP for ddp and zero1, FSDP2 units for fsdp (over
    `mesh`, by default one of every rank of the process group)."""
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = block_classes(model)
        for module in list(model.modules()):
            if blocks and isinstance(module, blocks):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    ids = [device.index] if device.type == "cuda" else None
    # buffers (RoPE's) are constants: not synchronised before each forward
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                                     forward_sync_buffers=False)


def no_sync(model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP all-reduces gradients on the last micro-batch of a step only."""
    if last or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, gathered from the shards (a collective: every rank
    calls it; only rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
