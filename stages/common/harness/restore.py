"""Under `dvc repro`, a stage that fails puts back the outputs DVC deleted before it ran.

Why it is built this way: docs/design-notes.md, `stages.common.harness.restore`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("lmmem")


def under_dvc(name: str) -> bool:
    """This process is the command of stage `name` run by DVC (not a worker it launched); for
    a foreach stage, of one of its items (DVC_STAGE compare@bf16 for compare)."""
    stage = os.environ.get("DVC_STAGE", "")
    return (stage == name or stage.startswith(f"{name}@")) and "RANK" not in os.environ


def _recorded_outs(lock: Path, stage: str) -> list[dict[str, Any]]:
    try:
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return []
    entry = stages.get(stage) if isinstance(stages, dict) else None
    outs = entry.get("outs", []) if isinstance(entry, dict) else []
    return [out for out in outs if isinstance(out, dict) and out.get("path") and out.get("md5")]


def _persisted(root: Path, stage: str) -> set[str]:
    """The outputs dvc.yaml marks `persist: true` for `stage`: DVC leaves them in place while
    the stage runs and keeps no copy in its cache (the report's), so there is nothing to put back."""
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return set()
    spec = stages.get(stage) if isinstance(stages, dict) else None
    if not isinstance(spec, dict):
        return set()
    found: set[str] = set()
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind) or []:
            if isinstance(entry, dict):
                found |= {path for path, opts in entry.items() if isinstance(opts, dict)
                          and opts.get("persist")}
    return found


def _md5(path: Path) -> str:
    """Not artifacts.file_digest: this module is imported before the stage's imports to start its
    watcher, and artifacts' pydantic import there delayed the watcher enough that a kill in
    that window went unwatched (the e2e kill test failed)."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Cache:
    """DVC's local cache of this repository (the 3.x `files/md5` objects)."""

    def __init__(self, root: Path) -> None:
        from dvc.repo import Repo  # imported only when something is to be restored

        with Repo(str(root)) as repo:
            self.path = Path(repo.cache.local.path)

    def object(self, oid: str) -> Path:
        return self.path / oid[:2] / oid[2:]

    def copy(self, oid: str, dest: Path) -> None:
        """Copy object `oid` to `dest`, checking its MD5; a missing or altered object raises."""
        source = self.object(oid)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        if _md5(dest) != oid:
            raise ValueError(f"DVC's cache object {source} does not match its MD5")


def _build(cache: _Cache, out: dict[str, Any], tmp: Path) -> int:
    """Write output `out` (a file, or a folder from its .dir manifest) at `tmp`; its file count."""
    oid = str(out["md5"])
    if not oid.endswith(".dir"):
        cache.copy(oid, tmp)
        return 1
    manifest = json.loads(cache.object(oid).read_text(encoding="utf-8"))
    tmp.mkdir()
    for entry in manifest:
        relpath = Path(entry["relpath"])
        if relpath.is_absolute() or ".." in relpath.parts:
            raise ValueError(f"DVC's manifest {oid} names a path outside the folder: {relpath}")
        cache.copy(entry["md5"], tmp / relpath)
    return len(manifest)


def _swap_in(tmp: Path, target: Path) -> None:
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def restore_previous(stage: str, root: Path | None = None) -> tuple[list[str], list[str]]:
    """Put back every output dvc.lock records for `stage` (paths relative to `root`, the
    folder of dvc.yaml, default the working directory) from DVC's cache. Returns the paths
    restored and those that could not be, each with why."""
    root = Path(root or Path.cwd())
    persisted = _persisted(root, stage)
    outs = [out for out in _recorded_outs(root / "dvc.lock", stage) if out["path"] not in persisted]
    if not outs:
        return [], []
    restored: list[str] = []
    failed: list[str] = []
    try:
        cache = _Cache(root)
    except Exception as exc:  # no DVC repository here: nothing can be restored
        return [], [f"{out['path']} (no DVC cache: {exc})" for out in outs]
    for out in outs:
        target = root / str(out["path"])
        if out.get("hash") != "md5":
            failed.append(f"{out['path']} (recorded by DVC 2: run dvc checkout)")
            continue
        tmp = target.parent / f".{target.name}.tmp-restore-{uuid.uuid4().hex[:8]}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            files = _build(cache, out, tmp)
            _swap_in(tmp, target)
            restored.append(f"{out['path']} ({files} file{'s' if files != 1 else ''})")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            reason = "not in DVC's cache" if isinstance(exc, FileNotFoundError) else str(exc)
            failed.append(f"{out['path']} ({reason})")
    return restored, failed


def put_back(stage: str) -> None:
    """stage_main's failure path under DVC: restore, and say what was and was not restored."""
    restored, failed = restore_previous(stage)
    if restored:
        log.warning("%s failed: the previous outputs dvc.lock records are back: %s", stage,
                    ", ".join(restored))
    if failed:
        log.warning("%s failed: could not restore %s", stage, "; ".join(failed))


class Watcher:
    """The stage's side of the watcher: `ended()` tells it the stage ended by its own hand
    (it restored whatever needed restoring itself)."""

    def __init__(self, stage: str) -> None:
        read, self._write = os.pipe()
        try:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-m", "stages.common.harness.restore", "--after-death", stage], stdin=read,
                start_new_session=True)  # Ctrl-C in the terminal is the stage's to handle, not the watcher's
        except OSError as exc:
            log.warning("no watcher for %s (%s): if it is killed outright, run python -m "
                        "stages.common.harness.restore %s",
                        stage, exc, stage)
            self.process = None
        os.close(read)

    def ended(self) -> None:
        try:
            os.write(self._write, b"ended")
        except OSError:
            pass
        os.close(self._write)


def after_death(stage: str) -> int:
    """The watcher: wait for the stage's pipe to close; restore if it said nothing."""
    said = sys.stdin.buffer.read()
    if said:
        return 0
    restored, failed = restore_previous(stage)
    try:
        if restored:
            print(f"lmmem {stage}: killed: the previous outputs dvc.lock records are back: "
                  f"{', '.join(restored)}",
                  file=sys.stderr)
        if failed:
            print(f"lmmem {stage}: killed: could not restore {'; '.join(failed)}", file=sys.stderr)
    except OSError:  # DVC, and the terminal it wrote to, may be gone
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    stages = argv if argv is not None else sys.argv[1:]
    if len(stages) == 2 and stages[0] == "--after-death":
        return after_death(stages[1])
    if not stages or any(s.startswith("-") for s in stages):
        print("usage: python -m stages.common.harness.restore STAGE [STAGE ...]\n"
              "Put back the outputs dvc.lock records for each STAGE from DVC's cache.", file=sys.stderr)
        return 2
    code = 0
    for stage in stages:
        restored, failed = restore_previous(stage)
        for line in restored:
            print(f"{stage}: restored {line}")
        for line in failed:
            print(f"lmmem restore: error: {stage}: {line}", file=sys.stderr)
        persisted = sorted(_persisted(Path.cwd(), stage))
        if not restored and not failed and persisted:
            print(f"{stage}: {', '.join(persisted)} persist (DVC leaves them in place): nothing to restore")
            continue
        if failed or not restored:
            code = 2
        if not restored and not failed:
            print(f"lmmem restore: error: {stage}: dvc.lock records no outputs for it", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
