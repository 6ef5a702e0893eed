"""train: a language model from scratch on data/tokens, each memory technique a unit of the
registry (stages.train.techniques), and what the run held in memory measured category by
category.

The loop (stages.train.loop), top to bottom: sample `batch_size` windows of `context + 1`
token ids from the training split (a seeded generator, so the same params see the same
batches); split them into micro-batches of `micro_batch_size` (gradient accumulation: the
effective batch stays `batch_size`); forward inside every technique's context (autocast for
bf16/fp16); cross-entropy on the next token; backward (recomputing each block's activations
under activation checkpointing); clip; optimizer step with the scheduled learning rate;
gradients freed (`set_to_none`); each technique's step (pruning zeroes the pruned weights
again). The first `meter_steps` optimizer steps run under the tensor meter
(stages.common.memory.tensor_meter) — exact bytes by category, but slower — and throughput is timed on
the steps after them. Before training, the dry run (stages.train.estimate) predicts the same
figures on fake tensors, and a memory budget is checked against it (stages.train.budget).
Every `checkpoint_every` steps the whole state goes to data/checkpoints/train
(stages.train.checkpoint): a killed run started again resumes there and ends with the
same metrics as a run never stopped.

Modules: params (the section), techniques (the registry), build (model, optimizer, scaler),
step (one step, validation), estimate (the dry run), budget (auto-fit), loop (the run),
finish (metrics and outputs), launch (one process or many), identity (the code's
fingerprint).

Outputs: data/model/ (`save_pretrained` in safetensors with the tokenizer, so stock
transformers loads it; the LSTM baseline in its own format), data/plots/train/steps.csv
(loss, learning rate and step time per step) and data/metrics/train.json.
"""

from __future__ import annotations

from typing import Any

from stages.common.core.params import BaseParams
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.harness.stage import stage_main
from stages.train.launch import resolve_device, run
from stages.train.params import Params, Paths

__all__ = ["Params", "Paths", "estimate", "main", "run"]


def estimate(p: Any, paths: Paths, base: BaseParams) -> dict[str, Any]:
    """`python -m stages.train --estimate`: the prediction for params.yaml, without training."""
    from stages.train.estimate import predict_memory

    return predict_memory(p, read_typed(paths.tokens / "meta.json", TokensMeta), resolve_device(base),
                          base.seed)


def main(argv: list[str] | None = None) -> int:
    return stage_main("train", Params, Paths, run, argv, doc=__doc__, estimate=estimate)
