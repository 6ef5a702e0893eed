"""The warm server of stages.common.harness.warm: imports PRELOAD once, then forks a process per
request, which becomes the client's stage process (its arguments, working directory,
environment, umask and standard streams) and writes its pid and, as its last act, its exit
status to the client's status pipe. It serves only its own user (SO_PEERCRED), keeps its
socket 0600, and exits after IDLE seconds (or LMMEM_WARM_IDLE) with nothing running.

    python -m stages.common.harness.warmserver --serve PATH   (started by the client, detached)
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path

from stages.common.core.lifetime import die_with
from stages.common.harness.warm import IDLE, PRELOAD
from stages.common.harness.warmsock import peer_uid

FDS = 4  # the client's standard streams and its status pipe


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(30)
    header, fds, _flags, _addr = socket.recv_fds(conn, 4, FDS, socket.MSG_CMSG_CLOEXEC)
    if len(header) != 4 or len(fds) != FDS:
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
    *streams, status = fds
    for target, fd in enumerate(streams):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as a new interpreter would for its streams
    die_with(int(request["pid"]))  # the client killed: this stage ends too
    os.write(status, f"pid {os.getpid()}\n".encode())
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
    except BaseException:  # an uncaught exception: its traceback, exit 1, as Python does
        traceback.print_exc()
        code = 1
    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined] - non-daemon threads, as at interpreter exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(OSError):
        os.write(status, f"exit {code}\n".encode())  # to the client itself: known even if the server is gone
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
    except Exception:  # a warm-up only: the stages run without it, a little slower
        traceback.print_exc()


def serve(path: Path) -> None:
    """Import PRELOAD, listen at `path`, fork a process per request; exit after IDLE idle seconds."""
    idle = float(os.environ.get("LMMEM_WARM_IDLE", IDLE))
    os.umask(0o077)  # its socket and log: this user's only (each stage gets its client's umask)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # no signal blocked in any stage, whoever started it
    for name in PRELOAD:
        importlib.import_module(name)
    warm_up()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(f".{os.getpid()}.sock")  # no longer than the socket's own name
    listener.bind(str(staging))
    os.chmod(staging, 0o600)
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
    if (uid := peer_uid(conn)) != os.getuid():  # before reading a byte: another user's request runs nothing
        print(f"lmmem warm server: refused a connection from uid {uid} (serves uid {os.getuid()} only)",
              file=sys.stderr, flush=True)
        conn.close()
        return
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


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--serve":
        raise SystemExit("usage: python -m stages.common.harness.warmserver --serve PATH")
    serve(Path(sys.argv[2]))
