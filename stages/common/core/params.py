"""The one params loader: read params.yaml, validate a section, explain mistakes in one line.

Every stage declares a pydantic model for its section of params.yaml. ``extra="forbid"``
turns a typo into an error that names the key, and ``Field(ge=..., le=...)`` and
``Literal[...]`` ranges turn a bad value into an error that names the allowed values.
"""

from __future__ import annotations

import logging
import reprlib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.common.core.errors import StageError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base of every params section: unknown keys are refused, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class BaseParams(Section):
    """The `base` section, shared by every stage that needs a seed or a device."""

    seed: int = Field(
        1337, ge=0, le=2**32 - 1,
        description="seeds Python, NumPy, torch and gensim: same params, same metrics on CPU")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="cpu | cuda | auto (cuda when present); data stages run on CPU regardless")
    portable: bool = Field(True, description=(
        "true: the same bytes on any x86-64 CPU with AVX2 (kernels pinned to AVX2, 2 threads per stage "
        "process) | false: each CPU's fastest kernels and every core, outputs from embed on differ between "
        "CPUs"))
    allocator: Literal["glibc", "glibc-tuned", "jemalloc", "tcmalloc"] = Field("glibc", description=(
        "the C allocator of every stage process: glibc as it comes | glibc-tuned (2 arenas, freed memory "
        "back to the OS at 128 KiB) | jemalloc | tcmalloc (Debian's libjemalloc2, libtcmalloc-minimal4, "
        "preloaded): peak RSS and speed in docs/BENCHMARKS.md"))


def _describe_error(section: str, err: dict[str, Any], model: type[BaseModel]) -> str:
    """One line for one pydantic error: `section.key: what is wrong (allowed / got)`."""
    loc = ".".join(str(p) for p in err["loc"])
    where = ".".join(part for part in (section, loc) if part)
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, err["loc"][:-1])
        hint = f" (allowed keys: {', '.join(allowed)})" if allowed else ""
        return f"{where}: unknown key{hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    ctx = err.get("ctx") or {}
    if kind == "literal_error":
        return f"{where}: must be one of {ctx.get('expected')} (got {excerpt(got)})"
    message = err["msg"].removeprefix("Value error, ")
    if isinstance(got, dict):  # a check across keys: the section itself is no help to print
        return f"{where}: {message}"
    return f"{where}: {message} (got {excerpt(got)})"


def excerpt(value: Any) -> str:
    """repr(value), cut to EXCERPT_CHARS; a long list or mapping is not walked whole to print it."""
    if isinstance(value, (list, tuple, dict)) and len(value) > EXCERPT_CHARS:
        return f"a {type(value).__name__} of {len(value):,} items"
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict = 3, 8, 8
    short.maxstring = short.maxother = EXCERPT_CHARS
    text = short.repr(value)
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + f"... ({len(text):,} characters)"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (possibly nested) model at `loc`, for the unknown-key message."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = fields[part].annotation
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def validate_section(section: str, data: Any, model: type[M]) -> M:
    """Validate one section; raise StageError with one line per problem (the first one leads)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise StageError(f"params: section '{section}' must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [_describe_error(section, e, model) for e in exc.errors()]
        raise StageError("params: " + "; ".join(lines)) from None


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` laid over it, nested mappings key by key (neither is changed)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key],
                          value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# the top-level sections of params.yaml: one per stage that has params, base, and the flows'
SECTIONS = ("base", "ingest", "clean", "tokenize", "embed", "train", "compare", "finetune", "domain", "adapt",
            "compress",
            "evaluate", "plan", "report", "flows")


MAX_FILE_BYTES = 1 << 20  # a params file of a megabyte is not one a person wrote (params.yaml: 26 KB)
EXCERPT_CHARS = 80  # a bad value quoted in an error at most this long


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (plain YAML keeps
    the last: a second `train:` would silently reset every key the first one set), and so is
    an alias (`*name`): nine nested levels of eight aliases make a 26 KB file whose value
    expands to gigabytes wherever it is walked or printed."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None,
                f"alias *{event.anchor}: aliases are not accepted in params files (one can expand to "
                "gigabytes): write the value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path, what: str = "params file") -> dict[str, Any]:
    """A YAML file that holds a mapping; a missing, non-UTF-8 or invalid file, or a key given
    twice, is a one-line error that calls it `what`."""
    if not path.is_file():
        raise StageError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise StageError(f"{what} {path} is {size / 2**20:,.1f} MiB: at most {MAX_FILE_BYTES // 2**20} MiB "
                         "is read")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise StageError(f"{what} {path} is not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        raise StageError(f"{what} {path}: {exc.problem}"
                         + (f" (line {mark.line + 1})" if mark is not None else "")) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise StageError(f"{what} {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise StageError(f"{what} {path} must hold a mapping")
    return data


def read_params_file(path: Path) -> dict[str, Any]:
    """params.yaml as a mapping of sections (read_yaml_mapping); an unknown section is an error."""
    data = read_yaml_mapping(path)
    unknown = [str(key) for key in data if key not in SECTIONS]
    if unknown:
        raise StageError(f"params file {path}: unknown section {', '.join(map(repr, unknown))} "
                         f"(sections: {', '.join(SECTIONS)})")
    return data


def load_params(path: Path, section: str | tuple[str, ...], model: type[M]) -> tuple[BaseParams, M]:
    """Load `base` and one stage's section from a params file, both validated. Given several
    sections, `model` has one field per section, and errors name `section.key`."""
    data = read_params_file(path)
    names = (section,) if isinstance(section, str) else section
    for name in names:
        if name not in data:
            raise StageError(f"params: section '{name}' is missing from {path}")
    base = validate_section("base", data.get("base"), BaseParams)
    if isinstance(section, str):
        return base, validate_section(section, data[section], model)
    return base, validate_section("", {name: data[name] or {} for name in names}, model)
