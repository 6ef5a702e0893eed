"""What the tools people use today estimate for the same question, set beside the dry run:
accelerate's `estimate-memory` (its formula, on the same model built on the meta device) and
the activation formula of Korthikanti et al. (2022), eq. 2: s·b·h·(34 + 5·a·s/h) bytes a
layer (16-bit activations, attention scores stored), 2·s·b·h with full recomputation.
(DeepSpeed's estimators are in bench/plan_compare.py: DeepSpeed is not in the lock.)"""

from __future__ import annotations

from typing import Any

MIB = 2**20


def korthikanti_mib(config: Any, sequence: int, batch: int, checkpointed: bool) -> float:
    """Korthikanti et al.'s activations of `batch` sequences, every layer, in MiB."""
    h = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    per_layer = 2 * sequence * batch * h if checkpointed else sequence * batch * h * (
        34 + 5 * heads * sequence / h)
    return per_layer * layers / MIB


def accelerate_mib(model: Any, precision: str) -> dict[str, float]:
    """accelerate's estimate-memory on `model`: its size and its 'Training using Adam' (the
    largest of its four figures, as its table prints it) for fp32 or bf16 training."""
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes

    total, _largest = calculate_maximum_sizes(model)
    usage = estimate_training_usage(total, "float32" if precision == "fp32" else "bfloat16")
    return {"size": total / MIB, "training": max(usage.values()) / MIB}


def others(q: Any) -> dict[str, float]:
    """A training question's figures by accelerate and by Korthikanti et al., in MiB."""
    from stages.plan.catalog import hf_config, meta_model

    config = hf_config(q.arch)
    found = accelerate_mib(meta_model(q.arch), q.train.get("precision", "fp32"))
    return {"accelerate_training_mib": found["training"],
            "korthikanti_activations_mib": korthikanti_mib(config, q.context, q.micro_batch_size,
                                                           bool(q.train.get("activation_checkpointing")))}
