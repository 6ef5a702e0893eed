"""Pruned weights at run time: decoded dense (as loaded today), kept as a bitmask and values
(stages/common/weights/sparse.py), or in torch's CSR layout, side by side on the committed pruned
variants.

    python -m bench.sparse_runtime [--compressed data/compressed] [--variants prune50 prune50-all]
                                   [--tokens data/tokens] [--context 128] [--repeats 5]

Per variant: the weights' bytes in each layout (the matrices the bitmask pays for in CSR, with
torch's int64 indices and with int32 ones, the rest dense), and for dense and bitmask: the tensor peak of one
forward pass of one sequence of `context` tokens, one sequence's generation peak (a 16-token prompt to
`context` tokens, KV cache), the logits' largest difference, and ms per generated token at batch 1 (median of
`repeats`). Then one matrix of each kind (a block projection, the output head) timed as a
product in the three layouts. Last, whether torch's 2:4 semi-structured sparsity runs here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import stages  # noqa: F401 - the pins before torch loads
from bench.common import machine, median_ms
from stages.common.harness.portable import pin_threads


def csr_bytes(weight: Any, index_bytes: int) -> int:
    """torch's CSR layout of a matrix: values, a column index per value, a row offset per row."""
    nnz = int((weight != 0).sum())
    return nnz * (weight.element_size() + index_bytes) + (weight.shape[0] + 1) * index_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compressed", type=Path, default=Path("data/compressed"))
    parser.add_argument("--variants", nargs="+", default=["prune50", "prune50-all"])
    parser.add_argument("--tokens", type=Path, default=Path("data/tokens"))
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pin_threads()
    import torch

    from stages.common.core.schema import TokensMeta, read_typed
    from stages.common.modelling.generation import forward_peak, metered_generation, ms_per_token
    from stages.common.modelling.windows import Windows
    from stages.common.weights.loading import load_model_folder
    from stages.common.weights.sparse import BitmaskMatrix, pays, sparsify

    meta = read_typed(args.tokens / "meta.json", TokensMeta)
    rows = next(iter(Windows(args.tokens / "validation.bin", meta.dtype, args.context).fixed_batches(1, 1)))
    one, prompt = rows[:, :-1], rows[:, :16]
    print(f"machine: {machine()}; one sequence of {args.context} tokens\n")
    print("| variant | layout | weights MiB | forward peak MiB | generation peak MiB | × dense | logit diff "
          "| ms / token |")
    print("|---|---|---|---|---|---|---|---|")
    kept: dict[str, torch.nn.Module] = {}
    for name in args.variants:
        model = load_model_folder(args.compressed / name)
        matrices = {m.weight.untyped_storage().data_ptr(): m.weight for m in model.modules()
                    if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
        dense_summary, dense_logits = forward_peak(model, one)
        dense_generation = metered_generation(model, prompt, args.context)["peak_mib"]
        dense_ms = ms_per_token(model, rows[:, :8], 1, 16, args.repeats)
        print(f"| {name} | dense | {dense_summary['parameters_peak_mib']:.2f} | "
              f"{dense_summary['total_peak_mib']:.2f} | "
              f"{dense_generation:.2f} | 1.000 | 0 | {dense_ms:.2f} |", flush=True)
        paying = {key: w for key, w in matrices.items() if pays(w)}
        others = sum(p.numel() * p.element_size() for p in model.parameters()) - \
            sum(w.numel() * w.element_size() for w in paying.values())  # dense in every layout
        for label, index_bytes in (("CSR, int64 indices (torch)", 8), ("CSR, int32 indices", 4)):
            # the same matrices as CSR
            held = others + sum(csr_bytes(w, index_bytes) for w in paying.values())
            print(f"| {name} | {label} | {held / 2**20:.2f} | – | – | – | – | – |")
        found = sparsify(model)
        summary, logits = forward_peak(model, one)
        generation = metered_generation(model, prompt, args.context)["peak_mib"]
        ms = ms_per_token(model, rows[:, :8], 1, 16, args.repeats)
        print(f"| {name} | bitmask + values ({found['swapped']} modules) | "
              f"{summary['parameters_peak_mib']:.2f} | "
              f"{summary['total_peak_mib']:.2f} | {generation:.2f} | {generation / dense_generation:.3f} | "
              f"{(logits - dense_logits).abs().max().item():.1e} | {ms:.2f} |", flush=True)
        kept[name] = model

    print("\nOne product, ms (median): x of one sequence × the matrix, each layout")
    print("\n| matrix | shape | zeros | dense | bitmask + values | CSR (torch.sparse.mm) |")
    print("|---|---|---|---|---|---|")
    model = kept[args.variants[-1]]
    for label, module in (("MLP up projection", model.model.layers[0].mlp.up_proj),
                          ("output head", model.lm_head)):
        matrix: BitmaskMatrix = module.matrix
        weight = matrix.dense()
        csr = weight.to_sparse_csr()
        xs = torch.randn(args.context, weight.shape[1])
        zeros = 1 - int((weight != 0).sum()) / weight.numel()
        print(f"| {label} | {tuple(weight.shape)} | {zeros:.2f} | "
              f"{median_ms(lambda: xs @ weight.T, args.repeats):.3f} | "
              f"{median_ms(lambda: module(xs), args.repeats):.3f} | "
              f"{median_ms(lambda: torch.sparse.mm(csr, xs.T), args.repeats):.3f} |", flush=True)
    try:
        from torch.sparse import to_sparse_semi_structured

        to_sparse_semi_structured(torch.zeros(128, 128))
        semi = "ran"
    except Exception as exc:  # the answer is the message
        semi = f"refused: {str(exc).splitlines()[0][:160]}"
    print(f"\n2:4 semi-structured (torch.sparse.to_sparse_semi_structured) on this CPU: {semi}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
