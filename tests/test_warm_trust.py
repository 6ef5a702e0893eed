"""The warm server's trust boundary (stages/common/harness/warmsock.py) and the paths that must not lose
a stage's status or outputs: a folder only its user can enter, a socket and a listener
checked before the client sends anything, a server that serves only its own user, a start
lock that times out, signals that act at once during a cold start, a server keyed by its
checkout, and each process killed at each phase, run directly and under `dvc repro`.

Where the tests run as root (CI does), a second local user is the system's `nobody`
(uid 65534), running a standard-library script; elsewhere those tests are skipped and the
checks are simulated with another uid given to the check functions."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.common.harness.warmsock import Unsafe, check_folder, check_peer, check_socket
from tests.conftest import GIT_IDENTITY, as_stage
from tests.test_warm import alive, env, gone, probe, probe_project, servers, sockets

NOBODY = 65534


@pytest.fixture()
def project(tmp_path: Path) -> Iterator[Path]:
    yield from probe_project(tmp_path)


def socket_of(project: Path, **extra: str) -> Path:
    """The socket path the project's client would use under env(project, **extra), its folder not made."""
    # the client's pins
    code = as_stage("stages") + "from stages.common.harness.warm import socket_name; print(socket_name())"
    done = subprocess.run([sys.executable, "-c", code], cwd=project, env=env(project, **extra),
                          capture_output=True,
                          text=True, timeout=120, check=True)
    base = Path(extra.get("LMMEM_WARM_DIR") or sockets(project))
    return base / f"lmmem-{os.getuid()}" / done.stdout.strip()


def one_server(project: Path, seconds: float = 120) -> int:
    deadline = time.monotonic() + seconds
    while not (found := servers(sockets(project))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert found, "no server was started"
    return found[0]


def start(project: Path, *args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "stages", "probe", *args], cwd=project,
                            env=env(project, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


# ---------------------------------------------------------------- the folder, the socket, the peer


def test_the_socket_lives_in_a_private_folder_of_its_own_mode_0600(project: Path) -> None:
    result, seen = probe(project)
    assert result.returncode == 0 and seen["torch_preloaded"] is True
    folder = sockets(project) / f"lmmem-{os.getuid()}"
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    (sock,) = folder.glob("*.sock")
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600 and os.lstat(sock).st_uid == os.getuid()
    for other in folder.glob("*.sock.*"):  # its lock and its log
        assert stat.S_IMODE(os.lstat(other).st_mode) & 0o077 == 0, other


def test_the_socket_is_private_whatever_the_umask(project: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "stages", "probe"], cwd=project, env=env(project),
                          capture_output=True, text=True, timeout=600, check=False, umask=0)
    assert done.returncode == 0 and json.loads(done.stdout.splitlines()[0])["umask"] == 0  # the stage's own
    (sock,) = (sockets(project) / f"lmmem-{os.getuid()}").glob("*.sock")
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600


@pytest.mark.parametrize("make, expected", [
    (lambda f: f.mkdir(mode=0o755), "is open to other users (mode 755, not 700)"),
    (lambda f: f.symlink_to(tempfile.mkdtemp()), "is not a folder (a link or a file holds its name)"),
    (lambda f: f.write_text(""), "is not a folder (a link or a file holds its name)"),
])
def test_an_untrusted_folder_is_one_line_and_the_stage_runs_in_a_new_interpreter(project: Path, make,
                                                                                 expected: str) -> None:
    folder = sockets(project) / f"lmmem-{os.getuid()}"
    make(folder)
    os.chmod(folder, 0o755) if folder.is_dir() and not folder.is_symlink() else None
    result, seen = probe(project, "--code", "3")
    assert result.returncode == 3 and seen["torch_preloaded"] is False
    warning = result.stderr.splitlines()[0]
    assert warning == (f"lmmem: warning: no warm server: {folder} {expected}: stages.probe runs in a new "
                       "interpreter")
    assert servers(sockets(project)) == []


def test_a_parent_others_can_rename_in_is_refused(project: Path) -> None:
    os.chmod(sockets(project), 0o777)  # writable by all, no sticky bit: the folder could be swapped
    result, seen = probe(project)
    assert result.returncode == 0 and seen["torch_preloaded"] is False
    assert "is writable by other users without the sticky bit" in result.stderr.splitlines()[0]


def test_the_checks_refuse_another_users_folder_socket_and_listener(tmp_path: Path) -> None:
    """Simulated: the same objects, checked for another uid than their owner's."""
    other = os.getuid() + 1
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    check_folder(folder)
    with pytest.raises(Unsafe, match=f"belongs to uid {os.getuid()}, not to this user \\(uid {other}\\)"):
        check_folder(folder, uid=other)
    path = folder / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    check_socket(path)
    with pytest.raises(Unsafe, match="belongs to uid"):
        check_socket(path, uid=other)
    with pytest.raises(Unsafe, match="is not a socket"):
        check_socket(folder)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(path))
    check_peer(conn, path)
    with pytest.raises(Unsafe, match=f"runs as uid {os.getuid()}, not as this user \\(uid {other}\\)"):
        check_peer(conn, path, uid=other)
    conn.close()
    listener.close()


def test_each_checkout_has_its_own_server(project: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-clone"
    shutil.copytree(project, other)
    assert socket_of(project) != socket_of(other)
    (_, here), (_, there) = probe(project), probe(other)
    assert here["torch_preloaded"] and there["torch_preloaded"] and here["ppid"] != there["ppid"]
    assert there["file"] == str(other / "stages" / "probe.py")


# ---------------------------------------------------------------- the lock and the signals of a cold start


def test_a_start_lock_held_too_long_is_one_line_and_a_new_interpreter(project: Path) -> None:
    path = socket_of(project)
    path.parent.mkdir(mode=0o700)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a start that never ends
        started = time.monotonic()
        result, seen = probe(project, "--code", "5", LMMEM_WARM_WAIT="1")
        assert time.monotonic() - started < 30
    assert result.returncode == 5 and seen["torch_preloaded"] is False
    assert result.stderr.splitlines()[0] == ("lmmem: warning: no warm server: another client held the "
                                             f"start lock {path}.lock for 1 s: stages.probe runs in a new "
                                             "interpreter")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_waiting_for_the_lock_ends_the_client_at_once(project: Path, sig: int) -> None:
    path = socket_of(project)
    path.parent.mkdir(mode=0o700)
    log = project / "runs.log"
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = start(project, "--log", str(log))
        time.sleep(2)  # waiting on the lock by now (LMMEM_WARM_WAIT: 120 s)
        client.send_signal(sig)
        started = time.monotonic()
        assert client.wait(timeout=10) == 128 + sig
        assert time.monotonic() - started < 5
    err = client.communicate()[1]
    assert err.strip() == f"lmmem: {signal.Signals(sig).name} before stage probe started: it did not run"
    assert not log.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_cold_start_ends_the_client_at_once_and_its_server(project: Path, sig: int) -> None:
    log = project / "runs.log"
    client = start(project, "--log", str(log))
    server = one_server(project)  # importing torch: seconds before it listens
    client.send_signal(sig)
    assert client.wait(timeout=10) == 128 + sig
    said = client.communicate()[1].strip()
    assert said == f"lmmem: {signal.Signals(sig).name} before stage probe started: it did not run"
    assert gone(server)  # not left importing for nobody
    assert not log.exists()
    result, seen = probe(project)  # the next run starts one
    assert result.returncode == 0 and seen["torch_preloaded"] is True


def test_a_server_killed_during_its_cold_start_leaves_the_stage_to_a_new_interpreter(project: Path) -> None:
    client = start(project, "--code", "7")
    server = one_server(project)  # importing torch: it never listens
    os.kill(server, signal.SIGKILL)
    out, err = client.communicate(timeout=120)
    assert client.returncode == 7 and json.loads(out.splitlines()[0])["torch_preloaded"] is False
    assert err.startswith("lmmem: warning: no warm server: none could be started or reached at ")


# ---------------------------------------------------------------- killed while the stage runs


def test_a_server_killed_while_its_stage_runs_leaves_the_stage_and_its_status(project: Path) -> None:
    go = project / "go"
    client = start(project, "--wait-file", str(go), "--code", "5")
    assert client.stdout is not None
    seen = json.loads(client.stdout.readline())
    os.kill(seen["ppid"], signal.SIGKILL)
    assert gone(seen["ppid"]) and alive(seen["pid"])
    go.touch()
    assert client.wait(timeout=60) == 5  # the stage's own status, from the stage itself


@pytest.mark.parametrize("server_too", [False, True])
def test_a_stage_killed_outright_is_a_kill_not_an_exit(project: Path, server_too: bool) -> None:
    client = start(project, "--sleep")
    assert client.stdout is not None
    seen = json.loads(client.stdout.readline())
    if server_too:
        os.kill(seen["ppid"], signal.SIGKILL)
        assert gone(seen["ppid"])
    os.kill(seen["pid"], signal.SIGKILL)
    assert client.wait(timeout=60) == 128 + signal.SIGKILL


# ---------------------------------------------------------------- under dvc repro


@pytest.fixture()
def dvc_project(project: Path) -> Path:
    """The probe as a DVC stage writing out.txt (PROBE_VALUE), run once (`first`) and locked."""
    (project / "dvc.yaml").write_text(
        "stages:\n  probe:\n    cmd: python -m stages probe --log runs.log --wait-file go --write out.txt\n"
        "    outs:\n    - out.txt\n", encoding="utf-8")
    (project / "go").touch()
    dvc(project, "init", "--no-scm", "-q")
    assert dvc(project, "repro", PROBE_VALUE="first").returncode == 0
    assert (project / "out.txt").read_text() == "first"
    (project / "go").unlink()
    (project / "runs.log").unlink()
    return project


def dvc(project: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dvc", *args], cwd=project, env=dvc_env(project, **extra), capture_output=True,
                          text=True,
                          timeout=600, check=False)


def dvc_env(project: Path, **extra: str) -> dict[str, str]:
    return {**env(project, **extra), **GIT_IDENTITY, "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def logged_stage(log: Path, seconds: float = 120) -> int:
    """The pid of the stage that wrote "started <pid>" first in its log (the probe's --log)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lines = log.read_text().split() if log.is_file() else []
        if len(lines) >= 2 and lines[0] == "started":
            return int(lines[1])
        time.sleep(0.05)
    raise AssertionError(f"no stage logged its start in {log}")


def client_of(dvc_pid: int, seconds: float = 120) -> int:
    """The `python -m stages probe` process under DVC."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with_args = cmdline.read_bytes().split(b"\0") if cmdline.exists() else []
            if b"stages" in with_args and b"probe" in with_args and b"-m" in with_args:
                return int(cmdline.parent.name)
        time.sleep(0.05)
    raise AssertionError("the stage's client was not seen")


def settled(path: Path, expected: str, seconds: float = 60) -> bool:
    """The watcher restores a moment after DVC reports the failure."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text() == expected:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("kill", ["server", "stage", "server and stage", "client", "client at cold start"])
def test_under_dvc_repro_no_kill_loses_the_outputs(dvc_project: Path, kill: str) -> None:
    project = dvc_project
    if kill == "client at cold start":
        for pid in servers(sockets(project)):
            os.kill(pid, signal.SIGKILL)
            assert gone(pid)
    repro = subprocess.Popen(["dvc", "repro", "-f"], cwd=project, env=dvc_env(project, PROBE_VALUE="second"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = client_of(repro.pid)
    server = one_server(project)
    if kill == "client at cold start":
        os.kill(client, signal.SIGTERM)
    else:
        stage = logged_stage(project / "runs.log")  # not the server's children: one may be an earlier stage's
        deadline = time.monotonic() + 60
        while (project / "out.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # DVC deleted it before running the stage
        if "server" in kill:
            os.kill(server, signal.SIGKILL)
            assert gone(server)
        if "stage" in kill:
            os.kill(stage, signal.SIGKILL)
        if kill == "client":
            os.kill(client, signal.SIGKILL)
        if kill == "server":
            (project / "go").touch()  # the stage goes on to its end
    output = repro.communicate(timeout=300)[0]
    if kill == "server":  # the stage outlived its server: its own status, its own outputs
        assert repro.returncode == 0, output
        assert (project / "out.txt").read_text() == "second"
        return
    assert repro.returncode != 0, output
    assert settled(project / "out.txt", "first"), output  # what DVC deleted, back from its cache
    if kill == "client at cold start":
        assert not (project / "runs.log").exists()  # the stage never ran


# ---------------------------------------------------------------- a second local user (root only)


def nobody_python() -> str | None:
    """An interpreter the user nobody can run (this one may live in root's home)."""
    if os.getuid() != 0:
        return None
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            done = subprocess.run([candidate, "-c", "print(1)"], user=NOBODY, group=NOBODY,
                                  capture_output=True,
                                  text=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return candidate
    return None


NOBODY_PYTHON = nobody_python()
as_second_user = pytest.mark.skipif(NOBODY_PYTHON is None,
                                    reason="a second local user needs root (CI has it)")

LISTEN = '''import os, socket, sys, time
path, log, drop = sys.argv[1], sys.argv[2], sys.argv[3] == "drop"
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
os.chmod(path, 0o777)
if drop:  # bound by root in root's folder, then listening as nobody: its peer credentials are nobody's
    os.setgid(65534); os.setuid(65534)
listener.listen(4)
listener.settimeout(60)
print("listening", flush=True)
while True:
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        break
    conn.settimeout(5)
    received = b""
    try:
        while chunk := conn.recv(65536):
            received += chunk
    except OSError:
        pass
    with open(log, "a") as out:
        out.write(f"connection {len(received)} bytes\\n")
'''

REQUEST = '''import json, os, socket, struct, sys
path, target = sys.argv[1], sys.argv[2]
request = json.dumps({"argv": ["stages.probe", "--write", target], "cwd": os.path.dirname(target),
                      "env": {"PROBE_VALUE": "owned"}, "umask": 0, "pid": os.getpid()}).encode()
read, write = os.pipe()
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(path)
print("connected", flush=True)
conn.settimeout(20)
try:
    socket.send_fds(conn, [struct.pack("!I", len(request))], [0, 1, 2, write])
    conn.sendall(request)
    reply = repr(conn.recv(64))
except OSError as exc:  # closed before the request was read
    reply = type(exc).__name__
os.close(write)
print("reply", reply, "status", repr(os.read(read, 64)), flush=True)
'''


@pytest.fixture()
def shared_tmp() -> Iterator[Path]:
    """A folder like /tmp (1777, sticky) that both users can write in."""
    folder = Path(tempfile.mkdtemp(prefix="lmmem-shared-"))
    os.chmod(folder, 0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def as_nobody(script: str, *args: str, folder: Path) -> subprocess.Popen[str]:
    path = folder / f"script-{time.monotonic_ns()}.py"
    path.write_text(script)
    os.chmod(path, 0o644)
    assert NOBODY_PYTHON is not None
    return subprocess.Popen([NOBODY_PYTHON, str(path), *args], user=NOBODY, group=NOBODY, cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@as_second_user
def test_a_folder_another_user_claimed_first_receives_nothing(project: Path, shared_tmp: Path) -> None:
    """nobody makes the victim's folder name in a shared /tmp and listens at the socket's name:
    the client refuses the folder and sends nothing (no environment, no streams)."""
    path = socket_of(project, LMMEM_WARM_DIR=str(shared_tmp))
    claim = subprocess.run([NOBODY_PYTHON, "-c", f"import os; os.mkdir({str(path.parent)!r}, 0o777)"],
                           user=NOBODY, group=NOBODY, check=True, capture_output=True, timeout=60)
    assert claim.returncode == 0
    log = path.parent / "received.log"
    attacker = as_nobody(LISTEN, str(path), str(log), "keep", folder=shared_tmp)
    assert attacker.stdout is not None and attacker.stdout.readline().strip() == "listening"
    try:
        result, seen = probe(project, "--code", "4", LMMEM_WARM_DIR=str(shared_tmp), SECRET_TOKEN="s3cret")
    finally:
        attacker.kill()
    assert result.returncode == 4 and seen["torch_preloaded"] is False  # ran here, in a new interpreter
    assert result.stderr.splitlines()[0] == (
        f"lmmem: warning: no warm server: {path.parent} belongs to uid {NOBODY}, not to this user (uid 0): "
        "stages.probe runs in a new interpreter")
    assert not log.exists()  # not even a connection


@as_second_user
def test_a_listener_of_another_user_gets_a_connection_and_not_a_byte(project: Path) -> None:
    """A socket in the owner's folder, owned by the owner, but listened on by nobody: the peer
    check refuses it after connecting, before sending."""
    path = socket_of(project)
    path.parent.mkdir(mode=0o700)
    log = Path(tempfile.mkdtemp(prefix="lmmem-log-")) / "received.log"
    os.chmod(log.parent, 0o777)
    attacker = subprocess.Popen([sys.executable, "-c", LISTEN, str(path), str(log), "drop"],
                                stdout=subprocess.PIPE,
                                text=True)
    assert attacker.stdout is not None and attacker.stdout.readline().strip() == "listening"
    try:
        result, seen = probe(project)
    finally:
        attacker.kill()
    assert result.returncode == 0 and seen["torch_preloaded"] is False
    assert result.stderr.splitlines()[0] == (
        f"lmmem: warning: no warm server: the process listening at {path} runs as uid {NOBODY}, not as this "
        "user (uid 0): stages.probe runs in a new interpreter")
    assert log.read_text() == "connection 0 bytes\n"
    shutil.rmtree(log.parent, ignore_errors=True)


@as_second_user
def test_another_user_who_reaches_the_socket_runs_nothing(project: Path, shared_tmp: Path) -> None:
    """The old hole: a socket left open to all (umask 000). Opened here on purpose (folder 0711,
    socket 0666): nobody connects and asks for a stage; the server refuses before reading."""
    result, seen = probe(project)
    assert result.returncode == 0 and seen["torch_preloaded"] is True
    path = socket_of(project)
    os.chmod(sockets(project), 0o711)
    os.chmod(path.parent, 0o711)
    os.chmod(path, 0o666)
    target = shared_tmp / "owned.txt"
    attacker = as_nobody(REQUEST, str(path), str(target), folder=shared_tmp)
    out, err = attacker.communicate(timeout=60)
    connected, replied = out.splitlines()
    assert connected == "connected", err  # it reached the socket
    assert replied in [f"reply {r} status b''" for r in ("b''", "ConnectionResetError",
                                                         "BrokenPipeError")], err
    assert not target.exists()
    assert f"lmmem warm server: refused a connection from uid {NOBODY} (serves uid 0 only)" in \
        Path(f"{path}.log").read_text()
    assert alive(seen["ppid"])  # still serving its own user
    os.chmod(path.parent, 0o700)  # closed again: the client trusts the folder again
    again, after = probe(project)
    assert again.returncode == 0 and after["ppid"] == seen["ppid"]


@as_second_user
def test_another_user_cannot_open_the_start_lock(project: Path) -> None:
    probe(project)
    path = socket_of(project)
    os.chmod(sockets(project), 0o755)  # even with the base open, the private folder is not
    opened = subprocess.run([NOBODY_PYTHON, "-c", f"open({str(path)!r} + '.lock')"], user=NOBODY,
                            group=NOBODY,
                            capture_output=True, text=True, timeout=60, check=False)
    assert opened.returncode != 0 and "PermissionError" in opened.stderr


def test_a_socket_path_too_long_for_unix_is_one_line_and_a_new_interpreter(project: Path) -> None:
    deep = sockets(project) / ("d" * 60) / ("e" * 40)
    deep.mkdir(parents=True)
    result, seen = probe(project, "--code", "6", LMMEM_WARM_DIR=str(deep))
    assert result.returncode == 6 and seen["torch_preloaded"] is False
    warning = result.stderr.splitlines()[0]
    assert warning.startswith("lmmem: warning: no warm server: the socket path "
                              f"{deep}/lmmem-{os.getuid()}/warm-")
    assert warning.endswith("more than a Unix socket's 107: set LMMEM_WARM_DIR to a shorter folder: "
                            "stages.probe runs in a new interpreter")
