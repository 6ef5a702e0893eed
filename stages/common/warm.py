"""A warm interpreter for the torch stages: `python -m stages NAME [options]` runs what
`python -m stages.NAME [options]` runs, in a process forked from a server that imported torch
and transformers once, instead of a new interpreter importing them again for every stage
(2 to 3 s each on 2 cores; the comparison's stages pay it once per configuration).

Each stage still runs in a process of its own, a fresh fork, so its memory peaks are its own.
Only third-party libraries are preloaded: the project's modules are imported after the fork,
from the working directory, so an edit to a stage takes effect on the next run. The forked
process gets this process's arguments, working directory, environment, umask and standard
streams; its exit status becomes this process's; SIGINT, SIGTERM and SIGHUP sent here are
passed on to it; it ends when this process ends, killed or not.

The server starts on first use, detached, its socket in the temp folder (or LMMEM_WARM_DIR)
under a name hashed from the interpreter, this file, the preloaded libraries' files and the
environment variables they read as they import (a change to any of them gets a new server),
and exits after IDLE seconds (or LMMEM_WARM_IDLE) with nothing running; its own errors go to
the `.log` file beside its socket. `LMMEM_WARM=0` runs each stage in a new interpreter
instead, as does a server that cannot be started or reached (said in a warning).

A forked stage's peak RSS counts the preloaded libraries' pages it touches, not all of them
as a new interpreter's does: its figure is lower by what it never used.

This module imports nothing but the standard library (and stages.common.lifetime, which is
as light): the client's start-up is the saving.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from stages.common.lifetime import die_with

PRELOAD = ["numpy", "yaml", "pydantic", "torch", "torch._subclasses.fake_tensor", "safetensors.torch",
           "transformers", "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2",
           "peft"]
IDLE = 60.0  # seconds the server waits for the next stage before it exits
START_TIMEOUT = 600.0  # seconds a client waits for a new server to import PRELOAD (a slow hour: tens)
# variables the preloaded libraries read as they import: a server is only shared under equal values
ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "ATEN_", "DNNL_", "ONEDNN_", "TORCH", "PYTORCH_",
                "CUDA_", "NVIDIA_", "HF_", "TRANSFORMERS_", "PYTHON", "LD_", "MALLOC_", "LMMEM_ALLOCATOR")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PROTOCOL = 1


def enabled() -> bool:
    return os.environ.get("LMMEM_WARM", "1") != "0" and hasattr(os, "fork") and hasattr(socket, "send_fds")


def socket_path() -> Path:
    """The server's socket for this interpreter, this code, these libraries and this environment."""
    key = hashlib.sha256(f"{PROTOCOL}\0{os.path.realpath(sys.executable)}\0{sys.version}".encode())
    key.update(Path(__file__).read_bytes())
    for name in sorted({m.split(".")[0] for m in PRELOAD}):
        spec = importlib.util.find_spec(name)  # finds the package's files without importing it
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        stat = origin.stat() if origin is not None and origin.exists() else None
        key.update(f"\0{name}\0{origin}\0{stat and (stat.st_mtime_ns, stat.st_size)}".encode())
    for name in sorted(os.environ):
        if name.startswith(ENV_PREFIXES):
            key.update(f"\0{name}={os.environ[name]}".encode())
    folder = Path(os.environ.get("LMMEM_WARM_DIR") or tempfile.gettempdir())
    return folder / f"lmmem-warm-{os.getuid()}-{key.hexdigest()[:16]}.sock"


# ---------------------------------------------------------------- the client


class _Forwarder:
    """Pass the signals this process gets to the stage's process, once its pid is known."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.pending: list[int] = []
        for sig in FORWARDED:
            signal.signal(sig, self._handle)

    def _handle(self, sig: int, _frame: object) -> None:
        if self.pid is None:
            self.pending.append(sig)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def started(self, pid: int) -> None:
        self.pid = pid
        for sig in self.pending:
            self._handle(sig, None)


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        return conn
    except OSError:
        conn.close()
        return None


def _server_env() -> dict[str, str]:
    """The client's environment less what marks a stage run (the server runs none itself)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DVC_") and k != "LMMEM_WATCHED"}


def _start_server(path: Path) -> socket.socket | None:
    """Start a server at `path` (one client at a time: the others wait on the lock, then find it)
    and connect once it listens; None if it died or never listened."""
    try:
        return _start_locked(path)
    except OSError:  # the folder missing or not writable
        return None


def _start_locked(path: Path) -> socket.socket | None:
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)
        if conn is not None:
            return conn
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a server that died without removing its socket
        with open(f"{path}.log", "w") as log:  # the server's own errors, if any
            server = subprocess.Popen([sys.executable, "-m", "stages.common.warm", "--serve", str(path)],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_server_env(),
                                      start_new_session=True, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and server.poll() is None:
            if path.exists() and (conn := _connect(path)) is not None:
                return conn
            time.sleep(0.05)
        return None


def _send(conn: socket.socket, argv: list[str]) -> None:
    umask = os.umask(0)
    os.umask(umask)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask,
                          "pid": os.getpid()}).encode()
    socket.send_fds(conn, [struct.pack("!I", len(request))], [0, 1, 2])
    conn.sendall(request)


def _replies(conn: socket.socket):  # noqa: ANN202 - a generator of (word, number)
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = conn.recv(64)
            if not chunk:
                return
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        word, number = line.decode().split()
        yield word, int(number)


def run_warm(argv: list[str]) -> int | None:
    """Run `python -m` argv in a process forked from the server; its status as a return code
    (negative: killed by that signal), or None when no server could run it (nothing ran)."""
    path = socket_path()
    forwarder = _Forwarder()
    for attempt in range(2):  # a server exiting as this client connected: once more, with a new one
        conn = _connect(path) if attempt == 0 else None
        conn = conn or _start_server(path)
        if conn is None:
            return None
        try:
            _send(conn, argv)
            replies = _replies(conn)
            _, pid = next(replies)
            break
        except (OSError, StopIteration, ValueError):
            conn.close()  # refused or gone before forking: nothing ran
    else:
        return None
    with conn:
        forwarder.started(pid)
        for word, number in replies:
            if word == "exit":
                return number
            if word == "signal":
                return -number
    print(f"lmmem: the warm server ended while stage {argv[0]} (pid {pid}) ran", file=sys.stderr)
    return 1


def run_fresh(argv: list[str]) -> int:
    """Run `python -m` argv in a new interpreter; its return code (negative: killed)."""
    forwarder = _Forwarder()
    # its own process group: a Ctrl-C reaches it once, forwarded, as it reaches a warm stage
    process = subprocess.Popen([sys.executable, "-m", *argv], process_group=0)
    forwarder.started(process.pid)
    return process.wait()


def client(argv: list[str]) -> int:
    """`python -m stages NAME [options]`."""
    if not argv or argv[0].startswith("-") or not argv[0].isidentifier():
        print("usage: python -m stages NAME [options]: run stage NAME (python -m stages.NAME) in a process forked "
              "from a warm interpreter (LMMEM_WARM=0: a new one)", file=sys.stderr)
        return 2
    module = f"stages.{argv[0]}"
    if importlib.util.find_spec(module) is None:
        print(f"lmmem: error: no stage {argv[0]!r} (no module {module})", file=sys.stderr)
        return 2
    code = run_warm([module, *argv[1:]]) if enabled() else None
    if code is None:
        if enabled():
            path = socket_path()
            print(f"lmmem: warning: no warm server at {path} (its log: {path}.log): {module} runs in a new "
                  "interpreter", file=sys.stderr)
        code = run_fresh([module, *argv[1:]])
    from stages import WATCHER  # under DVC, started as this process began (stages/__init__.py)

    if WATCHER is not None and code >= 0:
        WATCHER.ended()  # the stage ended by its own hand: it restored what a failure needed
    return code if code >= 0 else 128 - code  # killed: the watcher puts its outputs back


# ---------------------------------------------------------------- the server


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(30)
    header, fds, _flags, _addr = socket.recv_fds(conn, 4, 3)
    if len(header) != 4 or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("a malformed request")
    (size,) = struct.unpack("!I", header)
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("a truncated request")
        data += chunk
    conn.settimeout(None)
    return json.loads(data), fds


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def _child(request: dict, fds: list[int], server_side: list[socket.socket | int]) -> int:
    """In the forked process: become the client's stage process, run the stage, its exit code."""
    for item in server_side:  # the server's listener, connections and pidfds: not this process's
        with contextlib.suppress(OSError):
            item.close() if isinstance(item, socket.socket) else os.close(item)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as a new interpreter would for its streams
    die_with(int(request["pid"]))  # the client killed: this stage ends too
    os.chdir(request["cwd"])
    os.umask(int(request["umask"]))
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]  # `python -m`: the working directory first
    for name in [m for m in sys.modules if m == "stages" or m.startswith("stages.")]:
        del sys.modules[name]  # the project's code: the client's working tree, imported afresh
    module, *args = request["argv"]
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = _exit_code(exc)
    except KeyboardInterrupt:  # as Python reports it, with the status a shell gives it
        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 - an uncaught exception: its traceback, exit 1, as Python does
        traceback.print_exc()
        code = 1
    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined] - non-daemon threads, as at interpreter exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def warm_up() -> None:
    """A tiny llama's training step on fake tensors before any fork, which each stage's dry run would
    set up itself (0.8 s a stage); no thread starts. Not with CUDA (its backward starts threads)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import LlamaConfig, LlamaForCausalLM
    if torch.backends.cuda.is_built():
        return
    try:
        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2)
        with FakeTensorMode():
            model = LlamaForCausalLM(config)
            optimizer = torch.optim.AdamW(model.parameters())
            ids = torch.zeros(2, 8, dtype=torch.long)
            logits = model(ids).logits
            torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids.reshape(-1)).backward()
            optimizer.step()
    except Exception:  # noqa: BLE001 - a warm-up only: the stages run without it, a little slower
        traceback.print_exc()


def serve(path: Path) -> None:
    """Import PRELOAD, listen at `path`, fork a process per request; exit after IDLE idle seconds."""
    idle = float(os.environ.get("LMMEM_WARM_IDLE", IDLE))
    for name in PRELOAD:
        importlib.import_module(name)
    warm_up()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(f"{path.name}.{os.getpid()}")
    listener.bind(str(staging))
    listener.listen(16)
    os.replace(staging, path)  # clients see the socket only once it listens
    inode = os.stat(path).st_ino
    running: dict[int, tuple[int, socket.socket]] = {}  # pidfd: (pid, the client's connection)
    last = time.monotonic()
    try:
        while running or time.monotonic() - last < idle:
            wait = None if running else max(0.0, idle - (time.monotonic() - last))
            ready, _, _ = select.select([listener, *running], [], [], wait)
            for fd in ready:
                if fd is listener:
                    _accept(listener, running)
                else:
                    pid, conn = running.pop(fd)
                    _, status = os.waitpid(pid, 0)
                    os.close(fd)
                    word = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else \
                        f"exit {os.WEXITSTATUS(status)}"
                    with contextlib.suppress(OSError):
                        conn.sendall(f"{word}\n".encode())
                    conn.close()
                    last = time.monotonic()
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:  # not a newer server's socket at the same name
                path.unlink()
        listener.close()


def _accept(listener: socket.socket, running: dict[int, tuple[int, socket.socket]]) -> None:
    conn, _ = listener.accept()
    try:
        request, fds = _receive(conn)
    except (OSError, ValueError):
        conn.close()
        return
    server_side = [listener, conn, *running, *(c for _, c in running.values())]
    try:
        pid = os.fork()
    except OSError:
        conn.close()
        pid = -1
    if pid == 0:
        code = 1
        try:
            code = _child(request, fds, server_side)
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    if pid < 0:
        return
    running[os.pidfd_open(pid)] = (pid, conn)
    with contextlib.suppress(OSError):
        conn.sendall(f"pid {pid}\n".encode())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]))
    else:
        raise SystemExit(client(sys.argv[1:]))
