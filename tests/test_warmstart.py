"""warmstart: the vectors train starts from only when asked, and a refusal that keeps the
previous output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import deep_update, one_error_line, run_stage, tiny_params


def warmstart(tmp_path: Path, embed: Path, out: Path, init: bool) -> int:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(deep_update(tiny_params(), {"train": {"init_from_word2vec": init}}),
                                     allow_unicode=True))
    return run_stage("warmstart", ["--params", str(params), "--embed", str(embed), "--out", str(out),
                                   "--metrics", str(tmp_path / "warmstart.json")])


def test_vectors_only_when_train_starts_from_them(tokens: Path, tmp_path: Path) -> None:
    embed = tokens.parent / "embed"
    assert warmstart(tmp_path, embed, tmp_path / "on", True) == 0
    assert np.array_equal(np.load(tmp_path / "on" / "aligned.npy"), np.load(embed / "aligned.npy"))
    assert warmstart(tmp_path, embed, tmp_path / "off", False) == 0
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == [".lmmem-out", "params.json"]


def test_missing_vectors_are_refused_and_the_previous_output_kept(tokens: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ws"
    assert warmstart(tmp_path, tokens.parent / "embed", out, True) == 0
    before = (out / "aligned.npy").read_bytes()
    capsys.readouterr()
    assert warmstart(tmp_path, tmp_path / "no-embed", out, True) == 2
    assert "missing input" in one_error_line(capsys.readouterr().err, "warmstart")
    assert (out / "aligned.npy").read_bytes() == before
