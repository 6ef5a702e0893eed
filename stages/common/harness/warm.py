"""A warm interpreter for the torch stages: `python -m stages NAME [options]` runs what
`python -m stages.NAME [options]` runs, in a process forked from a server that imported torch
and transformers once, instead of a new interpreter importing them again for every stage
(2 to 3 s each on 2 cores; the comparison's stages pay it once per configuration).

Why it is built this way: docs/design-notes.md, `stages.common.harness.warm`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from stages.common.harness.warmsock import Unsafe, check_peer, check_socket, key_parts, private_folder

PRELOAD = ["numpy", "yaml", "pydantic", "torch", "torch._subclasses.fake_tensor", "safetensors.torch",
           "transformers", "transformers.models.llama.modeling_llama",
           "transformers.models.gpt2.modeling_gpt2",
           "peft"]
IDLE = 60.0  # seconds the server waits for the next stage before it exits
START_TIMEOUT = 600.0  # seconds a client waits for a new server to import PRELOAD (a slow hour: tens)
LOCK_WAIT = 120.0  # seconds a client waits for another client's start of the server (LMMEM_WARM_WAIT)
# variables the preloaded libraries read as they import: a server is only shared under equal values
ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "ATEN_", "DNNL_", "ONEDNN_", "TORCH",
                "PYTORCH_",
                "CUDA_", "NVIDIA_", "HF_", "TRANSFORMERS_", "PYTHON", "LD_", "MALLOC_", "LMMEM_ALLOCATOR")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PROTOCOL = 2
MAX_SOCKET_PATH = 107  # bytes of a Unix socket's path (sun_path holds 108 with its NUL)


def enabled() -> bool:
    return os.environ.get("LMMEM_WARM", "1") != "0" and hasattr(os, "fork") and hasattr(socket, "send_fds")


def socket_path() -> Path:
    """The server's socket in this user's private folder (Unsafe: no folder to trust, or a path
    longer than a Unix socket's)."""
    path = private_folder() / socket_name()
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise Unsafe(f"the socket path {path} is {len(os.fsencode(path))} bytes, more than a Unix socket's "
                     f"{MAX_SOCKET_PATH}: set LMMEM_WARM_DIR to a shorter folder")
    return path


def socket_name() -> str:
    """The server's socket's name, for this checkout, interpreter, code, these libraries and this
    environment."""
    key = hashlib.sha256(f"{PROTOCOL}\0{key_parts()}".encode())
    for own in (__file__, Path(__file__).with_name("warmsock.py"), Path(__file__).with_name("warmserver.py")):
        key.update(Path(own).read_bytes())
    for name in sorted({m.split(".")[0] for m in PRELOAD}):
        spec = importlib.util.find_spec(name)  # finds the package's files without importing it
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        stat = origin.stat() if origin is not None and origin.exists() else None
        key.update(f"\0{name}\0{origin}\0{stat and (stat.st_mtime_ns, stat.st_size)}".encode())
    for name in sorted(os.environ):
        if name.startswith(ENV_PREFIXES):
            key.update(f"\0{name}={os.environ[name]}".encode())
    return f"warm-{key.hexdigest()[:16]}.sock"


# ---------------------------------------------------------------- the client


class Interrupted(Exception):
    """Ctrl-C or SIGTERM (`sig`) before the stage started: nothing ran."""

    def __init__(self, sig: int) -> None:
        super().__init__(sig)
        self.sig = sig


class _Forwarder:
    """Pass the signals this process gets to the stage's process once its pid is known; before,
    end the wait at once (Interrupted), wherever the client is, but while `holding` (a child
    process being made, which must not be half made): then as soon as it is made."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.held: list[int] | None = None
        for sig in FORWARDED:
            signal.signal(sig, self._handle)

    def _handle(self, sig: int, _frame: object) -> None:
        if self.held is not None:
            self.held.append(sig)
        elif self.pid is None:
            raise Interrupted(sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def started(self, pid: int) -> None:
        self.pid = pid

    @contextlib.contextmanager
    def holding(self):  # a context manager
        """Signals held while the body makes a child process (not a blocked mask: children inherit it)."""
        self.held = []
        try:
            yield
        finally:
            held, self.held = self.held, None
            for sig in held:
                self._handle(sig, None)


def _connect(path: Path) -> socket.socket | None:
    """A connection to the server at `path`, checked to be this user's (Unsafe if not); None: none listens."""
    try:
        check_socket(path)
    except FileNotFoundError:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    try:
        check_peer(conn, path)
    except Unsafe:
        conn.close()
        raise
    return conn


def _server_env() -> dict[str, str]:
    """The client's environment less what marks a stage run (the server runs none itself)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DVC_") and k != "LMMEM_WATCHED"}


def _lock(lock: int, path: Path) -> None:
    """Take the start lock, waiting at most LMMEM_WARM_WAIT seconds (Unsafe after)."""
    wait = float(os.environ.get("LMMEM_WARM_WAIT", LOCK_WAIT))
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise Unsafe(f"another client held the start lock {path}.lock for {wait:g} s") from None
            time.sleep(0.05)


def _start_server(path: Path, forwarder: _Forwarder) -> socket.socket | None:
    """Start a server at `path` (one client at a time: the others wait on the lock, then find it)
    and connect once it listens; None if it died or never listened. A signal meanwhile kills it."""
    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    server: subprocess.Popen[bytes] | None = None
    try:
        _lock(lock, path)
        if (conn := _connect(path)) is not None:
            return conn
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a server that died without removing its socket
        log = os.open(f"{path}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
        with forwarder.holding():
            server = subprocess.Popen([sys.executable, "-m", "stages.common.harness.warmserver", "--serve",
                                       str(path)],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_server_env(),
                                      start_new_session=True, close_fds=True)
        os.close(log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and server.poll() is None:
            if path.exists() and (conn := _connect(path)) is not None:
                server = None  # listening: it serves on
                return conn
            time.sleep(0.05)
        return None
    finally:
        if server is not None and server.poll() is None:
            server.kill()  # interrupted, or never listened: not left importing for nobody
        os.close(lock)


def _send(conn: socket.socket, argv: list[str], status: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask,
                          "pid": os.getpid()}).encode()
    socket.send_fds(conn, [struct.pack("!I", len(request))], [0, 1, 2, status])
    conn.sendall(request)


class _Status:
    """The client's end of the stage's status pipe: `pid N` first, `exit N` as its last act."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer, self.open = fd, b"", True

    def read(self, block: bool) -> None:
        os.set_blocking(self.fd, block)
        try:
            while self.open:
                chunk = os.read(self.fd, 256)
                self.buffer += chunk
                self.open = bool(chunk)
                if block:
                    return
        except BlockingIOError:
            pass

    def word(self, name: str) -> int | None:
        for line in self.buffer.decode(errors="replace").splitlines():
            if line.startswith(f"{name} ") and line.split()[1].lstrip("-").isdigit():
                return int(line.split()[1])
        return None


def _wait_for_pid(status: _Status) -> int | None:
    while status.word("pid") is None and status.open:
        status.read(block=True)
    return status.word("pid")


def _wait_for_end(status: _Status, pid: int, conn: socket.socket) -> tuple[int, bool]:
    """The stage's exit code and whether it ended by its own hand (its status written); killed:
    the server's word (-signal), or -SIGKILL where the server is gone too."""
    try:
        ended = os.pidfd_open(pid)
    except ProcessLookupError:
        ended = None
    try:
        while status.open and ended is not None:
            ready, _, _ = select.select([status.fd, ended], [], [])
            status.read(block=False)
            if ended in ready or status.word("exit") is not None:
                break
        status.read(block=False)
    finally:
        if ended is not None:
            os.close(ended)
    if (code := status.word("exit")) is not None:
        return code, True
    conn.settimeout(5)  # killed: the server that reaped it says how
    with contextlib.suppress(OSError, ValueError, IndexError):
        word, number = conn.recv(64).decode().split()[:2]
        if word == "signal":
            return -int(number), False
    return -signal.SIGKILL, False


def run_warm(path: Path, argv: list[str], forwarder: _Forwarder) -> tuple[int, bool] | None:
    """Run `python -m` argv in a process forked from the server at `path`: its status as a return
    code (negative: killed by that signal) and whether it ended by its own hand; None when no
    server could run it (nothing ran). Unsafe: the server cannot be trusted."""
    for attempt in range(2):  # a server exiting as this client connected: once more, with a new one
        conn = _connect(path) if attempt == 0 else None
        conn = conn or _start_server(path, forwarder)
        if conn is None:
            return None
        read, write = os.pipe()
        status = _Status(read)
        try:
            _send(conn, argv, write)
        except OSError:
            pass
        os.close(write)  # the stage's (and, until it forks, the server's) copy only
        if (pid := _wait_for_pid(status)) is not None:
            break
        os.close(read)
        conn.close()  # refused or gone before forking: nothing ran
    else:
        return None
    with conn:
        forwarder.started(pid)
        try:
            return _wait_for_end(status, pid, conn)
        finally:
            os.close(read)


def run_fresh(argv: list[str], forwarder: _Forwarder) -> int:
    """Run `python -m` argv in a new interpreter; its return code (negative: killed)."""
    # its own process group: a Ctrl-C reaches it once, forwarded, as it reaches a warm stage
    with forwarder.holding():
        process = subprocess.Popen([sys.executable, "-m", *argv], process_group=0)
        forwarder.started(process.pid)
    return process.wait()


def client(argv: list[str]) -> int:
    """`python -m stages NAME [options]`."""
    if not argv or argv[0].startswith("-") or not argv[0].isidentifier():
        print("usage: python -m stages NAME [options]: run stage NAME (python -m stages.NAME) in a process "
              "forked from a warm interpreter (LMMEM_WARM=0: a new one)", file=sys.stderr)
        return 2
    module = f"stages.{argv[0]}"
    if importlib.util.find_spec(module) is None:
        print(f"lmmem: error: no stage {argv[0]!r} (no module {module})", file=sys.stderr)
        return 2
    from stages import WATCHER  # under DVC, started as this process began (stages/__init__.py)

    forwarder = _Forwarder()
    try:
        done = None
        if enabled():
            try:
                path = socket_path()
                done = run_warm(path, [module, *argv[1:]], forwarder)
                why = f"none could be started or reached at {path} (its log: {path}.log)"
            except (Unsafe, OSError) as exc:  # OSError: its folder's files cannot be made or opened
                why = str(exc)
            if done is None:
                print(f"lmmem: warning: no warm server: {why}: {module} runs in a new interpreter",
                      file=sys.stderr)
        code, own = done if done is not None else (run_fresh([module, *argv[1:]], forwarder), True)
    except Interrupted as exc:  # nothing ran: under DVC, the watcher puts back what DVC deleted
        print(f"lmmem: {signal.Signals(exc.sig).name} before stage {argv[0]} started: it did not run",
              file=sys.stderr)
        return 128 + exc.sig
    if WATCHER is not None and own and code >= 0:
        WATCHER.ended()  # the stage ended by its own hand: it restored what a failure needed
    return code if code >= 0 else 128 - code  # killed: the watcher puts its outputs back


if __name__ == "__main__":
    raise SystemExit(client(sys.argv[1:]))
