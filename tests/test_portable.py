"""base.portable: what selects the numeric kernels and the thread counts is pinned in every
stage process before the libraries load, so that another CPU (emulated here by the variables
the libraries would pick by themselves) gives the same bytes; and the machine is recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.portability import compare
from stages.common.harness.portable import MARK, THREADS, has_avx2
from stages.report.provenance import machine_rows, one_blas_list
from tests.conftest import ROOT, as_stage

# a sum whose order depends on the vector width and the thread count (ATen's own reduction)
PROBE = ("import hashlib, os, torch; from stages.common.harness.portable import pin_threads; "
         "torch.set_num_threads(int(os.environ.get('EMULATED_CORES', torch.get_num_threads()))); "
         "pin_threads(); x = torch.randn(2_560_000, generator=torch.Generator().manual_seed(0)); "
         "print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), x.sum().item().hex(), "
         "hashlib.md5(torch.softmax(x.view(-1, 1000), -1).numpy().tobytes()).hexdigest())")


def params_file(tmp_path: Path, portable: bool | None) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    if portable is None:
        del data["base"]["portable"]
    else:
        data["base"]["portable"] = portable
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def in_stage_process(params: Path, code: str, **env: str) -> str:
    """`code` run as a stage's process runs: the stages package imported first, with --params."""
    clean = {k: v for k, v in os.environ.items() if k != MARK and not k.startswith(("ATEN_", "MKL_", "OMP_",
                                                                                    "OPENBLAS_",
                                                                                    "ONEDNN_"))}
    script = as_stage(
        "stages.train") + f"sys.argv = ['-m', '--params', {str(params)!r}]; import stages; {code}"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, check=True, timeout=300)
    return done.stdout.strip()


def test_pins_are_set_before_the_libraries_load_and_taken_back_when_off(tmp_path: Path) -> None:
    show = ("import os, json; print(json.dumps({k: os.environ.get(k) for k in ('ATEN_CPU_CAPABILITY', "
            "'MKL_CBWR', 'OPENBLAS_CORETYPE', 'OMP_NUM_THREADS', 'LMMEM_PORTABLE')}))")
    # the default: on
    on = json.loads(in_stage_process(params_file(tmp_path, None), show, OMP_NUM_THREADS="7"))
    assert on["OMP_NUM_THREADS"] == str(THREADS) and on["LMMEM_PORTABLE"]
    if has_avx2():
        assert (on["ATEN_CPU_CAPABILITY"], on["MKL_CBWR"],
                on["OPENBLAS_CORETYPE"]) == ("avx2", "AVX2,STRICT", "Haswell")
    # off: what a parent process pinned is taken back; a user's own variable is left alone
    off = json.loads(in_stage_process(params_file(tmp_path, False), show,
                                      LMMEM_PORTABLE="MKL_CBWR,OMP_NUM_THREADS",
                                      MKL_CBWR="AVX2,STRICT", OMP_NUM_THREADS="2", OPENBLAS_CORETYPE="Zen"))
    assert off == {"ATEN_CPU_CAPABILITY": None, "MKL_CBWR": None, "OPENBLAS_CORETYPE": "Zen",
                   "OMP_NUM_THREADS": None,
                   "LMMEM_PORTABLE": None}


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_capability() -> str:
    """What ATen picks by itself on this machine, read from the CPU's flags as ATen's dispatcher
    reads them (aten/src/ATen/native/DispatchStub.cpp: AVX-512 needs vl, bw, dq and FMA)."""
    flags = cpu_flags()
    if {"avx512vl", "avx512bw", "avx512dq", "fma"} <= flags:
        return "AVX512"
    return "AVX2" if {"avx2", "fma"} <= flags else "DEFAULT"


@pytest.mark.skipif(not has_avx2(), reason="the pins are AVX2's: this CPU has no AVX2")
def test_an_emulated_other_cpu_gives_other_numbers_unless_portable(tmp_path: Path) -> None:
    """Another CPU emulated by what its libraries would choose by themselves (ATen's capability,
    the threads torch starts with): off, the same computation gives other bytes; on, the same
    bytes (stage_main calls pin_threads once torch is loaded, as PROBE does)."""
    other_cpu = {"ATEN_CPU_CAPABILITY": "default", "EMULATED_CORES": "3"}
    on, off = params_file(tmp_path / "on", True), params_file(tmp_path / "off", False)
    here_off, there_off = in_stage_process(off, PROBE), in_stage_process(off, PROBE, **other_cpu)
    assert here_off.split()[0] == native_capability() and there_off.split()[:2] == ["DEFAULT", "3"]
    assert here_off.split()[2:] != there_off.split()[2:]  # the problem: the same params, other numbers
    here_on, there_on = in_stage_process(on, PROBE), in_stage_process(on, PROBE, **other_cpu)
    assert there_on.split()[:2] == ["AVX2", str(THREADS)]
    assert here_on == there_on  # the fix


def test_the_report_shows_one_machine_or_each_with_its_stages() -> None:
    same = {"train": {"machine_cpu": "A", "machine_portable": True}, "evaluate": {"machine_cpu": "A",
                                                                                  "machine_portable": True}}
    assert machine_rows(same) == [["CPU", "A"], ["numerics pinned", "true"]]
    mixed = {"train": {"machine_cpu": "A"}, "compress": {"machine_cpu": "B"},
             "evaluate": {"machine_cpu": "A"}}
    assert machine_rows(mixed) == [["CPU", "A (train, evaluate); B (compress)"]]
    blas = {"clean": {"machine_blas": "numpy: openblas Haswell"},
            "train": {"machine_blas": "torch: MKL; numpy: openblas Haswell"}, "report": {}}
    assert machine_rows(one_blas_list(blas)) == [["BLAS libraries (selected core, threads)",
                                                  "numpy: openblas Haswell; torch: MKL"]]


def test_portability_compare_names_the_first_stage_that_differs() -> None:
    a = {"stages": {"tokenize": {"data/tokens/a.bin": "1"}, "embed": {"data/embed/v.npy": "2"},
                    "train": {"data/model/w": "3", "data/model/c.json": "4"}}}
    b = {"stages": {"tokenize": {"data/tokens/a.bin": "1"}, "embed": {"data/embed/v.npy": "2"},
                    "train": {"data/model/w": "9", "data/model/c.json": "4"}}}
    assert compare(a, a) == (None, {})
    assert compare(a, b) == ("train", {"train": ["data/model/w"]})
    b["stages"]["embed"] = {}  # a file one side lacks differs too
    assert compare(a, b)[0] == "embed"
