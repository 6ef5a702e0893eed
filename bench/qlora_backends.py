"""The frozen NF4 base of QLoRA: bitsandbytes' Linear4bit against lmmem's FrozenLinear
(stages.common.weights.frozen), side by side on this CPU, on the default model's block matrices
(128 → 128, 128 → 384, 384 → 128) and a larger one (1024 → 4096).

    python -m bench.qlora_backends [--repeats 20]

Per layer: the resident bytes of the frozen weight, the error of the forward against the
fp32 layer (relative Frobenius norm of the output), the largest difference between the two
backends' outputs, the seconds of forward + backward (the gradient to the input, as QLoRA
needs it) for a batch of 8 × 64 rows, and whether the layer can be made on fake tensors (the
dry run's condition).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from bench.common import machine
from stages.common.weights.frozen import FrozenLinear

SHAPES = [(128, 128), (128, 384), (384, 128), (1024, 4096)]  # (in, out)


def bnb_layer(weight: torch.Tensor) -> torch.nn.Module:
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    return layer.to("cpu")  # bitsandbytes quantizes as the weight moves to its device


def resident(layer: torch.nn.Module) -> int:
    tensors = [*layer.parameters(), *layer.buffers()]
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    if state is not None:  # bitsandbytes keeps the absmax beside the packed weight
        tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def timed(layer: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            x.grad = None
            layer(x).sum().backward()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def fake_ok(make: object, weight: torch.Tensor) -> str:
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode():
            make(torch.empty(weight.shape))  # type: ignore[operator]
        return "yes"
    except Exception as exc:  # the answer is whether it can be made
        return f"no ({type(exc).__name__})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.manual_seed(0)
    print(f"machine: {machine()}; torch {torch.__version__}\n")
    print("| layer (in → out) | fp32 KiB | bnb NF4 KiB | lmmem NF4 KiB | bnb error | lmmem error | "
          "bnb − lmmem max | fp32 ms | bnb ms | lmmem ms | fake tensors: bnb / lmmem |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for in_f, out_f in SHAPES:
        dense = torch.nn.Linear(in_f, out_f, bias=False)
        weight = dense.weight.detach()
        ours, theirs = FrozenLinear(weight, None, "nf4"), bnb_layer(weight)
        x = torch.randn(8 * 64, in_f, requires_grad=True)
        with torch.no_grad():
            ref, a, b = dense(x), theirs(x), ours(x)
        error = [float((y - ref).norm() / ref.norm()) for y in (a, b)]
        ms = [timed(layer, x, args.repeats) * 1000 for layer in (dense, theirs, ours)]
        print(f"| {in_f} → {out_f} | {weight.numel() * 4 / 1024:.1f} | {resident(theirs) / 1024:.1f} | "
              f"{resident(ours) / 1024:.1f} | {error[0]:.4f} | {error[1]:.4f} | "
              f"{float((a - b).abs().max()):.2e} | "
              f"{ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | {fake_ok(bnb_layer, weight)} / "
              f"{fake_ok(lambda w: FrozenLinear(w, None, 'nf4'), weight)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
