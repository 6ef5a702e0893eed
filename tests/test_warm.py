"""`python -m stages NAME`: a stage run in a process forked from a warm interpreter
(stages/common/harness/warm.py). A probe stage in a copy of the stages package reports what its
process sees: whether torch was imported before it, its parent, working directory,
arguments, environment and umask."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROBE = '''"""A probe stage: what its process sees, as JSON on stdout."""
import json, os, sys, time

VERSION = 1
args = sys.argv[1:]
umask = os.umask(0)
os.umask(umask)
print(json.dumps({"torch_preloaded": "torch" in sys.modules, "pid": os.getpid(), "ppid": os.getppid(),
                  "cwd": os.getcwd(), "argv": args, "value": os.environ.get("PROBE_VALUE"), "umask": umask,
                  "name": __name__, "version": VERSION, "file": __file__}), flush=True)
print("probe: to stderr", file=sys.stderr)
if "--log" in args:  # that it started, and as which process
    with open(args[args.index("--log") + 1], "a") as log:
        log.write(f"started {os.getpid()}\\n")
if "--sleep" in args:
    time.sleep(120)
if "--wait-file" in args:  # until the test says go
    deadline = time.monotonic() + 120
    while not os.path.exists(args[args.index("--wait-file") + 1]) and time.monotonic() < deadline:
        time.sleep(0.05)
if "--write" in args:
    with open(args[args.index("--write") + 1], "w") as out:
        out.write(os.environ.get("PROBE_VALUE", ""))
if "--raise" in args:
    raise RuntimeError("probe failed")
sys.exit(int(args[args.index("--code") + 1]) if "--code" in args else 0)
'''
FILES = ["stages/__init__.py", "stages/__main__.py", "stages/common/__init__.py",
         "stages/common/harness/__init__.py",
         "stages/common/core/__init__.py", "stages/common/harness/warm.py",
         "stages/common/harness/warmserver.py", "stages/common/harness/warmsock.py",
         "stages/common/core/lifetime.py", "stages/common/harness/restore.py",
         "stages/common/harness/portable.py",
         "stages/common/harness/malloc.py", "stages/common/core/errors.py"]


@pytest.fixture()
def project(tmp_path: Path) -> Iterator[Path]:
    yield from probe_project(tmp_path)


def probe_project(tmp_path: Path) -> Iterator[Path]:
    """A copy of the stages package with a probe stage; its own server (LMMEM_WARM_DIR), ended after."""
    root = tmp_path / "project"
    for name in FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    (root / "stages" / "probe.py").write_text(PROBE)
    sockets = Path(tempfile.mkdtemp(prefix="lmmem-test-"))  # short: a socket's path has 107 bytes at most
    (tmp_path / "sockets").symlink_to(sockets)
    yield root
    for pid in servers(sockets):
        os.kill(pid, signal.SIGTERM)
    shutil.rmtree(sockets, ignore_errors=True)


def servers(folder: Path) -> list[int]:
    """The warm servers serving sockets in `folder`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--serve" in args and any(a.startswith(str(folder).encode()) for a in args):
            found.append(int(cmdline.parent.name))
    return found


def sockets(project: Path) -> Path:
    return (project.parent / "sockets").resolve()


def env(project: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "LMMEM_WARM_DIR": str(sockets(project)), "PROBE_VALUE": "seen", **extra}


def probe(project: Path, *args: str, **extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    result = subprocess.run([sys.executable, "-m", "stages", "probe", *args], cwd=project,
                            env=env(project, **extra),
                            capture_output=True, text=True, timeout=600, check=False)
    return result, json.loads(result.stdout.splitlines()[0]) if result.stdout else {}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def gone(pid: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def test_a_stage_runs_in_a_fork_of_one_warm_server_with_the_clients_arguments_and_world(
        project: Path) -> None:
    first, seen = probe(project, "--code", "3", "--flag")
    assert first.returncode == 3, first.stderr
    assert seen["torch_preloaded"] is True  # imported by the server before the fork
    logs = list(sockets(project).rglob("*.log"))  # the server's own errors: its warm-up ran clean
    assert logs and all("Traceback" not in log.read_text() for log in logs)
    assert (seen["cwd"], seen["argv"], seen["value"],
            seen["name"]) == (str(project), ["--code", "3", "--flag"],
                              "seen", "__main__")
    assert seen["file"] == str(project / "stages" / "probe.py")
    assert "probe: to stderr" in first.stderr
    server = seen["ppid"]
    assert servers(sockets(project)) == [server]
    second, again = probe(project)
    assert second.returncode == 0 and again["ppid"] == server and again["pid"] != seen["pid"]
    # the umask is the client's
    masked = subprocess.run([sys.executable, "-m", "stages", "probe"], cwd=project, env=env(project),
                            capture_output=True, text=True, timeout=600, check=False, umask=0o027)
    assert json.loads(masked.stdout.splitlines()[0])["umask"] == 0o027


def test_an_edit_to_a_stage_takes_effect_on_the_next_run(project: Path) -> None:
    _, seen = probe(project)
    (project / "stages" / "probe.py").write_text(PROBE.replace("VERSION = 1", "VERSION = 2"))
    _, after = probe(project)
    assert (seen["version"], after["version"]) == (1, 2) and after["ppid"] == seen["ppid"]


def test_lmmem_warm_0_and_an_unusable_socket_folder_run_the_stage_in_a_new_interpreter(project: Path) -> None:
    fresh, seen = probe(project, "--code", "4", LMMEM_WARM="0")
    assert fresh.returncode == 4 and seen["torch_preloaded"] is False and seen["value"] == "seen"
    assert "warning" not in fresh.stderr
    missing, seen = probe(project, LMMEM_WARM_DIR=str(project / "no-such-folder"))
    assert missing.returncode == 0 and seen["torch_preloaded"] is False
    assert missing.stderr.startswith("lmmem: warning: no warm server: the warm server's folder cannot live "
                                     f"in {project / 'no-such-folder'}: ")


def test_an_exception_is_a_traceback_and_exit_1(project: Path) -> None:
    result, _ = probe(project, "--raise")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.rstrip().endswith("RuntimeError: probe failed")


@pytest.mark.parametrize("args, expected", [
    (["nope"], "lmmem: error: no stage 'nope' (no module stages.nope)"),
    ([], "usage: python -m stages NAME [options]"),
])
def test_no_stage_or_an_unknown_one_is_one_line_and_exit_2(project: Path, args: list[str],
                                                           expected: str) -> None:
    result = subprocess.run([sys.executable, "-m", "stages", *args], cwd=project, env=env(project),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and result.stderr.startswith(expected) and len(result.stderr.splitlines(
        )) == 1
    assert servers(sockets(project)) == []  # nothing started for nothing to run


def start_sleeping(project: Path) -> tuple[subprocess.Popen[str], dict]:
    client = subprocess.Popen([sys.executable, "-m", "stages", "probe", "--sleep"], cwd=project,
                              env=env(project),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert client.stdout is not None
    return client, json.loads(client.stdout.readline())


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_a_signal_to_the_client_reaches_the_stage(project: Path, sig: int, code: int) -> None:
    client, seen = start_sleeping(project)
    client.send_signal(sig)
    assert client.wait(timeout=60) == code  # SIGINT: KeyboardInterrupt in the stage; SIGTERM: killed by it
    assert gone(seen["pid"])
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in client.communicate()[1]


def test_the_stage_ends_when_its_client_is_killed(project: Path) -> None:
    client, seen = start_sleeping(project)
    client.kill()
    client.wait(timeout=60)
    assert gone(seen["pid"])
    assert alive(seen["ppid"])  # the server stays for the next stage


def test_the_server_exits_when_idle_and_removes_its_socket(project: Path) -> None:
    _, seen = probe(project, LMMEM_WARM_IDLE="1")
    assert gone(seen["ppid"], seconds=30)
    assert [p.name for p in sockets(project).rglob("*.sock")] == []
    _, again = probe(project, LMMEM_WARM_IDLE="1")  # a new one on the next run
    assert again["torch_preloaded"] is True and again["ppid"] != seen["ppid"]
