"""The technique registry: every memory technique is one module of stages/train/techniques,
found by the registry, and a new module is all it takes to add one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.common.core.errors import StageError
from stages.common.core.params import validate_section
from stages.train import Params
from stages.train.techniques import REGISTRY, all_moves
from tests.conftest import ROOT, tiny_params


def test_every_technique_is_registered_once_with_described_params() -> None:
    names = [t.name for t in REGISTRY]
    assert len(names) == len(set(names))
    assert {"precision", "chunked_loss", "activation_checkpointing", "micro_batching", "torch_optimizers",
            "adamw8bit",
            "adafactor", "sparse_adam", "pruning", "allocator", "distributed"} <= set(names)
    modules = {p.stem for p in (ROOT / "stages" / "train" / "techniques").glob("*.py")} - {"__init__", "base"}
    assert {type(t).__module__.rsplit(".", 1)[1] for t in REGISTRY} == modules  # one module, one technique
    for technique in REGISTRY:
        for name, info in (technique.Fields.model_fields.items() if technique.Fields else []):
            assert info.description, f"{technique.name}.{name} has no description"
            assert name in Params.model_fields  # its fields join the train section


def test_auto_fit_moves_come_cheapest_first_and_each_costs_at_least_one() -> None:
    params = validate_section("train", tiny_params()["train"], Params)  # fp32 AdamW, micro-batch 8 of 8
    moves = all_moves(params)
    costs = [m.cost for m in moves]
    assert costs == sorted(costs) and min(costs) >= 1.0
    assert [m.changes for m in moves] == [
        {"loss_chunk_tokens": 256}, {"precision": "bf16"}, {"mlp_tiles": 4}, {"micro_batch_size": 4},
        {"optimizer": "adamw8bit"},
        {"activation_checkpointing": True}, {"micro_batch_size": 2}, {"micro_batch_size": 1},
        {"optimizer": "adafactor"}]
    distributed = params.model_copy(update={"distributed": params.distributed.model_copy(update={
        "nproc": 2})})
    # sharding changes no number
    assert all_moves(distributed)[0].changes == {"distributed.strategy": "zero1"}


def test_a_technique_refusal_is_one_line_naming_it() -> None:
    with pytest.raises(StageError) as info:
        validate_section("train", {**tiny_params()["train"], "precision": "fp16", "micro_batch_size": 4,
                                   "distributed": {"nproc": 2, "strategy": "fsdp"}}, Params)
    assert str(info.value) == ("params: train: distributed.strategy fsdp: fp16's gradient scaler cannot see "
                               "sharded gradients; use bf16")


EXAMPLE = '''
"""An example technique: a cap on the number of steps, refused above it."""
from typing import Any

from pydantic import Field

from stages.common.core.params import Section
from stages.train.techniques.base import Move, Technique


class Fields(Section):
    example_cap: int = Field(0, ge=0, description="refuse runs longer than this many steps; 0 = no cap")


class Example(Technique):
    name = "example"
    Fields = Fields
    grid = {"example": {"example_cap": 1000}}

    def refuse(self, p: Any) -> str | None:
        if p.example_cap and p.steps > p.example_cap:
            return f"example_cap ({p.example_cap}) is below steps ({p.steps})"
        return None

    def moves(self, p: Any) -> list[Move]:
        return [Move({"example_cap": 0}, 1.0)]


TECHNIQUE = Example()
'''


def test_adding_a_technique_is_one_new_module(tmp_path: Path) -> None:
    """A copy of the code with one more file in stages/train/techniques: its params join the
    train section, its refusal stops a run before it starts, its move and grid entry appear."""
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "stages" / "train" / "techniques" / "example.py").write_text(EXAMPLE, encoding="utf-8")
    params = tmp_path / "params.yaml"
    data = tiny_params()
    data["train"]["example_cap"] = 10  # the tiny profile trains 30 steps
    params.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    probe = ("import json; from stages.train import Params; from stages.train.techniques import REGISTRY, "
             "all_moves; p = Params(); print(json.dumps({'fields': list(Params.model_fields), "
             "'names': [t.name for t in REGISTRY], 'moves': [m.changes for m in all_moves(p)]}))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    seen = json.loads(out.stdout)
    assert "example_cap" in seen["fields"] and seen["names"][-1] == "example"
    assert {"example_cap": 0} in seen["moves"]
    run = subprocess.run([sys.executable, "-m", "stages.train", "--params", str(params), "--out",
                          str(tmp_path / "m"),
                          "--metrics", str(tmp_path / "m.json")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == \
        "lmmem train: error: params: train: example_cap (10) is below steps (30)"
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.json").exists()
