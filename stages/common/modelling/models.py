"""The model factory: the language models lmmem trains, built from the `train.model` params.

- llama: transformers' LlamaForCausalLM (Linear layers, RoPE, RMSNorm, SwiGLU). The default:
  its Linear layers are what quantizers and pruners act on.
- gpt2: transformers' GPT2LMHeadModel (Conv1D layers: dynamic quantization skips them).
- lstm: a plain torch LSTM language model, the classical baseline, saved in its own format
  (safetensors + lstm_config.json) with `load_lstm` to read it back.
Every model maps input ids (batch, time) to logits (batch, time, vocab) via `logits_of`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from stages.common.core.params import Section

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # copied into every model folder
LSTM_CONFIG = "lstm_config.json"
LSTM_WEIGHTS = "model.safetensors"


class ModelParams(Section):
    family: Literal["llama", "gpt2", "lstm"] = Field(
        "llama",
        description=("llama: Linear layers, RoPE, SwiGLU (what quantizers act on) | gpt2: Conv1D | lstm: the "
                     "classical baseline"))
    layers: int = Field(
        4, ge=1, le=128,
        description="transformer blocks (or LSTM layers): parameters and activations grow linearly")
    width: int = Field(
        128, ge=8, le=16384, description="hidden size: parameters grow with its square, activations linearly")
    heads: int = Field(
        2, ge=1, le=256, description="attention heads (width must be a multiple); attention scores grow "
                                     "with heads x context^2")
    kv_heads: int = Field(0, ge=0, le=256, description=(
        "key/value heads (llama): 0 = as many as heads (multi-head) | 1 = multi-query | between = "
        "grouped-query (heads must be a multiple): the KV cache and the K/V projections shrink by heads / "
        "kv_heads"))
    ffn_width: int = Field(
        0, ge=0, description="MLP hidden size; 0 = llama 8/3 x width rounded up to 64, gpt2 4 x width")
    context: int = Field(
        128, ge=2, le=65536,
        description="tokens per window: activations grow linearly, attention scores with its square")
    tie_embeddings: bool = Field(
        True, description="share input and output embeddings: one vocab x width matrix instead of two")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="regularisation; > 0 also keeps a dropout mask per layer in memory")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelParams:
        if self.family != "lstm" and self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        if self.kv_heads and self.family != "llama" and self.kv_heads != self.heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) below heads needs family llama ({self.family} has "
                             "one key/value head per head)")
        if self.kv_heads and self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        return self

    def key_value_heads(self) -> int:
        return self.kv_heads or self.heads

    def ffn(self) -> int:
        if self.ffn_width:
            return self.ffn_width
        if self.family == "llama":
            return -(-int(self.width * 8 / 3) // 64) * 64
        return 4 * self.width


class LSTMLanguageModel(nn.Module):
    """Embedding → LSTM → Linear; the output projection shares the embedding when tied."""

    def __init__(self, vocab_size: int, width: int, layers: int, dropout: float = 0.0,
                 tie_embeddings: bool = True, pad_id: int = 0) -> None:
        super().__init__()
        self.config = {"vocab_size": vocab_size, "width": width, "layers": layers, "dropout": dropout,
                       "tie_embeddings": tie_embeddings, "pad_id": pad_id}
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.lstm = nn.LSTM(width, width, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                            batch_first=True)
        self.head = nn.Linear(width, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(input_ids))  # (batch, time, width)
        return self.head(hidden)  # (batch, time, vocab)

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self, str(folder / LSTM_WEIGHTS))  # shared (tied) tensors stored once
        (folder / LSTM_CONFIG).write_text(json.dumps({"family": "lstm", **self.config}, indent=2) + "\n")


def load_lstm(folder: str | Path) -> LSTMLanguageModel:
    """Read an LSTM saved by `LSTMLanguageModel.save_pretrained`."""
    from safetensors.torch import load_model

    folder = Path(folder)
    config = json.loads((folder / LSTM_CONFIG).read_text())
    config.pop("family")
    model = LSTMLanguageModel(**config)
    load_model(model, str(folder / LSTM_WEIGHTS))
    return model


def build_model(p: ModelParams, vocab_size: int, special_ids: dict[str, int]) -> nn.Module:
    """A freshly initialised model (seed torch first for a repeatable initialisation)."""
    if p.family == "lstm":
        return LSTMLanguageModel(vocab_size, p.width, p.layers, p.dropout, p.tie_embeddings,
                                 special_ids["pad"])
    common: dict[str, Any] = {"vocab_size": vocab_size, "tie_word_embeddings": p.tie_embeddings,
                              "bos_token_id": special_ids["bos"], "eos_token_id": special_ids["eos"],
                              "pad_token_id": special_ids["pad"], "use_cache": False}
    if p.family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=p.width, intermediate_size=p.ffn(), num_hidden_layers=p.layers,
                             num_attention_heads=p.heads, num_key_value_heads=p.key_value_heads(),
                             max_position_embeddings=p.context, attention_dropout=p.dropout, **common)
        return LlamaForCausalLM(config)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=p.width, n_layer=p.layers, n_head=p.heads, n_inner=p.ffn(),
                        n_positions=p.context,
                        resid_pdrop=p.dropout, embd_pdrop=p.dropout, attn_pdrop=p.dropout, **common)
    return GPT2LMHeadModel(config)


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, time) ids → (batch, time, vocab) logits, whatever the family."""
    if isinstance(model, LSTMLanguageModel):
        return model(input_ids)
    return model(input_ids=input_ids).logits


def output_head(model: nn.Module) -> nn.Module | None:
    """The layer that maps hidden states to vocabulary logits (tied to the input embedding or
    not), for transformers models and the LSTM baseline alike."""
    if hasattr(model, "get_output_embeddings"):
        return model.get_output_embeddings()
    return getattr(model, "head", None)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters counted once each (tied weights once). `embedding`: every vocabulary- or
    position-sized matrix (input embedding, position embedding, an untied output head)."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    embedding_ids = {id(model.get_input_embeddings().weight)}
    out = output_head(model)
    if out is not None:
        embedding_ids.add(id(out.weight))
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    if wpe is not None:
        embedding_ids.add(id(wpe.weight))
    embedding = sum(unique[i].numel() for i in embedding_ids if i in unique)
    return {"params_total": total, "params_trainable": trainable, "params_embedding": embedding,
            "params_non_embedding": total - embedding}
