"""Mapped weights and the memory the OS counts: tensors that are views of a file's pages
(equal to safetensors' own reading, written without touching the file), those pages counted
as mapped, and RSS ≥ PSS ≥ USS moving with memory a process alone holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.common.memory.mapped import file_backed_mib, mapped_tensors, smaps


def test_mapped_tensors_are_the_file_and_writing_one_leaves_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = {"w": torch.randn(512, 1024), "h": torch.randn(7, 3).half(), "b": torch.randn(5).bfloat16(),
             "i": torch.arange(10, dtype=torch.int8), "empty": torch.zeros(0, 4)}
    path = tmp_path / "model.safetensors"
    save_file(saved, str(path))
    before = path.read_bytes()
    mapped = mapped_tensors(path)
    reference = load_file(str(path))
    assert set(mapped) == set(reference)
    for name, tensor in reference.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name], tensor), name
    assert file_backed_mib(path) >= 1.9  # the 2 MiB matrix's pages, read through the mapping
    mapped["w"].add_(1.0)  # copy-on-write: the process's own pages from here on
    assert path.read_bytes() == before


def test_rss_pss_and_uss_order_and_follow_private_memory() -> None:
    first = smaps()
    assert first["rss_mib"] >= first["pss_mib"] >= first["uss_mib"] > 0
    block = np.ones(64 * 2**20 // 8)  # 64 MiB written: pages this process alone holds
    second = smaps()
    assert second["uss_mib"] - first["uss_mib"] >= 60 and second["rss_mib"] - first["rss_mib"] >= 60
    del block


def test_lmmem_encoding_loads_its_dense_tensors_mapped_and_decodes_the_sparse_ones(tmp_path: Path) -> None:
    from stages.common.weights.storage import load_state, save_state

    torch.manual_seed(0)
    dense = torch.randn(256, 512)  # 0.5 MiB
    state = {"dense": dense, "tied": dense, "pruned": torch.randn(64, 64) * (torch.rand(64, 64) < 0.2)}
    path = tmp_path / "weights.safetensors"
    assert save_state(state, path)["dense"] == 1
    copied = load_state(path)
    before = file_backed_mib(path)
    mapped = load_state(path, mapped=True)
    for name, tensor in state.items():
        assert torch.equal(mapped[name], tensor) and torch.equal(copied[name], tensor), name
    assert mapped["tied"] is mapped["dense"]  # an alias stays one tensor
    assert mapped["dense"].sum().item() == pytest.approx(dense.sum().item(), rel=1e-5)  # its pages read
    assert file_backed_mib(path) - before >= 0.45  # through the mapping, not a copy
