"""The documentation: the generated pages are current, the site builds strictly with every page
in its navigation, and every command of README.md and the getting-started page names a module,
flag, target or file that exists (tests/test_pipeline_e2e.py runs the first experiment's
commands on the tiny profile)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, docs_generate, sh

DOCUMENTED = [ROOT / "README.md", ROOT / "docs" / "getting-started.md"]


def shell_blocks(path: Path) -> list[str]:
    """The commands of a page's ```bash blocks, one per line, comments stripped."""
    text = path.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        for line in block.splitlines():
            command = shlex.join(shlex.split(line, comments=True))
            if command:
                commands.append(command)
    return commands


def test_the_pages_hold_the_commands_this_test_checks() -> None:
    readme, started = (shell_blocks(p) for p in DOCUMENTED)
    assert "make repro" in readme and "make test" in readme
    assert any(c.startswith("dvc exp run")
               for c in readme) and any(c.startswith("dvc exp run") for c in started)
    assert len(readme) >= 7 and len(started) >= 8


def help_text(args: list[str]) -> str:
    return sh(*args, cwd=ROOT)


def flags(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("-") and w != "-"]


def check_command(command: str) -> None:
    """What a command names exists: a make target, a module and its flags, a dvc subcommand and
    its flags, a file to copy or to check out."""
    words = shlex.split(command)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    if words[0] == "make":
        for target in words[1:]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{command}: no make target {target}"
    elif words[:2] == ["python", "-m"]:
        module = words[2]
        assert importlib.util.find_spec(module) is not None, f"{command}: no module {module}"
        # the planner's question mode has flags of its own
        mode = words[3:5] if "--arch" in words[3:5] else []
        shown = help_text([sys.executable, "-m", module, *mode, "--help"])
        for flag in flags(words[3:]):
            assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", shown), f"{command}: {module} has no {flag}"
    elif words[0] == "dvc":
        sub = [w for w in words[1:3] if not w.startswith("-")][:2 if words[1] == "exp" else 1]
        shown = help_text(["dvc", *sub, "--help"])
        for flag in flags(words[1 + len(sub):]):
            assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b",
                             shown), f"{command}: dvc {' '.join(sub)} has no {flag}"
    elif words[0] == "cp":
        assert (ROOT / words[1]).is_file(), f"{command}: no {words[1]}"
    elif words[:2] == ["git", "checkout"]:
        for path in words[2:]:
            assert (ROOT / path).exists(), f"{command}: no {path}"
    else:
        raise AssertionError(f"{command}: a kind of command this test does not check yet")


@pytest.mark.parametrize("page", DOCUMENTED, ids=lambda p: p.name)
def test_every_command_names_what_exists(page: Path) -> None:
    for command in shell_blocks(page):
        check_command(command)


@pytest.mark.parametrize("command, wrong", [
    ("python -m stages.train --estimated", "has no --estimated"),
    ("python -m stages.trian --estimate", "no module stages.trian"),
    ("dvc exp show --markdown", "has no --markdown"),
    ("make tests", "no make target tests"),
    ("cp tests/params.tiniest.yaml params.yaml", "no tests/params.tiniest.yaml"),
])
def test_a_renamed_flag_module_or_target_fails_the_check(command: str, wrong: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(wrong)):
        check_command(command)


def test_the_generated_pages_are_current() -> None:
    done = subprocess.run([sys.executable, "docs/generate.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr


def test_the_params_page_follows_the_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import embed

    generate = docs_generate()

    page = generate.params_page()
    assert "| `embed.window` | `5` | int >= 1, <= 100 |" in page  # the default, the bounds, from the model
    assert "| `train.precision` | `\"fp32\"` | `fp32` \\| `bf16` \\| `fp16` |" in page
    field = embed.Params.model_fields["window"]
    monkeypatch.setattr(field, "description", "a description the page does not hold")
    assert "a description the page does not hold" in generate.params_page() != page


def mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    private = site.parent / "tmp"  # jieba (the search's Chinese words) caches under TMPDIR
    private.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(private), "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d",
                           str(site)],
                          capture_output=True, text=True, timeout=300, check=False, env=env)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    done = mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "params" / "index.html").is_file()


def test_a_page_left_out_of_the_navigation_or_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the navigation\n", encoding="utf-8")
    done = mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0 and "orphan.md" in done.stderr
    (tmp_path / "docs" / "orphan.md").unlink()
    page = tmp_path / "docs" / "getting-started.md"
    page.write_text(page.read_text(encoding="utf-8") + "\n[gone](no-such-page.md)\n", encoding="utf-8")
    done = mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0 and "no-such-page.md" in done.stderr


def unnamed_in_layout(block: str) -> list[str]:
    """The packages and modules of stages/ (techniques/ aside: the generated table names each)
    that the layout does not name."""
    packages = [init.parent for init in (ROOT / "stages").rglob("__init__.py")
                if "techniques" not in init.parts]
    found = packages + [m for package in packages for m in package.glob("*.py")]
    skip = {"__init__", "__main__", "stages"}
    return sorted(str(p.relative_to(ROOT)) for p in found
                  if p.stem not in skip and not re.search(rf"\b{re.escape(p.stem)}\b", block))


def test_the_layout_names_every_module_of_stages() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"^## The layout\n\n```\n(.*?)^```", text, re.M | re.S).group(1)
    assert unnamed_in_layout(block) == []
    assert "stages/common/weights/loading.py" in unnamed_in_layout(block.replace("loading", "load"))
