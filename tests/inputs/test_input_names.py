"""Any name the file system allows is listed and read; paths from stdin keep every character.

The input side of issue 7 item 2: expand_inputs and read_file.  How records carry the
names (JSON escapes, CSV quoting, the table) is the output's part, tested there.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
from helpers import jsonl

from convnext_cli.imaging.decoding import decode_bytes
from convnext_cli.inputs.expand import expand_inputs, read_paths
from convnext_cli.reading import read_file

REPO = Path(__file__).resolve().parents[2]

# names as bytes: what the file system holds
HOSTILE_NAMES = [
    b"caf\xe9 latin-1.png",  # not UTF-8
    b"\xff\xfe.jpg",
    b"new\nline.png",
    b"tab\tname.png",
    b"carriage\rreturn.png",
    b"quote\"s and 'apostrophes'.png",
    b"comma,separated.png",
    b"back\\slash.png",
    b"-leading-dash.png",
    b"--help.png",
    b"[bold]markup.png",
    b"x[red]y[blink].png",
    b"\x1b[31mescape.png",
    b"  spaces around  .png",
    b"emoji \xf0\x9f\x90\x88.png",
]


@pytest.fixture
def named_folder(tmp_path: Path, photos: list[Path]) -> Path:
    folder = tmp_path / "names"
    folder.mkdir()
    data = photos[0].read_bytes()
    for name in HOSTILE_NAMES:
        with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
            handle.write(data)
    return folder


def test_every_name_is_listed_once_and_reads(named_folder: Path) -> None:
    paths = cast("list[str]", expand_inputs([str(named_folder)]))
    names = [os.fsencode(os.path.basename(p)) for p in paths]
    assert sorted(names) == sorted(HOSTILE_NAMES)
    assert len(paths) == len(set(paths))
    for path in paths:
        assert decode_bytes(read_file(path)).shape[0] == 3


def test_names_are_kept_through_recursion_and_explicit_naming(named_folder: Path) -> None:
    nested = named_folder / "x[" / "bold].png"  # the path reads x[/bold].png
    nested.parent.mkdir()
    nested.write_bytes((named_folder / "tab\tname.png").read_bytes())
    recursive = cast("list[str]", expand_inputs([str(named_folder.parent)], recursive=True))
    assert sorted(os.fsencode(os.path.basename(p)) for p in recursive) == sorted(
        [*HOSTILE_NAMES, b"bold].png"]
    )
    assert str(nested) in recursive and expand_inputs([str(nested)]) == [str(nested)]
    for name in HOSTILE_NAMES:
        explicit = os.fsdecode(os.path.join(os.fsencode(named_folder), name))
        assert expand_inputs([explicit]) == [explicit]  # [bold] is not taken as a glob


def test_stdin_lines_keep_spaces_and_strip_only_line_endings(named_folder: Path) -> None:
    folder = os.fsencode(named_folder)
    line_safe = [n for n in HOSTILE_NAMES if b"\n" not in n and b"\r" not in n]
    lines = [os.path.join(folder, n) for n in line_safe]
    text = b"\r\n".join(lines[:3]) + b"\r\n" + b"\n".join(lines[3:]) + b"\n\n"
    got = cast("list[str]", expand_inputs(["-"], stdin=io.BytesIO(text)))
    assert [os.fsencode(p) for p in got] == lines
    assert all(Path(p).exists() for p in got)


def test_stdin_null_separated_keeps_every_byte(named_folder: Path) -> None:
    folder = os.fsencode(named_folder)
    paths = [os.path.join(folder, n) for n in HOSTILE_NAMES]
    data = b"\0".join(paths) + b"\0"
    got = cast("list[str]", expand_inputs(["-"], stdin=io.BytesIO(data), null_separated=True))
    assert [os.fsencode(p) for p in got] == paths
    for path in got:
        assert read_file(path)


def test_read_paths_accepts_text_streams_and_their_buffer() -> None:
    raw = io.BytesIO(b" a b \r\nc\xff\n")
    assert read_paths(io.TextIOWrapper(raw)) == [" a b ", os.fsdecode(b"c\xff")]
    assert read_paths(io.StringIO(" x \n\ny\n")) == [" x ", "y"]
    assert read_paths(io.BytesIO(b"p q\0r\ns\0"), null_separated=True) == ["p q", "r\ns"]


def test_cli_reads_hostile_names_from_a_folder_and_from_stdin(
    named_folder: Path, v1_checkpoint: Path
) -> None:
    """One record per name, none an error; stdin paths keep their spaces and bytes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "convnext_cli", "classify"]
    options = ["-m", str(v1_checkpoint), "--format", "jsonl", "--device", "cpu", "-k", "1"]

    def classify_all(inputs: str, count: int, listing: bytes | None = None) -> None:
        """Every one of ``count`` inputs classified, exit 0, no traceback."""
        run = subprocess.run(
            [*base, inputs, *options],
            input=listing,
            capture_output=True,
            timeout=180,
            cwd=REPO,
            env=env,
        )
        records = jsonl(run.stdout)
        assert len(records) == count
        assert all("predictions" in r for r in records), [r.get("error") for r in records]
        assert run.returncode == 0 and b"Traceback" not in run.stderr

    classify_all(str(named_folder), len(HOSTILE_NAMES))

    folder = os.fsencode(named_folder)
    lines = [os.path.join(folder, n) for n in HOSTILE_NAMES if b"\n" not in n and b"\r" not in n]
    classify_all("-", len(lines), b"\n".join(lines) + b"\n")
