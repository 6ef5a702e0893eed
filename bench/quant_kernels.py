"""Weight-only quantized matmul on this CPU: ATen's packed kernels (what torchao calls on
CPU) against dequantize-then-float-matmul (what stages.common.weights.quant does) and plain fp32,
for the default model's largest layer (the 19,590 × 256 output head) at 1 and 2048 rows.
Its `_int_mm` column is a timing only: under oneDNN capped below AVX-512 VNNI (base.portable
caps it at AVX2) `torch._int_mm` saturates on CPU (python -m bench.int_mm_isa).

    python -m bench.quant_kernels [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import machine, median_ms
from stages.common.weights.quant import Int4Linear, Int8Linear, quantize_int8_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    out_f, in_f, group = 19584, 256, 32  # the int4 kernel wants output features in multiples of 16
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    q8, scale8 = quantize_int8_rows(linear.weight.detach())
    ours8, ours4 = Int8Linear.from_float(linear, dynamic=False), Int4Linear.from_float(linear, group)
    dynamic = Int8Linear.from_float(linear, dynamic=True)
    w = linear.weight.detach()
    groups = w.reshape(out_f, in_f // group, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low).clamp_min(1e-12) / 15
    q4 = torch.round((groups - low) / step).clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
    packed4 = torch._convert_weight_to_int4pack_for_cpu(q4, 1)
    scales_zeros = torch.cat([step, low + 8 * step], dim=-1).transpose(0, 1).contiguous()
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; layer {out_f} × {in_f}\n")
    print("| rows | fp32 ms | ATen int8 kernel ms | dequantize + fp32 (int8) ms | ATen int4 kernel ms | "
          "dequantize + fp32 (int4) ms | dynamic int8 (_int_mm) ms |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for rows in (1, 2048):
            x = torch.randn(rows, in_f)
            cells = [median_ms(lambda: linear(x), args.repeats),
                     median_ms(lambda: torch._weight_int8pack_mm(x, q8, scale8), args.repeats),
                     median_ms(lambda: ours8(x), args.repeats),
                     median_ms(lambda: torch._weight_int4pack_mm_for_cpu(x, packed4, group, scales_zeros),
                               args.repeats),
                     median_ms(lambda: ours4(x), args.repeats),
                     median_ms(lambda: dynamic(x), args.repeats)]
            print(f"| {rows} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
