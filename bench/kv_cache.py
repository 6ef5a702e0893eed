"""Generation memory by key/value heads: multi-head, grouped-query and multi-query attention
side by side, metered, beside the KV cache's closed form.

    python -m bench.kv_cache [--batch 8] [--context 128] [--prompt 16] [--quantized data/model]

Why it is built this way: docs/design-notes.md, `bench.kv_cache`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

import stages  # noqa: F401 - the pins before torch loads
from bench.common import ROOT, machine
from stages.common.harness.portable import pin_threads
from stages.common.modelling.generation import (kv_cache_bytes, kv_quantization, metered_generation,
                                                ms_per_token)
from stages.common.modelling.models import ModelParams, build_model

SPECIAL = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=19590, help="the default corpus's vocabulary")
    parser.add_argument("--quantized", type=Path,
                        help="a trained model folder: its exact, int8 and int4 caches")
    args = parser.parse_args()
    pin_threads()
    import torch

    if args.quantized:
        return quantized(args)

    model_params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["train"]["model"]
    layouts = [(heads, kv) for heads in (model_params["heads"], 8)
               for kv in sorted({heads, heads // 2, 1}, reverse=True)]
    print(f"machine: {machine()}; batch {args.batch}, context {args.context}, prompt {args.prompt}\n")
    print("| heads | KV heads | attention | peak MiB | weights | KV cache | activations | logits | KV "
          "closed form | KV ÷ multi-head | peak ÷ multi-head |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    reference: dict[int, tuple[float, float]] = {}
    for heads, kv in layouts:
        p = ModelParams.model_validate({**model_params, "heads": heads, "kv_heads": kv, "family": "llama",
                                        "context": max(args.context, model_params["context"])})
        torch.manual_seed(0)
        model = build_model(p, args.vocab, SPECIAL).eval()
        prompt = torch.randint(4, args.vocab, (args.batch, args.prompt))
        point = metered_generation(model, prompt, args.context)
        closed = kv_cache_bytes(model.config, args.batch, args.context, torch.float32) / 2**20
        assert point["kv_cache_end_mib"] == closed, (point["kv_cache_end_mib"], closed)
        kind = "multi-head" if kv == heads else "multi-query" if kv == 1 else "grouped-query"
        reference.setdefault(heads, (point["kv_cache_end_mib"], point["peak_mib"]))
        kv_ref, peak_ref = reference[heads]
        print(f"| {heads} | {kv} | {kind} | {point['peak_mib']:.2f} | {point['weights_mib']:.2f} | "
              f"{point['kv_cache_mib']:.2f} | {point['activations_mib']:.2f} | {point['logits_mib']:.2f} | "
              f"{closed:.3f} | {point['kv_cache_end_mib'] / kv_ref:.3f} | "
              f"{point['peak_mib'] / peak_ref:.3f} |",
              flush=True)
    return 0



def quantized(args: argparse.Namespace) -> int:
    from stages.common.core.schema import TokensMeta, read_typed
    from stages.common.modelling.windows import Windows
    from stages.common.weights.loading import load_model_folder

    tokens = ROOT / "data" / "tokens"
    meta = read_typed(tokens / "meta.json", TokensMeta)
    model = load_model_folder(args.quantized)
    rows = next(iter(Windows(tokens / "validation.bin", meta.dtype, args.context).fixed_batches(1, 16)))
    points = kv_quantization(model, rows, args.batch, args.context, args.prompt, [8, 4])
    exact = points[0]
    print(f"machine: {machine()}; {args.quantized}, batch {args.batch}, context {args.context}\n")
    print("| KV cache | KV MiB metered | closed form | × smaller | peak MiB | perplexity | × exact's | ms / "
          "token | × exact's |")
    print("|---|---|---|---|---|---|---|---|---|")
    base_ms = None
    for p in points:
        ms = ms_per_token(model, rows[:1, :8], args.batch, 16, 5, p["bits"])
        base_ms = base_ms or ms
        print(f"| {p['bits'] or 'exact'} | {p['kv_cache_end_mib']:.4f} | {p['kv_cache_predicted_mib']:.4f} | "
              f"{exact['kv_cache_end_mib'] / p['kv_cache_end_mib']:.2f} | {p['peak_mib']:.2f} | "
              f"{p['ppl']:.3f} | "
              f"{p['ppl'] / exact['ppl']:.5f} | {ms:.2f} | {ms / base_ms:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
