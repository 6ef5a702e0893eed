"""The tensor memory meter against bytes computed by hand."""

from __future__ import annotations

import torch

from stages.common.memory.tensor_meter import TensorMeter

MIB = 2**20


def test_linear_with_adam_by_hand() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(1000, 1000)
    params = (1000 * 1000 + 1000) * 4  # weight and bias, float32
    meter = TensorMeter()
    meter.track_model(layer)
    optimizer = torch.optim.Adam(layer.parameters())
    meter.track_optimizer(optimizer)
    x = torch.randn(64, 1000)
    meter.track(x, "activations")
    for step in range(3):
        with meter.phase(step, "forward"):
            y = layer(x).relu()
            loss = y.square().mean()
        with meter.phase(step, "backward"):
            loss.backward()
        del y, loss
        with meter.phase(step, "optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # between steps: parameters, Adam's two moments plus a float32 step count per
        # parameter tensor, and the input batch; gradients and everything else are freed
        assert meter.current == {"parameters": params, "gradients": 0, "optimizer": 2 * params + 2 * 4,
                                 "activations": 64 * 1000 * 4, "temporaries": 0}
    assert meter.category_peaks["gradients"] == params
    assert meter.category_peaks["parameters"] == params
    assert meter.category_peaks["optimizer"] == 2 * params + 8
    # the largest moment is in the first step's optimizer phase: state and gradients live at once
    assert meter.peak.step == 0 and meter.peak.phase == "optimizer"
    assert meter.peak.by_category["gradients"] == params
    assert meter.peak.by_category["optimizer"] == 2 * params + 8
    assert meter.peak.total == sum(meter.peak.by_category.values())
    meter.close()


def test_views_count_once_and_freed_tensors_leave() -> None:
    meter = TensorMeter()
    with meter.phase(0, "forward"):
        a = torch.zeros(256, 256)  # 256 KiB
        b = a.view(-1)  # a view: the same storage, no new bytes
        c = a[:10]
        assert meter.current["activations"] == 256 * 256 * 4
        d = a + 1  # a new storage
        assert meter.current["activations"] == 2 * 256 * 256 * 4
        del d
        assert meter.current["activations"] == 256 * 256 * 4
    del a, b, c
    assert meter.current["activations"] == 0
    assert meter.category_peaks["activations"] == 2 * 256 * 256 * 4
    assert meter.summary()["mem_activations_peak_mib"] == 0.5


def test_a_storage_resized_in_place_counts_its_new_size() -> None:
    """FSDP frees a gathered weight by resizing its storage to nothing and gathers it again
    into the same storage, with no tensor operation the meter could see: the bytes follow."""
    meter = TensorMeter()
    with meter.phase(0, "forward"):
        gathered = torch.zeros(128, 256)  # 128 KiB, counted as an activation
    assert meter.current["activations"] == 128 * 1024
    gathered.untyped_storage().resize_(0)  # freed, the storage object alive
    assert meter.current["activations"] == 0 and meter.category_peaks["activations"] == 128 * 1024
    with meter.phase(0, "backward"):
        gathered.untyped_storage().resize_(128 * 256 * 4)  # gathered again in backward: a temporary
    assert meter.current == {**dict.fromkeys(meter.current, 0), "temporaries": 128 * 1024}
    with meter.phase(0, "forward"):
        empty = torch.empty(0)  # FSDP's all-gather buffers start empty: nothing to count yet
        assert meter.current["activations"] == 0
        empty.untyped_storage().resize_(64 * 4)
    assert meter.current["activations"] == 256
    del empty
    assert meter.current["activations"] == 0
    meter.close()
    gathered.untyped_storage().resize_(0)  # a closed meter is told of nothing
    assert meter.current["temporaries"] == 128 * 1024
    assert torch.UntypedStorage.resize_.__name__ == "resize_"  # torch's own again once no meter is open
