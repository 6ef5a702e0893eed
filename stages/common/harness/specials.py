"""Special files in a stage's dependencies, found before DVC hashes them: DVC reads a FIFO, a
character device or a link to /dev/zero for ever (`dvc status` and `dvc repro` hang; ingest
itself reads only regular files). A FIFO, a device, a socket, or a link that resolves to one
of them or to outside the repository, is refused with one line per file.

    python -m stages.common.harness.specials [PATH ...]   (default: every dependency dvc.yaml names)

`make repro` runs it before `dvc repro`, the flows' status check and ingest call `problems`.
Standard library and PyYAML only.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

WHY = "DVC would read it for ever when it hashes the dependency; remove it"
KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
         (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str | None:
    return next((name for test, name in KINDS if test(mode)), None)


def _entry(path: Path, root: Path) -> str | None:
    """Why `path` (not followed) cannot be a dependency, or None."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if (kind := _kind(info.st_mode)) is not None:
        return f"{path} is {kind}"
    if not stat.S_ISLNK(info.st_mode):
        return None
    target = Path(os.path.realpath(path))
    try:
        followed = os.stat(target)
    except OSError:
        return None  # a link to nothing: DVC names it itself
    if (kind := _kind(followed.st_mode)) is not None:
        return f"{path} is a link to {kind} ({target})"
    if not target.is_relative_to(root):
        return f"{path} is a link to {target}, outside the repository {root}"
    return None


def problems(paths: list[Path], root: Path) -> list[str]:
    """Every special file in `paths` (files or folders, walked without following links)."""
    root = Path(os.path.realpath(root))
    found: list[str] = []
    for path in paths:
        if (why := _entry(path, root)) is not None:
            found.append(why)
            continue
        if path.is_dir() and not path.is_symlink():
            for folder, dirs, files in os.walk(path):
                for name in sorted(dirs + files):
                    if (why := _entry(Path(folder) / name, root)) is not None:
                        found.append(why)
    return found


def dvc_dependencies(root: Path) -> list[Path]:
    """The paths dvc.yaml's stages name as dependencies (a foreach's too; templated ones left out)."""
    import yaml

    stages = (yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
    found: set[str] = set()
    for spec in stages.values():
        spec = spec.get("do", spec) if isinstance(spec, dict) else {}
        found |= {d for d in spec.get("deps") or [] if isinstance(d, str) and "${" not in d}
    return [root / d for d in sorted(found) if (root / d).exists() or (root / d).is_symlink()]


def refusal(found: list[str]) -> str:
    return (f"{found[0]}: {WHY}"
            + (f" (and {len(found) - 1} more: python -m stages.common.harness.specials)" if len(found) > 1
               else ""))


def main(argv: list[str]) -> int:
    root = Path.cwd()
    if not argv and not (root / "dvc.yaml").is_file():
        print("usage: python -m stages.common.harness.specials [PATH ...] (default: dvc.yaml's dependencies)",
              file=sys.stderr)
        return 2
    found = problems([Path(a) for a in argv] if argv else dvc_dependencies(root), root)
    for why in found:
        print(f"lmmem: error: {why}: {WHY}", file=sys.stderr)
    return 2 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
