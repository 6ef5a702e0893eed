"""train.distributed: ddp, zero1 and fsdp in 2 processes on CPU (gloo) through torch's
elastic launcher. The loss curve matches one process on the same effective batch, each
strategy's per-rank memory moves the category it shards, the estimator predicts every rank,
a killed run resumes, and two "nodes" meet at a rendezvous endpoint."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import (ROOT, deep_update, kill_at_checkpoint, one_error_line, read_metrics, run_cli,
                            run_stage, tiny_params, train_args)

TIMING = {"seconds", "peak_rss_mib", "step_ms_median", "tokens_per_sec", "rss_start_mib", "rss_predicted_mib",
          "rss_prediction_error"}  # the process's memory: the machine's, as its times are
# the tiny profile's batch of 8 as 2 micro-batches of 4: one process accumulates both, two
# ranks take one each
BATCH = {"batch_size": 8, "micro_batch_size": 4}
# Tolerance of the loss curves: DDP averages the two ranks' gradients where one process sums
# its micro-batches' gradients, so results may differ in the last bits; over 30 AdamW steps
# that stays far below 1e-4 (measured here: identical for ddp and zero1, 1e-5 for fsdp).
LOSS_TOLERANCE = 1e-4


def write_params(work: Path, **train: Any) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(deep_update(tiny_params(),
                                                                 {"train": {**BATCH, **train}})))


def losses(work: Path) -> list[float]:
    with (work / "plots" / "steps.csv").open() as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], Path]]:
    """One process, then ddp, zero1 and fsdp on 2 ranks, all on the same params otherwise: a
    minute, and must be (four training runs, three of them launching two processes each), once
    for the module's tests."""
    root = tmp_path_factory.mktemp("distributed")
    out = {}
    for name, dist in (("single", None), ("ddp", "ddp"), ("zero1", "zero1"), ("fsdp", "fsdp")):
        work = root / name
        write_params(work, **({"distributed": {"nproc": 2, "strategy": dist}} if dist else {}))
        result = run_cli("train", train_args(work, tokens))
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = (read_metrics(work / "train.json"), work)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "fsdp"])
def test_two_ranks_follow_the_one_process_loss_curve(runs: dict[str, Any], strategy: str) -> None:
    single, single_dir = runs["single"]
    metrics, work = runs[strategy]
    assert metrics["dist_strategy"] == strategy and metrics["dist_world_size"] == 2
    assert single["dist_world_size"] == 1
    one, two = losses(single_dir), losses(work)
    assert len(one) == len(two) == 30
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < LOSS_TOLERANCE
    assert one[-1] < one[0] - 1.0  # it did learn
    assert abs(metrics["val_loss"] - single["val_loss"]) < LOSS_TOLERANCE
    # rank 0 saved the whole model (gathered from the shards under fsdp), as one process does
    a, b = load_file(single_dir / "model" / "model.safetensors"), load_file(
        work / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), key
    assert metrics["params_total"] == single["params_total"]


def test_the_chunked_loss_on_two_ranks_follows_the_one_process_curve(runs: dict[str, Any], tokens: Path,
                                                                     tmp_path: Path) -> None:
    """DDP with the chunked loss (its gradients handed over in backward, the tied head's into
    the embedding's) steps as one process with the whole logits does."""
    single, single_dir = runs["single"]
    work = tmp_path / "ddp-chunked"
    write_params(work, loss_chunk_tokens=48, distributed={"nproc": 2, "strategy": "ddp"})
    result = run_cli("train", train_args(work, tokens))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(single_dir), losses(work)
    assert len(one) == len(two) == 30
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < LOSS_TOLERANCE
    assert abs(read_metrics(work / "train.json")["val_loss"] - single["val_loss"]) < LOSS_TOLERANCE


def test_zero1_shards_the_optimizer_state_as_predicted(runs: dict[str, Any]) -> None:
    ddp, zero1 = runs["ddp"][0], runs["zero1"][0]
    full = ddp["rank0_mem_optimizer_peak_mib"]
    assert full == pytest.approx(ddp["rank1_mem_optimizer_peak_mib"])
    shards = [zero1["rank0_mem_optimizer_peak_mib"], zero1["rank1_mem_optimizer_peak_mib"]]
    # the two shards hold ddp's state between them, each about half of it: ZeRO assigns whole
    # parameters, and the tied embedding alone is 39 % of this model's weights
    assert sum(shards) == pytest.approx(full, rel=1e-3)
    assert all(0.35 * full < s < 0.65 * full for s in shards), shards
    for rank, shard in enumerate(shards):  # the estimator reproduces ZeRO's partition
        assert zero1[f"rank{rank}_est_optimizer_peak_mib"] == pytest.approx(shard, rel=1e-3)
        assert zero1[f"rank{rank}_saving_vs_ddp"] > 0
    # nothing else is sharded: parameters and gradients (DDP's buckets) are whole on each rank
    single = runs["single"][0]
    for key in ("mem_parameters_peak_mib", "mem_gradients_peak_mib"):
        assert zero1[key] == pytest.approx(ddp[key])
    assert ddp["mem_parameters_peak_mib"] == pytest.approx(single["mem_parameters_peak_mib"])
    # DDP's first step copies each new gradient into the bucket that holds them all: for a
    # moment the largest, the tied embedding, is there twice
    weights = load_file(runs["single"][1] / "model" / "model.safetensors")
    largest = max(t.numel() * 4 for t in weights.values()) / 2**20
    assert ddp["mem_gradients_peak_mib"] == pytest.approx(single["mem_gradients_peak_mib"] + largest,
                                                          rel=1e-4)
    assert ddp["est_gradients_peak_mib"] == pytest.approx(ddp["mem_gradients_peak_mib"], rel=1e-4)
    assert zero1["mem_total_peak_mib"] < ddp["mem_total_peak_mib"]


def test_ddp_per_rank_memory_matches_its_prediction(runs: dict[str, Any]) -> None:
    ddp = runs["ddp"][0]
    for rank in (0, 1):
        assert ddp[f"rank{rank}_mem_total_peak_mib"] > 0
        assert abs(ddp[f"rank{rank}_est_error_total_peak_mib"]) < 0.02
    assert ddp["mem_total_peak_mib"] == max(ddp["rank0_mem_total_peak_mib"], ddp["rank1_mem_total_peak_mib"])
    assert ddp["est_total_peak_mib"] == pytest.approx(ddp["dist_ddp_est_total_peak_mib"])


def test_fsdp_shards_parameters_gradients_and_optimizer(runs: dict[str, Any]) -> None:
    ddp, fsdp, single = runs["ddp"][0], runs["fsdp"][0], runs["single"][0]
    for category in ("parameters", "gradients", "optimizer"):
        for rank in (0, 1):  # FSDP splits every tensor in two, padding to an even row count
            assert fsdp[f"rank{rank}_mem_{category}_peak_mib"] == \
                pytest.approx(single[f"mem_{category}_peak_mib"] / 2, rel=0.01), category
    assert fsdp["mem_total_peak_mib"] < ddp["mem_total_peak_mib"]
    # the dry run is FSDP2's own sharding on a fake process group, made in a process of its
    # own (this run's rank 0 belongs to a process group already)
    for category in ("parameters", "gradients", "optimizer", "activations", "temporaries", "total"):
        assert fsdp[f"est_{category}_peak_mib"] == pytest.approx(fsdp[f"mem_{category}_peak_mib"],
                                                                 rel=0.005), category


def test_over_budget_a_distributed_run_shards_more(runs: dict[str, Any], tokens: Path,
                                                   tmp_path: Path) -> None:
    ddp, zero1 = runs["ddp"][0], runs["zero1"][0]
    # zero1 fits, ddp does not
    budget = round((ddp["est_total_peak_mib"] + zero1["est_total_peak_mib"]) / 2, 2)
    work = tmp_path / "refused"
    write_params(work, distributed={"nproc": 2}, memory_budget_mib=budget)
    result = run_cli("train", train_args(work, tokens))
    assert result.returncode == 2
    assert "it fits with distributed.strategy=zero1" in one_error_line(result.stderr, "train")
    assert not (work / "model").exists()

    work = tmp_path / "fitted"
    write_params(work, distributed={"nproc": 2}, memory_budget_mib=budget, auto_fit=True)
    result = run_cli("train", train_args(work, tokens))
    assert result.returncode == 0, result.stderr[-3000:]
    fitted = read_metrics(work / "train.json")
    assert fitted["auto_fit_changes"] == "distributed.strategy=zero1" and fitted["dist_strategy"] == "zero1"
    assert fitted["rank1_mem_optimizer_peak_mib"] == zero1["rank1_mem_optimizer_peak_mib"]
    assert fitted["mem_total_peak_mib"] <= budget
    assert yaml.safe_load((work / "model" / "params.json").read_text())["train"]["distributed"][
        "strategy"] == "zero1"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP over NCCL needs two CUDA devices")
def test_fsdp_on_cuda(tokens: Path, tmp_path: Path) -> None:  # pragma: no cover - needs GPUs
    work = tmp_path / "cuda"
    write_params(work, distributed={"nproc": 2, "strategy": "fsdp"}, precision="bf16")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["base"]["device"] = "cuda"
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_cli("train", train_args(work, tokens))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(work / "train.json")
    assert metrics["cuda_max_allocated_mib"] > 0 and metrics["rank1_cuda_max_allocated_mib"] > 0
    assert metrics["val_loss"] < 7.0


def test_a_killed_zero1_run_resumes_to_the_same_metrics(runs: dict[str, Any], tokens: Path,
                                                        tmp_path: Path) -> None:
    uninterrupted, full_dir = runs["zero1"]
    work = tmp_path / "killed"
    write_params(work, distributed={"nproc": 2, "strategy": "zero1"}, checkpoint_every=5)
    settings = yaml.safe_load((work / "params.yaml").read_text())
    assert settings["train"]["steps"] == 30
    stopped_at = kill_at_checkpoint(train_args(work, tokens), work / "ckpt" / "latest" / "state.json", 9, 300)
    assert not (work / "train.json").exists(), "the run finished before it could be killed"
    assert 9 <= stopped_at < 29

    result = run_cli("train", train_args(work, tokens))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from the checkpoint at step {stopped_at}" in result.stderr
    resumed = read_metrics(work / "train.json")
    # each rank's RSS: timing-like
    skip = TIMING | {k for k in resumed if k.endswith(("peak_rss_mib", "rss_start_mib"))}
    assert {k: v for k, v in resumed.items() if k not in skip} == \
        {k: v for k, v in uninterrupted.items() if k not in skip}
    assert (work / "model" / "model.safetensors").read_bytes() == (
        full_dir / "model" / "model.safetensors").read_bytes()


def test_two_nodes_meet_at_the_endpoint_and_rank_0_writes(tokens: Path, tmp_path: Path,
                                                          runs: dict[str, Any]) -> None:
    """docs/training.md's multi-machine command, with two "nodes" on this machine: the same params
    (nnodes 2, one process each, one endpoint) started twice."""
    from flows.serve import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs, works = [], []
    for node in (0, 1):
        work = tmp_path / f"node{node}"
        write_params(work, distributed={"nproc": 1, "nnodes": 2, "rdzv_endpoint": endpoint, "strategy": "ddp",
                                        "rdzv_id": "two-nodes"})
        works.append(work)
        procs.append(subprocess.Popen([sys.executable, "-m", "stages.train", *train_args(work, tokens)],
                                      env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errors)
    written = [w for w in works if (w / "train.json").exists()]
    assert len(written) == 1, "exactly the node with rank 0 writes the metrics"
    assert all((w / "model").exists() == (w in written) for w in works)
    metrics = read_metrics(written[0] / "train.json")
    assert metrics["dist_world_size"] == 2
    assert max(abs(a - b)
               for a, b in zip(losses(written[0]), losses(runs["ddp"][1]), strict=True)) < LOSS_TOLERANCE


@pytest.mark.parametrize(("train", "message"), [
    ({"batch_size": 6, "micro_batch_size": 2, "distributed": {"nproc": 2}},
     "batch_size (6) must be a multiple of distributed.nproc x nnodes x micro_batch_size (2 x 2)"),
    ({"distributed": {"nnodes": 2}}, "set rdzv_endpoint to host:port"),
    ({"distributed": {"nnodes": 2, "rdzv_endpoint": "no port"}}, "is not host:port"),
    ({"distributed": {"nnodes": 2, "rdzv_endpoint": "10.0.0.1:99999"}}, "the port must be 1 to 65535"),
    ({"distributed": {"nproc": 2, "strategy": "fsdp"}, "prune": {"final_sparsity": 0.5}},
     "prune with ddp or zero1"),
    ({"distributed": {"nproc": 2, "strategy": "fsdp"}, "precision": "fp16"}, "use bf16"),
    ({"distributed": {"nproc": 2}, "optimizer": "sparse_adam", "model": {"tie_embeddings": False}},
     "sparse_adam cannot be distributed"),
    ({"distributed": {"strategy": "zero2"}}, "train.distributed.strategy: must be one of"),
])
def test_impossible_distributed_settings_are_one_line(tokens: Path, tmp_path: Path, train: dict[str, Any],
                                                      message: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any rank starts (the command's exit code and line: test_over_budget...)."""
    work = tmp_path / "bad"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(deep_update(tiny_params(),
                                                                 {"train": {**BATCH, **train}})))
    assert run_stage("train", train_args(work, tokens)) == 2
    assert message in one_error_line(capsys.readouterr().err, "train")
    assert not (work / "model").exists() and not (work / "train.json").exists()


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def tcp_addresses(pids: set[int]) -> set[tuple[str, str]]:
    """(local address, TCP state) of every TCP socket the processes hold, from /proc/net."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                found.add((fields[1].split(":")[0], fields[3]))
    return found


LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_a_one_machine_run_listens_and_talks_on_loopback_only(tokens: Path, tmp_path: Path) -> None:
    """torch's rendezvous store once listened on every interface (and unpickles what it
    reads): the ranks of a one-machine run hold no TCP socket beyond 127.0.0.1."""
    work = tmp_path / "loopback"
    write_params(work, distributed={"nproc": 2}, steps=40)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "train.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "stages.train", *train_args(work, tokens)], cwd=ROOT,
                                env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        seen: set[tuple[str, str]] = set()
        while proc.poll() is None:
            seen |= tcp_addresses(descendants(proc.pid))
            time.sleep(0.1)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert seen, "no TCP socket seen: the ranks must have talked somehow"
    assert {address for address, _ in seen} <= LOOPBACK_HEX, seen
