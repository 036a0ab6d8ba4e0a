"""Results reach stdout (or -o) whatever stdout and stderr are: terminal, file or pipe.

The field failure: `convnext classify photos/ > labels.jsonl` typed in a terminal left the
file empty, because the progress bar (stderr a terminal) captured stdout.  These tests run
the CLI as a subprocess with real pseudo-terminals and count the records where they belong.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs pseudo-terminals")

from pty_helpers import json_lines, run_attached, screen  # noqa: E402

BAR = "━".encode()


def classify_args(v1_checkpoint: Path, photos: list[Path], *extra: object) -> list[object]:
    common = [
        "-m",
        v1_checkpoint,
        "-k",
        "1",
        "-b",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    return ["classify", *photos, *common, *extra]


def records(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize(
    "stdout,stderr",
    [("tty", "tty"), ("file", "tty"), ("pipe", "tty"), ("pipe", "pipe"), ("tty", "file")],
)
def test_records_arrive_on_stdout(
    stdout: str, stderr: str, v1_checkpoint: Path, photos: list[Path]
) -> None:
    run = run_attached(
        classify_args(v1_checkpoint, photos, "--format", "jsonl"), stdout=stdout, stderr=stderr
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    got = records(json_lines(run.stdout))
    assert [r["path"] for r in got] == [str(p) for p in photos]
    assert json_lines(run.stderr) == []  # nothing of the results on stderr
    assert BAR not in run.stdout and b"\x1b[" not in run.stdout
    if stderr == "tty":
        assert BAR in run.stderr  # the progress bar, on stderr only
    else:
        assert BAR not in run.stderr and b"\x1b[" not in run.stderr
    assert b"Traceback" not in run.stderr


def test_same_terminal_records_are_clean_lines(v1_checkpoint: Path, photos: list[Path]) -> None:
    """stdout and stderr on one terminal: every record on its own line, none glued to the bar,
    and the bar gone at the end (the summary line from stderr comes last)."""
    run = run_attached(
        classify_args(v1_checkpoint, photos, "--format", "jsonl"), stdout="tty", stderr="same"
    )
    assert run.returncode == 0, run.stdout.decode(errors="replace")
    assert BAR in run.stdout  # the bar was there on the terminal
    shown = [line for line in screen(run.stdout) if line]
    first = next(n for n, line in enumerate(shown) if line.startswith("classified "))
    assert shown[first].startswith(f"classified {len(photos)} images in "), shown
    assert " on cpu float32" in " ".join(shown[first:]), shown  # wrapped or not
    assert all(line.startswith("  ") for line in shown[first + 1 :]), shown
    assert shown[-1].startswith("  Speed: "), shown
    assert [json.loads(line)["path"] for line in shown[:first]] == [str(p) for p in photos], shown


def test_output_file_with_terminals(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "labels.jsonl"
    run = run_attached(classify_args(v1_checkpoint, photos, "-o", out), stdout="tty", stderr="tty")
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert [r["path"] for r in map(json.loads, out.read_text().splitlines())] == [
        str(p) for p in photos
    ]
    assert json_lines(run.stdout) == [] and b"\xe2\x94\x82" not in run.stdout  # no table either


@pytest.mark.parametrize("stdout,table", [("tty", True), ("file", False), ("pipe", False)])
def test_format_auto_is_a_table_only_on_a_terminal(
    stdout: str, table: bool, v1_checkpoint: Path, photos: list[Path]
) -> None:
    run = run_attached(classify_args(v1_checkpoint, photos[:2]), stdout=stdout, stderr="tty")
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    if table:
        shown = screen(run.stdout)
        assert shown[0].split()[:2] == ["image", "label"] and "score" in shown[0]  # -k 1
        assert set(shown[1]) == {"─"}
        assert json_lines(run.stdout) == []
    else:
        assert len(json_lines(run.stdout)) == 2


def test_embed_with_terminal_stderr_and_file_stdout(
    v1_checkpoint: Path, photos: list[Path]
) -> None:
    args = ["embed", *photos[:3], "-m", v1_checkpoint, "-b", "1", "--workers", "0"]
    run = run_attached(args, stdout="file", stderr="tty")
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert len(json_lines(run.stdout)) == 3
