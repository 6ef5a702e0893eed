"""The process's memory allocator, `base.allocator`: glibc's malloc as it comes, glibc tuned,
jemalloc or tcmalloc, for every stage's process and what it starts.

Why it is built this way: docs/design-notes.md, `stages.common.harness.malloc`.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

from stages.common.core.errors import StageError

MARK = "LMMEM_ALLOCATOR"  # the allocator this process was started under, by this module
LIBDIR = "LMMEM_ALLOCATOR_LIBDIR"  # where to find jemalloc and tcmalloc instead of the linker's cache
TUNED = {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": "131072"}
LIBRARIES = {"jemalloc": ("jemalloc", "libjemalloc.so.2", "libjemalloc2"),
             "tcmalloc": ("tcmalloc_minimal", "libtcmalloc_minimal.so.4", "libtcmalloc-minimal4")}
NAMES = ("glibc", "glibc-tuned", "jemalloc", "tcmalloc")


def library(name: str) -> str | None:
    """The preloaded library's file for `name` (jemalloc, tcmalloc): in LMMEM_ALLOCATOR_LIBDIR
    when that is set (a build of one's own, e.g. under /opt), else where the dynamic linker finds
    it; None where it is not there or `name` preloads nothing."""
    if name not in LIBRARIES:
        return None
    link, soname, _ = LIBRARIES[name]
    if os.environ.get(LIBDIR):
        candidates = sorted(Path(os.environ[LIBDIR]).glob(f"lib{link}.so*"))
        return str(candidates[0].resolve()) if candidates else None
    # the linker cache (ldconfig -p): the soname, e.g. libjemalloc.so.2
    found = ctypes.util.find_library(link)
    if found:
        return found
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if (Path(folder) / soname).exists():
            return str(Path(folder) / soname)
    return None


def missing(name: str) -> str | None:
    """Why `name` cannot be used here, in words; None when it can."""
    if name not in LIBRARIES or library(name) is not None:
        return None
    _, soname, package = LIBRARIES[name]
    if os.environ.get(LIBDIR):
        return f"{soname} is not in {LIBDIR}={os.environ[LIBDIR]}"
    return f"{soname} is not installed (Debian and Ubuntu: apt install {package})"


def environment(name: str, env: dict[str, str]) -> dict[str, str]:
    """`env` with `name`'s variables set and those of the allocator it names in MARK (set by a
    parent under another params file) taken back."""
    env = dict(env)
    previous = env.pop(MARK, "glibc")
    if previous == "glibc-tuned":
        for key in TUNED:
            env.pop(key, None)
    elif previous in LIBRARIES:
        kept = [lib for lib in env.get("LD_PRELOAD", "").split() if LIBRARIES[previous][0] not in lib]
        env.pop("LD_PRELOAD", None)
        if kept:
            env["LD_PRELOAD"] = " ".join(kept)
    if name == "glibc-tuned":
        env.update(TUNED)
    elif name in LIBRARIES:
        env["LD_PRELOAD"] = " ".join([library(name) or LIBRARIES[name][1],
                                      *env.get("LD_PRELOAD", "").split()])
    if name != "glibc":
        env[MARK] = name
    return env


def requested(argv: list[str]) -> str:
    """base.allocator of the params file a stage's command line names; glibc when the file or
    key is missing or unreadable (the stage's params loader reports a broken file)."""
    from stages.common.harness.portable import base_setting

    value = base_setting(argv, "allocator", "glibc")
    return value if value in NAMES else "glibc"


def stage_command() -> bool:
    """This interpreter was started as a stage: `python -m stages.<name>` or `python -m stages`."""
    args = [a for i, a in enumerate(sys.orig_argv[1:]) if a not in ("-X", "-W")
            and (i == 0 or sys.orig_argv[i] not in ("-X", "-W"))]  # options with a value: not the module
    for i, arg in enumerate(args):
        if arg == "-m" and i + 1 < len(args):
            return _is_stage(args[i + 1])
        if arg.startswith("-m"):
            return _is_stage(arg[2:])
        if arg == "-c" or not arg.startswith("-"):  # code or a script: not a stage
            return False
    return False


def _is_stage(module: str) -> bool:
    """`stages` (the warm client) or `stages.<name>`; not a helper such as stages.common.harness.warm."""
    return module == "stages" or (module.startswith("stages.") and module.count(".") == 1)


def start_under(name: str) -> None:
    """Execute this stage's interpreter again under `name` when it runs under another one (a
    missing library is left to `check`, which the stage runs and which names it)."""
    current = os.environ.get(MARK, "glibc")
    if current == name or not stage_command() or missing(name):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment(name, dict(os.environ)))


def check(name: str) -> None:
    """Raise StageError, in one line, where this process does not run under `name`."""
    problem = missing(name)
    if problem:
        raise StageError(f"base.allocator {name}: {problem}")
    current = os.environ.get(MARK, "glibc")
    if current != name:
        raise StageError(f"base.allocator {name}: this process started under {current}, and the allocator "
                         "can only change when a process starts: run the stage as `python -m stages.<name>` "
                         "(or under dvc)")
    if name in LIBRARIES and not loaded(name):
        raise StageError(f"base.allocator {name}: {library(name)} is in LD_PRELOAD but did not load")


def mapped(name: str) -> list[str] | None:
    """The files of `name`'s library in this process's memory map; None without /proc to read."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    return sorted({line.split()[-1] for line in maps if f"lib{LIBRARIES[name][0]}" in line})


def loaded(name: str) -> bool:
    """The preloaded library of `name` is in this process's memory map (or there is no map to read)."""
    files = mapped(name)
    return files is None or bool(files)


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


def serving_malloc() -> str | None:
    """The file of the shared object whose `malloc` this process calls (dladdr on the symbol the
    dynamic linker resolved): libc's, or a preloaded allocator's; None where it cannot be read."""
    try:
        process = ctypes.CDLL(None)
        info = _DlInfo()
        address = ctypes.cast(process.malloc, ctypes.c_void_p)
        if not process.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
            return None
        return os.path.basename(info.dli_fname.decode(errors="replace"))
    except (OSError, AttributeError):
        return None


def describe() -> str:
    """This process's allocator for the metrics: its name and tunables, or the library file
    mapped (read from /proc/self/maps), and the object that actually serves malloc when it is
    not the asked allocator's (a user's own LD_PRELOAD, say): said, not hidden."""
    name = os.environ.get(MARK, "glibc")
    if name == "glibc-tuned":
        text = f"{name} ({', '.join(f'{k}={v}' for k, v in TUNED.items())})"
    elif name in LIBRARIES:
        text = f"{name} ({', '.join(mapped(name) or []) or library(name)})"
    else:
        text = name
    serving = serving_malloc()
    expected = f"lib{LIBRARIES[name][0]}" if name in LIBRARIES else "libc."
    if serving is not None and not serving.startswith(expected):
        return f"{text}, but malloc is served by {serving} (LD_PRELOAD={os.environ.get('LD_PRELOAD', '')})"
    return text
