"""Loading any model folder lmmem writes: one loader for the trained model, the LSTM
baseline and every compressed variant (what one weighs on disk: artifacts.size_on_disk).

A weight file that no longer matches the digest written with it (stages.common.core.artifacts),
or weights that hold NaN, are refused with the folder named. Nothing is unpickled:
transformers folders load through `from_pretrained` (safetensors), the
LSTM baseline through its own safetensors format, a compressed variant through lmmem's
encoding (stages.common.weights.storage: its dense tensors mapped from the file, as from_pretrained
maps a transformers folder) with its quantized modules rebuilt from the record in
lmmem_variant.json (stages.common.weights.quant).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from stages.common.core.artifacts import check_digests
from stages.common.modelling.models import LSTM_CONFIG, LSTMLanguageModel, load_lstm
from stages.common.weights import quant, storage

VARIANT_FILE = "lmmem_variant.json"  # a model stored by lmmem's own encoding (stages.common.weights.storage)
VARIANT_WEIGHTS = "weights.safetensors"


def load_model_folder(folder: str | Path) -> nn.Module:
    """Any model folder lmmem writes, in eval mode: a transformers folder (stock
    `from_pretrained`), the LSTM baseline's format, or a compressed variant in lmmem's encoding
    (quantized modules rebuilt from the record in lmmem_variant.json, sparse tensors decoded).
    Nothing is unpickled. Raises ValueError naming the folder when it holds no loadable model."""
    folder = Path(folder)
    variant = folder / VARIANT_FILE
    try:
        check_digests(folder, [f.name for f in folder.glob("*.safetensors")])  # flipped bytes: refused
        if variant.is_file():
            record = json.loads(variant.read_text())
            model = _skeleton(folder)
            quant.skeleton(model, record.get("quantized", {}))
            # assign: the parameters become the file's mapped pages, not copies of them
            model.load_state_dict(storage.load_state(folder / VARIANT_WEIGHTS, mapped=True), strict=True,
                                  assign=True)
        elif (folder / LSTM_CONFIG).is_file():
            model = load_lstm(folder)
        elif (folder / "config.json").is_file():
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(folder))
        else:
            raise ValueError("no config.json, lstm_config.json or lmmem_variant.json")
    except Exception as exc:  # whatever the format library raised: one message naming the folder
        raise ValueError(f"{folder}: cannot load a model: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    broken = [name for name, t in model.state_dict().items() if t.is_floating_point()
              and not torch.isfinite(t).all()]
    if broken:  # a damaged file written before digests, or a model trained into NaN
        raise ValueError(f"{folder}: {len(broken)} weight tensors hold NaN or infinite values ({broken[0]}, "
                         "...)")
    return model.eval()


def _skeleton(folder: Path) -> nn.Module:
    """An untrained model of the folder's architecture and dtype, to load weights into."""
    if (folder / LSTM_CONFIG).is_file():
        config = json.loads((folder / LSTM_CONFIG).read_text())
        config.pop("family")
        return LSTMLanguageModel(**config)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    return AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(weights, non-zero weights) of a model, quantized or not: each stored weight once
    (tied ones once); scales and group minima are not weights; a packed int4 byte holds two
    (its zeros are not counted apart)."""
    total = nonzero = 0
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or name.endswith(("scale", "minimum")):
            continue
        seen.add(key)
        if name.endswith("packed"):
            total += 2 * t.numel()
            nonzero += 2 * t.numel()
        else:
            total += t.numel()
            nonzero += int(torch.count_nonzero(t))
    return total, nonzero

