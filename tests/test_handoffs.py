"""Typed hand-offs between stages: the tokens' meta.json and the evaluation's results.json are
each one pydantic model (stages.common.core.schema) that writer and readers share; a missing or
malformed file stops the reader with one line naming the file and the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stages.common.core.errors import StageError
from stages.common.core.eval_results import EvalRow
from stages.common.core.schema import TokensMeta, read_rows, read_typed
from tests.conftest import ROOT, one_error_line, run_stage, tiny_params


def test_the_written_meta_reads_back_typed(tokens: Path) -> None:
    meta = read_typed(tokens / "meta.json", TokensMeta)
    assert meta.dtype == "uint16" and meta.vocab_size == 2533  # the tiny profile
    assert meta.special_ids.pad == 0 and sorted(meta.labels) == ["neg", "pos"]
    raw = json.loads((tokens / "meta.json").read_text())
    assert TokensMeta.model_validate(raw).model_dump(mode="json") == raw  # nothing dropped or added


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("vocab_size"), "field vocab_size: Field required"),
    (lambda m: m.update(dtype="int8"), "field dtype: Input should be 'uint16' or 'uint32'"),
    (lambda m: m["special_ids"].update(eos="x"), "field special_ids.eos: Input should be a valid integer"),
    (lambda m: m.update(extra_key=1), "field extra_key: Extra inputs are not permitted"),
])
def test_a_malformed_meta_names_the_file_and_the_field(tokens: Path, tmp_path: Path, edit: object,
                                                       field: str) -> None:
    broken = tmp_path / "tokens"
    shutil.copytree(tokens, broken)
    meta = json.loads((broken / "meta.json").read_text())
    edit(meta)  # type: ignore[operator]
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StageError) as info:
        read_typed(broken / "meta.json", TokensMeta)
    assert str(info.value).startswith(f"{broken / 'meta.json'}: {field}")
    assert "\n" not in str(info.value)


def test_train_given_a_malformed_meta_stops_in_one_line(tokens: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    broken = tmp_path / "tokens"
    shutil.copytree(tokens, broken)
    meta = json.loads((broken / "meta.json").read_text())
    meta["vocab_size"] = "many"
    (broken / "meta.json").write_text(json.dumps(meta))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(), allow_unicode=True))
    rc = run_stage("train",
                   ["--params", str(params), "--tokens", str(broken), "--out", str(tmp_path / "model"),
                    "--plots", str(tmp_path / "plots"), "--metrics", str(tmp_path / "m.json")])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"{broken / 'meta.json'}: field vocab_size: Input should be a valid integer" in line
    assert not (tmp_path / "model").exists() and not (tmp_path / "m.json").exists()


def test_missing_and_non_json_files_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"missing input .*meta.json: run the stage that makes it first"):
        read_typed(tmp_path / "meta.json", TokensMeta)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(StageError, match=r"meta.json: not a JSON file"):
        read_typed(tmp_path / "meta.json", TokensMeta)


def test_results_rows_are_validated_row_by_row(tmp_path: Path) -> None:
    rows = [{"name": "model", "status": "ok", "val_ppl": 12.5}, {"name": "x", "status": "maybe"}]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    with pytest.raises(StageError) as info:
        read_rows(tmp_path / "results.json", EvalRow)
    assert str(info.value).startswith(f"{tmp_path / 'results.json'}: record 1, field status: Input should be")
    (tmp_path / "results.json").write_text(json.dumps(rows[:1]))
    assert read_rows(tmp_path / "results.json", EvalRow)[0].figures() == rows[0]


def test_the_report_given_malformed_results_stops_in_one_line(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    shutil.copy(ROOT / "data" / "metrics" / "train.json", metrics / "train.json")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps([{"name": "model", "status": "ok",
                                                                 "val_ppl": "low"}]))
    rc = run_stage("report",
                   [f"--metrics-dir={metrics}", f"--eval={tmp_path / 'eval'}", f"--out={tmp_path / 'r'}",
                    f"--metrics={tmp_path / 'r.json'}", "--steps", str(tmp_path / "none.csv"),
                    "--params-file", str(ROOT / "params.yaml")])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, "report")
    assert "results.json: record 0, field val_ppl: Input should be a valid number" in line
    assert not (tmp_path / "r").exists()
