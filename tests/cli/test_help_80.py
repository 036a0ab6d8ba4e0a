"""Every command's ``--help`` on a real 80-column terminal reads as written: no word, option or
choice cut across lines, no orphan words from source line breaks, examples one a line, no
Python type names, and the top-level help has examples."""

from __future__ import annotations

import re

import pytest
from pty_helpers import run_attached, screen

COMMANDS = ["", "classify", "embed", "convert", "benchmark", "env", "serve"]
BOX = "│╭╮╰╯─"
TYPE_NAMES = re.compile(r"<(list|str|int|float|bool|path|text)\b|list\[|\{[A-Z_]+\}")
WIDTH = 80


def _help(command: str, columns: int) -> list[str]:
    args = [command, "--help"] if command else ["--help"]
    run = run_attached(args, stdout="tty", stderr="same", columns=columns, timeout=60)
    assert run.returncode == 0, run.stdout
    return [line.rstrip() for line in screen(run.stdout)]


def _tokens(lines: list[str]) -> list[str]:
    text = "\n".join(lines)
    for ch in BOX:
        text = text.replace(ch, " ")
    return text.split()


@pytest.fixture(scope="module")
def helps() -> dict[str, tuple[list[str], list[str]]]:
    return {c: (_help(c, WIDTH), _help(c, 400)) for c in COMMANDS}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_reads_as_written(
    helps: dict[str, tuple[list[str], list[str]]], command: str
) -> None:
    narrow, wide = helps[command]
    text = "\n".join(narrow)
    assert all(len(line) <= WIDTH for line in narrow), text
    assert not TYPE_NAMES.search(text), TYPE_NAMES.search(text)
    assert "<bool>" not in text
    usage = next(line for line in narrow if "Usage:" in line)
    assert "{" not in usage and "<" not in usage, usage

    # a word cut in two leaves pieces that the unwrapped (400-column) help never shows
    whole = set(_tokens(wide))
    pieces = [t for t in _tokens(narrow) if t not in whole]
    assert not pieces, f"cut inside a word or option: {pieces}\n{text}"

    # the prose above the panels: each line filled (no orphan words), examples one a line
    prose = []
    for line in narrow:
        if line.startswith(("╭", "│", "╰")):
            break
        prose.append(line)
    in_examples = False
    for line, following in zip(prose, [*prose[1:], ""], strict=True):
        body = line.strip()
        if body == "Examples:":
            in_examples = True
            continue
        if not body:
            in_examples = False
            continue
        if in_examples:
            assert body.startswith("$ "), f"an example broken across lines: {body!r}\n{text}"
            continue
        if body.startswith("Usage:") or not following.strip():
            continue
        next_word = following.split()[0]
        assert len(body) + 1 + len(next_word) > WIDTH - 2, f"orphan line {body!r}\n{text}"


def test_top_level_help_has_examples(helps: dict[str, tuple[list[str], list[str]]]) -> None:
    narrow, _ = helps[""]
    examples = [line.strip() for line in narrow if line.strip().startswith("$ convnext")]
    assert len(examples) >= 4
    for command in ("classify", "embed", "convert", "benchmark"):
        assert any(e.startswith(f"$ convnext {command}") for e in examples), command


def test_long_choice_lists_are_words_in_the_help(
    helps: dict[str, tuple[list[str], list[str]]],
) -> None:
    _, wide = helps["classify"]
    line = next(line for line in wide if line.startswith("│ --format"))
    assert "auto, table, json, jsonl, csv, parquet or html." in line
    _, wide = helps["embed"]
    line = next(line for line in wide if line.startswith("│ --format"))
    assert "auto, jsonl, json, csv, npy, safetensors or parquet." in line
