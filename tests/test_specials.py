"""Special files among a stage's dependencies (stages/common/harness/specials.py): a FIFO, a device, a
socket, or a link to one of them or to outside the repository, refused before DVC hashes
the folder (it would read a FIFO or /dev/zero for ever): by `make repro`'s check, by the
flows' status check, and by ingest, each in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from stages.common.core.errors import StageError
from tests.conftest import ROOT, one_error_line, run_stage

DVC_YAML = {"stages": {"ingest": {"cmd": "true", "deps": ["data/corpus"], "outs": ["data/raw"]}}}


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "data" / "corpus").mkdir(parents=True)
    (root / "data" / "corpus" / "a.txt").write_text("一行\n", encoding="utf-8")
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML), encoding="utf-8")
    return root


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


SPECIALS: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo": (make_fifo, "is a FIFO"),
    "socket": (make_socket, "is a socket"),
    "link to /dev/zero": (lambda p: p.symlink_to("/dev/zero"), "is a link to a character device (/dev/zero)"),
    "link outside": (lambda p: p.symlink_to(ROOT / "README.md"), "is a link to"),
}


def check(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stages.common.harness.specials", *args], cwd=root,
                          capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)


@pytest.mark.parametrize("kind", sorted(SPECIALS))
def test_make_repros_check_refuses_a_special_file_among_the_dependencies(project: Path, kind: str) -> None:
    make, expected = SPECIALS[kind]
    make(project / "data" / "corpus" / "odd")
    done = check(project)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"lmmem: error: {project / 'data' / 'corpus' / 'odd'} {expected}")
    assert line.endswith("DVC would read it for ever when it hashes the dependency; remove it")
    if kind == "link outside":
        assert "outside the repository" in line
    (project / "data" / "corpus" / "odd").unlink()
    assert check(project).returncode == 0  # the regular corpus passes


def test_the_makefile_checks_before_dvc_repro() -> None:
    recipe = (ROOT / "Makefile").read_text(encoding="utf-8").split("\nrepro: setup\n",
                                                                   1)[1].split("\n\n", 1)[0]
    lines = [line.strip() for line in recipe.splitlines()]
    assert lines.index("$(BIN)/python -m stages.common.harness.specials  # a FIFO or device among the "
                       "dependencies: refused before DVC hashes it") < lines.index("$(BIN)/dvc repro")


def test_the_flows_status_check_refuses_before_dvc_hashes(project: Path) -> None:
    from flows.common import stage_plan

    subprocess.run([Path(sys.executable).parent / "dvc", "init", "--no-scm", "-q"], cwd=project, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert stage_plan(project).order == ["ingest"]
    make_fifo(project / "data" / "corpus" / "pipe")
    with pytest.raises(StageError, match=r"data/corpus/pipe is a FIFO: DVC would read it for ever"):
        stage_plan(project)  # returns: DVC's own status would never have


def test_ingest_refuses_a_fifo_in_its_source_and_keeps_its_output(tmp_path: Path, params_file,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"第{i}行的文字\n" for i in range(50)), encoding="utf-8")
    out, metrics = tmp_path / "raw", tmp_path / "ingest.json"
    params = params_file(ingest={"source": str(corpus), "sample": 1.0})
    args = ["--params", str(params), "--out", str(out), "--metrics", str(metrics)]
    assert run_stage("ingest", args) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    metrics.unlink()
    make_fifo(corpus / "pipe")
    capsys.readouterr()
    assert run_stage("ingest", args) == 2
    line = one_error_line(capsys.readouterr().err, "ingest")
    assert f"ingest.source: {corpus / 'pipe'} is a FIFO: DVC would read it for ever" in line
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert not metrics.exists()
