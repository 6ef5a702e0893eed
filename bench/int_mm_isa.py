"""torch's int8 product on CPU under each oneDNN ISA cap, against exact integer arithmetic.

    python -m bench.int_mm_isa

`base.portable` pins oneDNN's ISA to AVX2 (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA), so that an
AVX-512 CPU runs the kernels an AVX2 one runs. Under a cap below AVX-512 VNNI, oneDNN's int8
kernel adds pairs of u8 × s8 products in int16 (vpmaddubsw), which saturates: `torch._int_mm`
then returns wrong sums. lmmem does not use `torch._int_mm` on CPU (stages.common.weights.quant's
`int8_product` multiplies exactly in fp32 pieces); this bench shows why it must not, on the
machine it runs on: each cap in a fresh process (the variables are read as torch loads),
`torch._int_mm` and lmmem's product against an int64 product, on rows of 127 against values
of 124-127 (large same-sign sums) and on random values.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.common import ROOT
from stages.common.harness.portable import MARK, PINS, cpu_model

CAPS = ["", "SSE41", "AVX2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_AMX"]
PROBE = """
import json, torch
torch.manual_seed(0)
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for name, a, b in (("large same-sign", torch.full((16, 128), 127, dtype=torch.int8),
                    torch.randint(124, 128, (24, 128), dtype=torch.int8)),
                   ("random", torch.randint(-127, 128, (16, 128), dtype=torch.int8),
                    torch.randint(-127, 128, (24, 128), dtype=torch.int8))):
    exact = a.to(torch.int64) @ b.to(torch.int64).t()
    torch_mm = torch._int_mm(a, b.t()).to(torch.int64)
    out[name] = {"a": a, "b": b, "exact": exact, "torch_exact": bool(torch.equal(torch_mm, exact)),
                 "torch_00": int(torch_mm[0, 0]), "exact_00": int(exact[0, 0])}
# lmmem's product after torch's: importing stages pins the kernels (base.portable), and oneDNN
# reads its cap at its first use, not as torch loads
from stages.common.weights.quant import int8_product
for name in ("large same-sign", "random"):
    row = out[name]
    row["lmmem_exact"] = bool(torch.equal(int8_product(row.pop("a"), row.pop("b")), row.pop("exact").float()))
print(json.dumps(out))
"""


def probe(cap: str) -> dict:
    # what this process pinned: not the probe's
    env = {k: v for k, v in os.environ.items() if k not in (*PINS, MARK)}
    if cap:
        env.update(ONEDNN_MAX_CPU_ISA=cap, DNNL_MAX_CPU_ISA=cap)
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    import torch

    print(f"CPU: {cpu_model()}; torch {torch.__version__}\n")
    print("| oneDNN ISA cap | ATen capability | `_int_mm` exact (large same-sign) | `_int_mm` [0, 0] | "
          "exact [0, 0] | `_int_mm` exact (random) | lmmem's `int8_product` exact (both) |")
    print("|---|---|---|---|---|---|---|")
    for cap in CAPS:
        found = probe(cap)
        large, rand = found["large same-sign"], found["random"]
        print(f"| {cap or '(none: the CPU decides)'} | {found['capability']} | "
              f"{'yes' if large['torch_exact'] else 'NO'} "
              f"| {large['torch_00']:,} | {large['exact_00']:,} | {'yes' if rand['torch_exact'] else 'NO'} "
              f"| {'yes' if large['lmmem_exact'] and rand['lmmem_exact'] else 'NO'} |")


if __name__ == "__main__":
    main()
