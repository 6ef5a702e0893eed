"""Half-precision products at fp32 speed on CPUs without half-precision arithmetic.

A CPU without AVX-512 BF16 / FP16 (AVX2, most laptops and cloud VMs) multiplies a bf16 or
fp16 matrix by widening every value to fp32, accumulating in fp32 and rounding the result to
the half type, but through a generic kernel: on a 2-core AMD EPYC a bf16 `linear` of 2,048 ×
128 by 128 × 19,590 took 4 to 5 times the fp32 one (docs/BENCHMARKS.md). Inside
`half_products_in_float()` every matrix product whose operands are bf16 or fp16 on the CPU
does the same arithmetic through the fp32 kernel: operands widened (exact), the product in
fp32, the result rounded to the half type. Only the order of the fp32 sums may differ from
the half kernel's, so a figure agrees with the native one to the rounding of that order; the
model's weights and activations stay in their half type between products.

evaluate uses it for quality and the sentiment probe (figures that do not time anything);
the inference memory peak and the latency stay native: the widened copies would count in
the one and speed up the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HALF = (torch.bfloat16, torch.float16)
PRODUCTS: frozenset[Callable[..., Any]] = frozenset({
    F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm,
})


def half_dtype(values: list[Any]) -> torch.dtype | None:
    """The half type every tensor operand on the CPU shares, or None (mixed, fp32, CUDA)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return None
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in HALF else None


class half_products_in_float(TorchFunctionMode):  # used as a context manager
    """Within it, a matrix product of bf16 or fp16 CPU tensors runs as fp32 and is rounded
    back to the operands' type; everything else runs as it is."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in PRODUCTS and "out" not in kwargs:
            dtype = half_dtype([*args, *kwargs.values()])
            if dtype is not None:
                def widen(v: Any) -> Any:
                    return v.float() if isinstance(v, torch.Tensor) else v

                result = func(*map(widen, args), **{k: widen(v) for k, v in kwargs.items()})
                return result.to(dtype)
        return func(*args, **kwargs)
