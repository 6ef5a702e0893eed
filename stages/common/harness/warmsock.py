"""The warm server's trust boundary (stages.common.harness.warm): where its socket lives and who may
talk to it.

Why it is built this way: docs/design-notes.md, `stages.common.harness.warmsock`.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import sys
import tempfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[3]  # the folder holding the `stages` package


class Unsafe(Exception):
    """The warm server's folder or socket cannot be trusted: one line saying which and why."""


def _usable_parent(parent: Path) -> str | None:
    """Why another user could move a folder out of `parent` (None: nobody but this user and root
    can): a parent owned by someone else, or writable by others without the sticky bit."""
    try:
        info = os.stat(parent)
    except OSError as exc:
        return f"{parent} cannot be read ({exc.strerror})"
    if info.st_uid not in (os.getuid(), 0):
        return f"{parent} belongs to uid {info.st_uid}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        return f"{parent} is writable by other users without the sticky bit"
    return None


def _base() -> Path:
    """LMMEM_WARM_DIR, else $XDG_RUNTIME_DIR where this user may use it, else the temporary folder."""
    if given := os.environ.get("LMMEM_WARM_DIR"):
        return Path(given)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir() and _usable_parent(Path(runtime)) is None:
        return Path(runtime)
    return Path(tempfile.gettempdir())


def check_folder(folder: Path, uid: int | None = None) -> None:
    """Raise Unsafe unless `folder` is a real folder owned by `uid` (this user) that no other
    user can enter."""
    uid = os.getuid() if uid is None else uid
    try:
        info = os.lstat(folder)
    except OSError as exc:
        raise Unsafe(f"{folder} cannot be read ({exc.strerror})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise Unsafe(f"{folder} is not a folder (a link or a file holds its name)")
    if info.st_uid != uid:
        raise Unsafe(f"{folder} belongs to uid {info.st_uid}, not to this user (uid {uid})")
    if info.st_mode & 0o077:
        raise Unsafe(f"{folder} is open to other users (mode {stat.S_IMODE(info.st_mode):o}, not 700)")


def private_folder() -> Path:
    """This user's folder for the warm server, made if missing; Unsafe when it cannot be trusted."""
    base = _base()
    if (why := _usable_parent(base)) is not None:
        raise Unsafe(f"the warm server's folder cannot live in {base}: {why}")
    folder = base / f"lmmem-{os.getuid()}"
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise Unsafe(f"cannot make {folder} ({exc.strerror})") from None
    check_folder(folder)
    return folder


def key_parts() -> str:
    """What the socket's name is keyed by here: the checkout and the interpreter."""
    return f"{CHECKOUT}\0{os.path.realpath(sys.executable)}\0{sys.prefix}\0{sys.version}"


def check_socket(path: Path, uid: int | None = None) -> None:
    """Raise Unsafe unless `path` is a socket owned by `uid` (this user)."""
    uid = os.getuid() if uid is None else uid
    info = os.lstat(path)
    if not stat.S_ISSOCK(info.st_mode):
        raise Unsafe(f"{path} is not a socket")
    if info.st_uid != uid:
        raise Unsafe(f"{path} belongs to uid {info.st_uid}, not to this user (uid {uid})")


def peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (SO_PEERCRED: pid, uid, gid)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def check_peer(conn: socket.socket, path: Path, uid: int | None = None) -> None:
    """Raise Unsafe unless the process listening at `path` (connected as `conn`) runs as `uid`."""
    uid = os.getuid() if uid is None else uid
    found = peer_uid(conn)
    if found != uid:
        raise Unsafe(f"the process listening at {path} runs as uid {found}, not as this user (uid {uid})")
