"""Distillation, the compress method that trains: a llama student with fewer blocks of the
teacher's width, trained on loss = alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE
(T the temperature), with the optimizer, schedule and clipping code of training. With
loss_chunk_tokens (the default, 256) the loss runs that many positions at a time and neither
model's logits exist whole (`loss.chunked_distillation`); 0 runs it over all positions at once. With
init_from_teacher the student starts from the teacher's embedding, final norm and evenly
spaced blocks (DistilBERT's initialisation)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm import tqdm

from stages.common.core.params import Section
from stages.common.core.schema import TokensMeta, read_typed
from stages.common.modelling.loss import chunked_distillation, hidden_and_head
from stages.common.modelling.models import ModelParams, build_model
from stages.common.modelling.optim import clip_gradients, lr_at, param_groups, set_lr
from stages.common.modelling.windows import Windows


class Distill(Section):
    method: Literal["distill"]
    layers: int = Field(0, ge=0)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0.0, le=10.0)
    warmup_steps: int = Field(20, ge=0)
    decay: Literal["cosine", "linear", "none"] = "none"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    temperature: float = Field(2.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    init_from_teacher: bool = True
    loss_chunk_tokens: int = Field(256, ge=0)
    base: str = ""

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> Distill:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is more than steps ({self.steps}): "
                             "the learning rate would never reach lr")
        return self


def train_student(teacher: nn.Module, spec: Distill, tokens: Path,
                  seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The trained student (eval mode, KV cache on) and its figures: its blocks and final loss.
    `teacher` is a float llama model; `tokens` the tokenize stage's folder (train windows)."""
    config = teacher.config
    layers = spec.layers or max(1, config.num_hidden_layers // 2)
    meta = read_typed(tokens / "meta.json", TokensMeta)
    context = config.max_position_embeddings
    student_params = ModelParams(family="llama", layers=layers, width=config.hidden_size,
                                 heads=config.num_attention_heads, ffn_width=config.intermediate_size,
                                 context=context, tie_embeddings=config.tie_word_embeddings)
    torch.manual_seed(seed)
    student = build_model(student_params, meta.vocab_size, meta.special_ids.model_dump())
    if spec.init_from_teacher:
        picked = np.linspace(0, config.num_hidden_layers - 1, layers).round().astype(int)
        state = teacher.state_dict()
        own = student.state_dict()
        for key in own:
            source = key
            match = re.match(r"model\.layers\.(\d+)\.(.*)", key)
            if match:
                source = f"model.layers.{picked[int(match.group(1))]}.{match.group(2)}"
            own[key] = state[source].clone()
        student.load_state_dict(own)
    windows = Windows(tokens / "train.bin", meta.dtype, context, meta.vocab_size)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(param_groups(list(student.parameters()), spec.weight_decay), lr=spec.lr)
    teacher.eval()
    student.train()
    t = spec.temperature
    for step in tqdm(range(spec.steps), desc="distill", unit=" steps", mininterval=2):
        set_lr(optimizer, lr_at(step, spec.lr, spec.steps, spec.warmup_steps, spec.decay, spec.min_lr_ratio))
        rows = windows.batch(windows.random_starts(rng, spec.batch_size))
        with torch.no_grad():
            target_hidden, target_head = hidden_and_head(teacher, rows[:, :-1])
        hidden, head = hidden_and_head(student, rows[:, :-1])
        hidden, target_hidden = hidden.reshape(-1, hidden.size(-1)), target_hidden.reshape(
            -1, target_hidden.size(-1))
        loss = chunked_distillation(hidden, head.weight, head.bias, rows[:, 1:].reshape(-1), target_hidden,
                                    target_head, t, spec.alpha, spec.loss_chunk_tokens or hidden.size(0))
        loss.backward()
        if spec.grad_clip:
            clip_gradients(student, spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    student.eval()
    student.config.use_cache = student.generation_config.use_cache = True
    return student, {"student_layers": layers, "final_loss": loss.item()}
