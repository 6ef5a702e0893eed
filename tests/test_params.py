"""The params schema: every mistake is one line that names the key and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from flows.common import FlowParams
from stages import (adapt, clean, compare, compress, embed, evaluate, finetune, ingest, plan, report,
                    tokenize, train)
from stages.common.core.errors import StageError
from stages.common.core.params import load_params, validate_section
from tests.conftest import ROOT, TINY, docs_generate, one_error_line, run_cli, tiny_params

STAGES = {"ingest": ingest, "clean": clean, "tokenize": tokenize, "embed": embed, "train": train,
          "compress": compress, "evaluate": evaluate, "plan": plan, "report": report}


@pytest.mark.parametrize("path", [ROOT / "params.yaml", TINY])
def test_shipped_params_files_validate(path: Path) -> None:
    for name, module in STAGES.items():
        base, params = load_params(path, name, module.Params)
        assert base.seed == 1337
        assert params == module.Params.model_validate(yaml.safe_load(path.read_text())[name])
    _, flows = load_params(path, "flows", FlowParams)  # the flows' section validates the same way
    assert flows.retries >= 0
    _, both = load_params(path, ("train", "compare"), compare.Params)  # compare reads two sections
    assert len(both.compare.configs) >= 16 and both.compare.baseline in both.compare.configs
    for name in both.compare.configs:  # every shipped configuration is one train accepts
        compare.configured(both, name)
    _, tuning = load_params(path, ("train", "finetune"), finetune.Params)
    assert {"full", "head", "lora",
            "qlora"} <= set(tuning.finetune.runs) and tuning.finetune.baseline == "full"
    _, adapting = load_params(path, ("train", "adapt"), adapt.Params)
    assert {"full", "lora", "qlora"} <= set(adapting.adapt.runs) and adapting.adapt.baseline == "full"


def test_every_key_of_params_yaml_has_a_comment() -> None:
    for number, line in enumerate((ROOT / "params.yaml").read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue  # blank, comment, or a section header
        if stripped.startswith(("train:", "validation:", "test:")):
            continue  # split fractions: explained on their header line
        assert "#" in line, f"params.yaml line {number} has no comment: {line!r}"


# each section of params.yaml and its model, as the params reference page reads them
SECTIONS: dict[str, type[BaseModel]] = docs_generate().section_models()


def yaml_comments(path: Path) -> dict[str, str]:
    """{dotted key: its trailing comment} for every key line of a params file that has one."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing sections
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^( *)([A-Za-z_][\w-]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        quote = None
        for i, ch in enumerate(rest):  # the first '#' after a space, outside quotes
            if quote:
                quote = None if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "#" and (i == 0 or rest[i - 1] == " "):
                out[".".join(k for _, k in stack)] = rest[i + 1:].strip()
                break
    return out


def field_at(path: str) -> FieldInfo | None:
    """The pydantic field a dotted params key names (None for a key inside a free mapping)."""
    section, *keys = path.split(".")
    model: Any = SECTIONS[section]
    info = None
    for key in keys:
        fields = getattr(model, "model_fields", None)
        if not fields or key not in fields:
            return None
        info = fields[key]
        model = info.annotation
    return info


def test_code_defaults_equal_the_shipped_params_yaml() -> None:
    """One source of defaults: every section's Params() is what params.yaml ships, so the
    report's "differs from the defaults" lists only what a user changed."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for name, model in SECTIONS.items():
        assert model() == model.model_validate(shipped[name]), name


def test_code_defaults_are_caught_when_they_drift() -> None:
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    drifted = {**shipped["clean"], "min_chars": shipped["clean"]["min_chars"] + 1}
    assert clean.Params() != clean.Params.model_validate(drifted)


def test_params_yaml_comments_are_the_fields_descriptions() -> None:
    comments = yaml_comments(ROOT / "params.yaml")
    checked = 0
    for path, comment in comments.items():
        if "." not in path or path.startswith(tuple(f"{name}." for name in docs_generate().DATA)):
            continue  # a section's own comment; the shipped variants and configurations are data, each
            # comment says what it trades
        info = field_at(path)
        assert info is not None, f"params.yaml: {path} is not a field of its section"
        assert info.description == comment, (f"{path}: params.yaml says {comment!r}, "
                                             f"the field {info.description!r}")
        checked += 1
    assert checked >= 120  # 120 keys at the time of writing: a parser that found none would fail here
    assert comments["train.precision"].startswith("fp32 | bf16")  # the parser reads what a person reads
    # and every field of every section is described in params.yaml
    def walk(model: Any, prefix: str) -> list[str]:
        out = []
        for key, info in model.model_fields.items():
            out.append(prefix + key)
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                out += walk(info.annotation, f"{prefix}{key}.")
        return out
    missing = [key for name, model in SECTIONS.items() for key in walk(model, f"{name}.")
               if key not in comments and not key.startswith(("ingest.split.", "tokenize.special_tokens."))]
    assert missing == []


def test_tiny_profile_has_the_same_keys_as_params_yaml() -> None:
    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out

    assert keys(yaml.safe_load((ROOT / "params.yaml").read_text())) == keys(tiny_params())


def message(section: str, data: dict, model: type) -> str:
    with pytest.raises(StageError) as info:
        validate_section(section, data, model)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_unknown_key_names_it_and_the_allowed_keys() -> None:
    text = message("embed", {"windw": 5}, embed.Params)
    assert text.startswith("params: embed.windw: unknown key (allowed keys: ")
    assert "window" in text and "vector_size" in text


def test_negative_window_is_refused_with_the_bound() -> None:
    text = message("embed", {"window": -2}, embed.Params)
    assert text == "params: embed.window: Input should be greater than or equal to 1 (got -2)"


def test_vocabulary_size_zero_is_refused() -> None:
    text = message("tokenize", {"vocab_max_size": 0}, tokenize.Params)
    assert "tokenize.vocab_max_size: Input should be greater than or equal to 5 (got 0)" in text


def test_literal_lists_the_allowed_values() -> None:
    text = message("embed", {"algorithm": "glove"}, embed.Params)
    assert text == "params: embed.algorithm: must be one of 'skipgram' or 'cbow' (got 'glove')"


def test_wrong_type_names_the_key() -> None:
    text = message("clean", {"dedupe": "maybe"}, clean.Params)
    assert text.startswith("params: clean.dedupe: ") and "'maybe'" in text


def test_nested_unknown_key_and_split_sum() -> None:
    assert "ingest.split.trian: unknown key (allowed keys: test, train, validation)" in message(
        "ingest", {"split": {"trian": 0.9}}, ingest.Params)
    assert "train + validation + test must be 1.0 (got 1.1)" in message(
        "ingest", {"split": {"train": 0.9, "validation": 0.1, "test": 0.1}}, ingest.Params)


def test_min_chars_above_max_chars() -> None:
    assert "min_chars (10) must not exceed max_chars (5)" in message(
        "clean", {"min_chars": 10, "max_chars": 5}, clean.Params)


def test_missing_and_invalid_params_files(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="params file not found"):
        load_params(tmp_path / "nope.yaml", "embed", embed.Params)
    bad = tmp_path / "bad.yaml"
    bad.write_text("embed: [unclosed\n")
    with pytest.raises(StageError, match=r"not valid YAML at line \d"):
        load_params(bad, "embed", embed.Params)
    no_section = tmp_path / "p.yaml"
    no_section.write_text("base: {seed: 1}\n")
    with pytest.raises(StageError, match="section 'embed' is missing"):
        load_params(no_section, "embed", embed.Params)


def test_cli_typo_exits_2_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    data = tiny_params()
    data["embed"]["windw"] = 3
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data, allow_unicode=True))
    out, metrics = tmp_path / "embed", tmp_path / "embed.json"
    result = run_cli("embed", ["--params", str(params), "--tokens", str(tmp_path / "tokens"),
                               "--out", str(out), "--metrics", str(metrics)])
    assert result.returncode == 2
    line = one_error_line(result.stderr, "embed")
    assert "embed.windw: unknown key" in line
    assert not out.exists() and not metrics.exists()


def test_a_yaml_alias_is_refused_before_it_can_expand(tmp_path: Path) -> None:
    """Nine levels of eight aliases: a 1 KB file whose value is 8^9 strings when walked."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 8)}]" for i in range(1, 10)]
    data = tiny_params()
    text = yaml.safe_dump(data, allow_unicode=True).replace("clean:\n", "clean:\n  bomb:\n" + "".join(
        f"    {line}\n" for line in levels), 1)
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(StageError) as raised:
        load_params(path, "clean", clean.Params)
    message = str(raised.value)
    assert message.startswith(f"params file {path}: alias *a0: aliases are not accepted in params files")
    assert "(line " in message and len(message) < 300


def test_a_long_bad_value_is_quoted_in_an_excerpt(tmp_path: Path) -> None:
    data = tiny_params()
    data["clean"]["min_chars"] = "x" * 100_000
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(StageError) as raised:
        load_params(path, "clean", clean.Params)
    assert str(raised.value).startswith("params: clean.min_chars: ") and len(str(raised.value)) < 250
    assert "x...x" in str(raised.value)  # cut in the middle


def test_a_params_file_over_a_megabyte_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(TINY.read_text(encoding="utf-8") + "#" * (2 << 20) + "\n", encoding="utf-8")
    with pytest.raises(StageError, match=r"params file .* is 2\.0 MiB: at most 1 MiB is read"):
        load_params(path, "clean", clean.Params)


@pytest.mark.parametrize("key, value, expected", [
    ("generation_batches", [0, 8],
     "evaluate.generation_batches.0: Input should be greater than or equal to 1 (got 0)"),
    ("generation_batches", [-3, 8],
     "evaluate.generation_batches.0: Input should be greater than or equal to 1"),
    ("generation_batches", [1, 10**12],
     "evaluate.generation_batches.1: Input should be less than or equal to 65536"),
    ("generation_contexts", [0],
     "evaluate.generation_contexts.0: Input should be greater than or equal to 2"),
    ("generation_prompt", 10**9, "evaluate.generation_prompt: Input should be less than or equal to 65535"),
])
def test_the_generation_grid_is_checked_with_the_params_before_any_work(tmp_path: Path, key: str, value: Any,
                                                                        expected: str) -> None:
    """Once a batch of 0 or of a trillion reached the metered generation after minutes of work."""
    data = tiny_params()
    data["evaluate"][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(StageError) as raised:
        load_params(path, "evaluate", evaluate.Params)
    assert str(raised.value).startswith(f"params: {expected}")
