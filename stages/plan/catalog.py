"""The architectures the planner knows by name: public shapes as config numbers (no weights),
each with its published parameter count, or any local transformers `config.json`.

The counts are those of the released checkpoints (their model cards and safetensors
indexes), which a model built from these numbers must equal exactly (tests/test_plan.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common.core.errors import StageError


@dataclass(frozen=True)
class Architecture:
    name: str
    model_type: str  # transformers' model_type: llama, mistral, qwen2, gpt2
    config: dict[str, Any]
    published_parameters: int | None = None  # the released checkpoint's count (None: a user's config.json)
    source: str = ""


def _llama(vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv: int, context: int, theta: float,
           tied: bool = False, eps: float = 1e-5) -> dict[str, Any]:
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": context,
            "rope_theta": theta, "rms_norm_eps": eps, "tie_word_embeddings": tied}


CATALOG: dict[str, Architecture] = {a.name: a for a in (
    Architecture("gpt2", "gpt2", {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
                                  "n_head": 12}, 124_439_808, "openai-community/gpt2"),
    Architecture("gpt2-xl", "gpt2", {"vocab_size": 50257, "n_positions": 1024, "n_embd": 1600, "n_layer": 48,
                                     "n_head": 25}, 1_557_611_200, "openai-community/gpt2-xl (1.5B)"),
    Architecture("llama-2-7b", "llama", _llama(32000, 4096, 11008, 32, 32, 32, 4096, 10000.0),
                 6_738_415_616, "meta-llama/Llama-2-7b-hf"),
    Architecture("llama-3-8b", "llama", _llama(128256, 4096, 14336, 32, 32, 8, 8192, 500000.0),
                 8_030_261_248, "meta-llama/Meta-Llama-3-8B"),
    Architecture("llama-3-70b", "llama", _llama(128256, 8192, 28672, 80, 64, 8, 8192, 500000.0),
                 70_553_706_496, "meta-llama/Meta-Llama-3-70B"),
    Architecture("qwen2.5-0.5b", "qwen2", _llama(151936, 896, 4864, 24, 14, 2, 32768, 1000000.0, tied=True,
                                                 eps=1e-6), 494_032_768, "Qwen/Qwen2.5-0.5B"),
    Architecture("qwen2.5-7b", "qwen2", _llama(152064, 3584, 18944, 28, 28, 4, 131072, 1000000.0, eps=1e-6),
                 7_615_616_512, "Qwen/Qwen2.5-7B"),
    Architecture("mistral-7b", "mistral", {**_llama(32000, 4096, 14336, 32, 32, 8, 32768, 10000.0),
                                           "sliding_window": 4096}, 7_241_732_096,
                 "mistralai/Mistral-7B-v0.1"),
)}
FAMILIES = ("llama", "mistral", "qwen2", "gpt2")  # the model types a local config.json may name


def architecture(name: str) -> Architecture:
    """A catalog name, or the path of a local transformers config.json (one line if neither)."""
    if name in CATALOG:
        return CATALOG[name]
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise StageError(f"architecture {name!r}: not in the catalog ({', '.join(CATALOG)}) and no "
                         "config.json there")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") not in FAMILIES:
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise StageError(f"{path}: model_type {kind!r} is not one the planner builds ({', '.join(FAMILIES)})")
    model_type = config.pop("model_type")
    keep = {k: v for k, v in config.items() if not k.startswith("_")
            and k not in ("architectures", "auto_map")}
    named = path.parent.name if path.name == "config.json" else path.stem  # a model folder's, or the file's
    return Architecture(named or str(path), model_type, keep, None, str(path))


def hf_config(arch: Architecture, **overrides: Any) -> Any:
    """The transformers config of `arch` (attention through torch's sdpa, no cache unless asked)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(arch.model_type, **{**arch.config, "use_cache": False, **overrides})


def meta_model(arch: Architecture) -> Any:
    """`arch`'s model on the meta device: its shapes and parameter names, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(arch))
