"""Half-precision products through the fp32 kernel: the products that reach the CPU kernel
are fp32 ones, the results keep the half type and agree with the native half kernel to the
rounding of its sums; nothing else is touched."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from stages.common.modelling.halfmath import half_products_in_float


class KernelDtypes(TorchDispatchMode):
    """The dtypes of the first operand of every aten matrix product that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.dtype] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: Any = None) -> Any:
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.seen.append(next(a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2).dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_products_run_as_fp32_and_agree_with_the_half_kernel(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(64, 96).to(dtype), torch.randn(80, 96).to(dtype), torch.randn(80).to(dtype)
    native = F.linear(x, w, b)
    with half_products_in_float(), KernelDtypes() as kernels:
        mine = F.linear(x, w, b)
        product = x @ w.T
        batched = torch.bmm(x[None], w.T[None])
    assert kernels.seen and set(kernels.seen) == {torch.float32}
    assert mine.dtype == product.dtype == batched.dtype == dtype
    with KernelDtypes() as kernels:
        F.linear(x, w, b)
    assert set(kernels.seen) == {dtype}  # outside it, the half kernel
    # both sum in fp32; the half kernel may round the product before it adds the bias: apart by
    # at most two roundings of the terms' magnitude
    scale = x.float().abs() @ w.float().abs().T + b.float().abs()
    assert ((mine.float() - native.float()).abs() <= 2 * torch.finfo(dtype).eps * scale).all()
    assert (mine == native).float().mean() > 0.99


def test_fp32_mixed_and_out_products_are_left_alone() -> None:
    x32, w32 = torch.randn(8, 16), torch.randn(4, 16)
    with half_products_in_float(), KernelDtypes() as kernels:
        F.linear(x32, w32)
        F.linear(x32.bfloat16(), w32.bfloat16()).float()  # widened: fp32 at the kernel
        mixed = torch.randn(8, 16, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError):  # mixed dtypes stay an error, as without the mode
            torch.mm(mixed, w32.T)
        out = torch.empty(8, 4, dtype=torch.bfloat16)
        torch.mm(x32.bfloat16(), w32.T.bfloat16(), out=out)
    # the mixed product reaches the kernel as it is (and fails there), so does the one with out=
    assert kernels.seen == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]


def test_a_bf16_language_model_gives_the_same_loss_under_it() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 300, (4, 32))
    with torch.no_grad():
        native = model(input_ids=ids, labels=ids).loss.item()
        with half_products_in_float(), KernelDtypes() as kernels:
            mine = model(input_ids=ids, labels=ids).loss.item()
    assert kernels.seen and torch.bfloat16 not in kernels.seen
    assert mine == pytest.approx(native, rel=2e-3)  # bf16 activations: 8 bits of mantissa between products
