"""The documentation names what exists: module paths, and the options its examples use.

- Every ``convnext_cli/...py`` path in README.md and docs/*.md is a file of the package
  (architecture.md walks one image through modules by name; a rename must update it).
- Every ``convnext <command> ...`` line in a README code block uses only options that the
  command's ``--help`` lists (the examples must still parse after an option is renamed).
"""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = ("classify", "embed", "convert", "benchmark", "env", "serve")

MODULE_PATH = re.compile(r"convnext_cli/[A-Za-z0-9_/]+\.py")
# A module named relative to the package (`cli/help.py`, `reading.py`).
SUBPACKAGE_PATH = re.compile(
    r"(?<![\w/.])(?:cli|model|checkpoints|imaging|inputs|engine|outputs)/[A-Za-z0-9_]+\.py"
)
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z0-9])(?![\w-])")


def module_paths(text: str) -> set[str]:
    paths = set(MODULE_PATH.findall(text))
    paths |= {"convnext_cli/" + p for p in SUBPACKAGE_PATH.findall(text)}
    return paths


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_module_path_named_exists(doc: Path) -> None:
    missing = sorted(p for p in module_paths(doc.read_text()) if not (ROOT / p).is_file())
    assert not missing, f"{doc.name} names modules that do not exist: {missing}"


def test_module_path_check_can_fail() -> None:
    text = "see convnext_cli/engine/no_such_module.py and `imaging/nowhere.py`"
    assert module_paths(text) == {
        "convnext_cli/engine/no_such_module.py",
        "convnext_cli/imaging/nowhere.py",
    }


def readme_commands() -> list[tuple[str, str]]:
    """(command, the line) for every `convnext COMMAND ...` in a README code block."""
    found = []
    for block in FENCE.findall((ROOT / "README.md").read_text()):
        for raw in block.splitlines():
            line = raw.split(" #")[0]
            for part in re.split(r"\||&&|;", line):
                words = part.split()
                if words and words[0] == "$":
                    words = words[1:]
                if len(words) >= 2 and words[0] == "convnext" and words[1] in COMMANDS:
                    found.append((words[1], " ".join(words)))
    return found


def options_used(line: str) -> set[str]:
    # Quoted arguments ('shots/**/*.JPG') hold no options.
    unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "", line)
    return set(OPTION.findall(unquoted))


@cache
def help_options(command: str) -> frozenset[str]:
    out = subprocess.run(
        [sys.executable, "-m", "convnext_cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return frozenset(OPTION.findall(out.stdout))


def test_readme_has_examples_of_every_command() -> None:
    assert {command for command, _ in readme_commands()} == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_examples_use_only_options_the_command_has(command: str) -> None:
    known = help_options(command)
    unknown = {
        line: sorted(options_used(line) - known)
        for cmd, line in readme_commands()
        if cmd == command and options_used(line) - known
    }
    assert not unknown, f"README examples use options `convnext {command}` lacks: {unknown}"


def test_option_check_can_fail() -> None:
    assert "--no-such-option" not in help_options("classify")
    assert options_used("convnext classify x.jpg --no-such-option -k 3 'a -b'") == {
        "--no-such-option",
        "-k",
    }


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text())
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


LINK = re.compile(r"\]\(((?:[\w./-]+\.md)?)#([\w-]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_section_link_names_a_heading(doc: Path) -> None:
    broken = []
    for target, anchor in LINK.findall(doc.read_text()):
        page = (doc.parent / target).resolve() if target else doc
        if not page.is_file() or anchor not in anchors(page):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{doc.name} links to sections that do not exist: {broken}"


def test_slug_is_githubs() -> None:
    assert slug("What can change a run's last digits") == "what-can-change-a-runs-last-digits"
    assert slug("Many GPUs, many machines: Ray") == "many-gpus-many-machines-ray"
