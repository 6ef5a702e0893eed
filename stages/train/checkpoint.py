"""Training checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint is a folder written atomically (beside the old one, then renamed), holding
- model.safetensors: the weights (tied tensors stored once);
- extra.safetensors: other tensors of the run's state (pruning masks), when it has any;
- optimizer.pt, scaler.pt, torch_rng.pt: tensors only, read back with weights_only=True;
- state.json: the step reached, the data sampler's generator state, the per-step records
  and the memory figures metered so far, the fingerprint of the params and data it
  belongs to, and a digest of the step and every other file. A checkpoint whose fingerprint
  differs from the run's is not resumed; one that cannot be read or whose files do not match
  its digest (truncated, damaged, edited) is set aside as latest.corrupt-<id> with a
  warning, and training starts afresh.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from stages.common.core.artifacts import OWNER_FILE, atomic_dir, dumps, read_json, write_json

log = logging.getLogger("lmmem.checkpoint")

LATEST = "latest"


def fingerprint(*parts: Any) -> str:
    """A stable hash of the params and data identity a checkpoint is valid for."""
    return hashlib.sha256(dumps(parts).encode("utf-8")).hexdigest()[:16]


def save(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler, state: dict[str, Any],
         extra: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file, save_model

    latest = folder / LATEST
    if (latest / "state.json").is_file() and not (latest / OWNER_FILE).is_file():
        write_json(latest / OWNER_FILE, {"writer": "train"})  # a checkpoint saved before owner files
    with atomic_dir(latest, "train") as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        if extra:
            save_file({k: v.contiguous() for k, v in extra.items()}, str(tmp / "extra.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(torch.get_rng_state(), tmp / "torch_rng.pt")
        write_json(tmp / "state.json", {**state, "digest": content_digest(tmp, state["step"])})


def content_digest(folder: Path, step: int) -> str:
    """A hash of the step and of every checkpoint file but state.json (streamed)."""
    digest = hashlib.blake2b(str(step).encode(), digest_size=16)
    for path in sorted(folder.iterdir()):
        if path.name not in ("state.json", OWNER_FILE):
            digest.update(path.name.encode())
            with path.open("rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
    return digest.hexdigest()


def set_aside(latest: Path, why: object) -> None:
    """Move an unusable checkpoint out of the way (kept for a look, never deleted)."""
    aside = latest.with_name(f"{LATEST}.corrupt-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(latest, aside)
    except FileNotFoundError:  # another rank did it
        return
    log.warning("checkpoint %s is unusable (%s): set aside as %s; training starts afresh", latest, why,
                aside.name)


def peek(folder: Path, expected: str) -> int | None:
    """The step of the latest checkpoint when it belongs to this fingerprint, else None."""
    latest = folder / LATEST
    if not (latest / "state.json").is_file():
        return None
    try:
        state = read_json(latest / "state.json")
        if state.get("fingerprint") != expected:
            log.info("checkpoint in %s belongs to other params, data or code: starting afresh", latest)
            return None
        if state.get("digest") != content_digest(latest, state["step"]):
            raise ValueError("its files or step do not match the digest in its state.json")
        return int(state["step"])
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        set_aside(latest, exc)
        return None


def load(folder: Path, expected: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler) -> dict[str, Any] | None:
    """Restore the latest checkpoint into model, optimizer and scaler; None when there is none
    for this fingerprint. The returned state holds the extra tensors under "extra"."""
    from safetensors.torch import load_file, load_model

    latest = folder / LATEST
    if not (latest / "state.json").is_file():
        return None
    state = read_json(latest / "state.json")
    if state.get("fingerprint") != expected:
        log.info("checkpoint in %s belongs to other params, data or code: starting afresh", latest)
        return None
    # peek has checked every file against the digest saved with them: they read back whole
    load_model(model, str(latest / "model.safetensors"))
    optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
    scaler.load_state_dict(torch.load(latest / "scaler.pt", weights_only=True))
    torch.set_rng_state(torch.load(latest / "torch_rng.pt", weights_only=True))
    extra = latest / "extra.safetensors"
    state["extra"] = load_file(str(extra)) if extra.is_file() else {}
    log.info("resuming from the checkpoint at step %d", state["step"])
    return state
