"""The one artifact writer: atomic output folders, JSON and JSONL files, resolved params.

A stage builds its whole output in a temporary folder beside the target and renames it
into place at the end, so a killed or failed stage leaves either the previous complete
output or none, never half of one. It replaces only what it wrote: a folder that holds
other files (`--out data`, a folder of the user's) is refused before any work starts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from stages.common.core.errors import StageError

PARAMS_FILE = "params.json"
OWNER_FILE = ".lmmem-out"  # in every output folder: the writer that made it (only it may replace it)
SPLITS = ("train", "validation", "test")  # every data stage writes one file per split


def writer_of(folder: Path) -> str | None:
    """Who wrote an output folder: its owner file, or, for a folder made before owner files,
    the stage whose output dvc.lock (of the working directory) records at that path."""
    try:
        return json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))["writer"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        return None
    lock = Path("dvc.lock")
    if not lock.is_file():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
        where = os.path.relpath(folder.resolve(), Path.cwd().resolve())
        files = {os.path.join(where, f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()}
        for name, stage in stages.items():  # the folder itself an out, or every file in it one
            outs = {os.path.normpath(out.get("path", "")) for out in stage.get("outs", [])}
            if where in outs or (files and files <= outs):
                return str(name)
        return None
    except (OSError, yaml.YAMLError, AttributeError, ValueError):
        return None


def check_replaceable(target: Path, writer: str) -> None:
    """Refuse, with one line, to replace `target` unless it is absent, an empty folder, or a
    folder `writer` made: a stage never deletes what it did not write."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise StageError(f"{target}: exists and is not a folder; the {writer} output needs a folder there")
    if not any(target.iterdir()):
        return
    found = writer_of(target)
    if found != writer:
        whose = (f"it was written by {found}" if found
                 else f"it holds files lmmem did not write (no {OWNER_FILE})")
        raise StageError(f"{target}: not replaced with the {writer} output, {whose}: give a new or empty "
                         "folder")


@contextlib.contextmanager
def atomic_dir(target: Path, writer: str) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `target`, on error it is removed.
    `writer` names what makes this output; a `target` it did not make is refused before the
    temporary folder exists (check_replaceable)."""
    target = Path(target)
    check_replaceable(target, writer)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (problem := write_problem(exc)) is not None:
            raise StageError(f"{target}: the {writer} output could not be written ({problem}); "
                             f"what was there is kept") from None
        raise
    write_json(tmp / OWNER_FILE, {"writer": writer, "blake2b": digests(tmp)})
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def digests(folder: Path) -> dict[str, str]:
    """A digest of every file of an output folder (its owner file aside), by relative path."""
    return {p.relative_to(folder).as_posix(): file_digest(p) for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != OWNER_FILE}


def check_digests(folder: Path, names: list[str]) -> None:
    """Refuse files of an output folder (or of a folder inside one: a compressed variant)
    that no longer match the digests written with them (flipped bytes, a truncated copy);
    files written before digests pass unchecked."""
    folder = Path(folder)
    for owner in (folder, folder.parent):
        try:
            recorded = json.loads((owner / OWNER_FILE).read_text(encoding="utf-8")).get("blake2b") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for name in names:
            key = (folder / name).relative_to(owner).as_posix()
            if key in recorded and (folder / name).is_file() and file_digest(folder / name) != recorded[key]:
                raise StageError(f"{folder / name}: does not match the digest written with it: the file is "
                                 "damaged")
        return


# full disk, size limit, quota, read-only
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


def write_problem(exc: BaseException) -> str | None:
    """Why an output could not be written (a full disk, a file size limit, a quota, a
    read-only file system), from an OSError or from the errors safetensors and torch.save
    raise instead, which carry it only in their text; None for any other exception."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) if exc.errno in WRITE_ERRNOS else None
    text = str(exc)
    found = re.search(r"os error (\d+)", text)  # safetensors: "I/O error: File too large (os error 27)"
    if found and int(found.group(1)) in WRITE_ERRNOS:
        return os.strerror(int(found.group(1)))
    if isinstance(exc, RuntimeError) and "file write failed" in text:  # torch.save's stream writer
        return "a file write failed: a full disk or a file size limit"
    return None


def size_on_disk(folder: Path) -> int:
    """Bytes of a model folder's weight files (*.safetensors): what a model costs to store."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(data: Any) -> str:
    """Stable JSON text: sorted keys, UTF-8 kept readable, a final newline."""
    return json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Read a JSON artifact; a missing one is a one-line error that names it."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"missing input {path}: run the stage that makes it first")
    return json.loads(path.read_text(encoding="utf-8"))


def write_params(folder: Path, **sections: BaseModel) -> None:
    """Store the resolved params an artifact was made with, beside it."""
    write_json(Path(folder) / PARAMS_FILE, {name: model for name, model in sections.items()})


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Stream records of a JSONL file that lmmem wrote (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"missing input {path}: run the stage that makes it first")
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


class JsonlWriter:
    """Append records to a JSONL file, one compact line each."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._f = self.path.open("w", encoding="utf-8", newline="\n")
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.count += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
