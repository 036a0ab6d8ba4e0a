"""Any file name the file system allows gets exactly one record, in every format, and the
original bytes come back from it; output files are valid UTF-8; the table shows names
literally (never as markup) with control characters made visible.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from convnext_cli.outputs.names import path_field, read_path_field, visible

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX byte file names")

HOSTILE = [
    b"caf\xe9 latin-1.png",  # not UTF-8
    b"\xff\xfe.png",
    b"new\nline.png",
    b"carriage\rreturn.png",
    b"tab\there.png",
    b'quo"te.png',
    b'"starts with a quote.png',
    b"comma,name.png",
    b"back\\slash\\n.png",
    b"-leading-dash.png",
    b"[bold]markup.png",
    b"x[/bold].png",  # a folder "x[" holding "bold].png" (runs use -r)
    b"esc\x1b[31mred\x1b[0m.png",
    b"ctrl\x01\x07\x7f.png",
    b"line\xe2\x80\xa8separator.png",  # U+2028
    b"next\xc2\x85line.png",  # U+0085
    b" leading space.png",
    b"plain.png",
]


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> bytes:
    folder = tmp_path_factory.mktemp("names")
    source = next(p for p in photos if p.suffix == ".png")
    for name in HOSTILE:
        path = os.path.join(os.fsencode(folder), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(source, path)
    return os.fsencode(folder)


def expected(folder: bytes) -> Counter:
    return Counter(os.path.join(folder, name) for name in HOSTILE)


def run(
    folder: bytes, checkpoint: Path, command: str, *args: str | bytes, cwd: bytes | None = None
) -> bytes:
    argv: list[str | bytes] = [sys.executable, "-m", "convnext_cli", command, folder]
    argv += ["-m", str(checkpoint), "--dtype", "float32", "--device", "cpu", "-r", *args]
    out = subprocess.run(
        argv + (["-k", "1"] if command == "classify" else []),
        capture_output=True,
        timeout=300,
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr
    assert b"Traceback" not in out.stderr
    return out.stdout


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize("command", ["classify", "embed"])
def test_json_records_give_the_bytes_back(
    fmt: str, command: str, hostile_folder: bytes, v1_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / f"out.{fmt}"
    run(hostile_folder, v1_checkpoint, command, "-o", str(out))
    text = out.read_bytes().decode("utf-8")  # valid UTF-8
    if fmt == "jsonl":
        lines = text.split("\n")
        assert lines[-1] == "" and len(lines) - 1 == len(HOSTILE)  # one line per input
        assert len(text.splitlines()) == len(HOSTILE)  # for any line splitter
        records = [json.loads(line) for line in lines[:-1]]
    else:
        records = json.loads(text)
    assert Counter(os.fsencode(r["path"]) for r in records) == expected(hostile_folder)


def test_jsonl_on_stdout(hostile_folder: bytes, v1_checkpoint: Path) -> None:
    stdout = run(hostile_folder, v1_checkpoint, "classify", "--format", "jsonl")
    records = [json.loads(line) for line in stdout.decode("utf-8").splitlines()]
    assert Counter(os.fsencode(r["path"]) for r in records) == expected(hostile_folder)


@pytest.mark.parametrize("command", ["classify", "embed"])
def test_csv_one_record_per_input_bytes_back(
    command: str, hostile_folder: bytes, v1_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.csv"
    run(hostile_folder, v1_checkpoint, command, "-o", str(out))
    text = out.read_bytes().decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == len(HOSTILE)  # -k 1 for classify: one row per input
    got = Counter(os.fsencode(read_path_field(r["path"])) for r in rows)
    assert got == expected(hostile_folder)
    # every CSV line is one record: no name spans lines
    assert len(text.splitlines()) == len(HOSTILE) + 1
    plain = os.fsdecode(os.path.join(hostile_folder, b"plain.png"))
    assert any(r["path"] == plain for r in rows)  # plain names stay plain


def test_npy_sidecar_one_line_per_row(
    hostile_folder: bytes, v1_checkpoint: Path, tmp_path: Path
) -> None:
    import numpy as np

    out = tmp_path / "feats.npy"
    run(hostile_folder, v1_checkpoint, "embed", "-o", str(out))
    assert np.load(out).shape[0] == len(HOSTILE)
    text = (tmp_path / "feats.paths.txt").read_bytes().decode("utf-8")
    assert len(text.splitlines()) == len(HOSTILE)
    lines = text.split("\n")[:-1]
    assert Counter(os.fsencode(read_path_field(line)) for line in lines) == expected(hostile_folder)


def test_safetensors_paths_metadata(
    hostile_folder: bytes, v1_checkpoint: Path, tmp_path: Path
) -> None:
    from safetensors import safe_open

    out = tmp_path / "feats.safetensors"
    run(hostile_folder, v1_checkpoint, "embed", "-o", str(out))
    with safe_open(str(out), "pt") as f:
        paths = json.loads(f.metadata()["paths"])
        assert f.get_slice("embeddings").get_shape()[0] == len(HOSTILE)
    assert Counter(os.fsencode(p) for p in paths) == expected(hostile_folder)


@pytest.mark.parametrize("where", ["file", "stdout"])
def test_table_shows_names_literally(
    where: str, hostile_folder: bytes, v1_checkpoint: Path, tmp_path: Path
) -> None:
    """One row per input, markup look-alikes as written, control characters as escapes.

    Run in the folder, given as ``.`` (paths shown in that form, whole) with one batch (the
    name column fits the first batch's names)."""
    out = tmp_path / "table.txt"
    args = ["--format", "table", "-b", "32", *(["-o", str(out)] if where == "file" else [])]
    stdout = run(b".", v1_checkpoint, "classify", *args, cwd=hostile_folder)
    data = out.read_bytes() if where == "file" else stdout
    text = data.decode("utf-8")
    assert "\x1b" not in text and "\x07" not in text and "\x7f" not in text
    rows = text.splitlines()[2:]  # after the header and its rule
    assert len(rows) == len(HOSTILE)  # -k 1: one line per input
    assert all(re.search(r"\b0\.\d{4}\b", row) for row in rows)
    for name in HOSTILE:  # each name whole, at the start of its own row
        shown = visible(os.fsdecode(name))
        # the folder given as ".": its paths shown as listed from it, "./NAME" (as typed)
        assert sum(row.startswith((f"./{shown}  ", f"{shown}  ")) for row in rows) == 1, rows
    assert "\\x1b[31mred" in text and "caf\\xe9" in text and "new\\nline" in text


PLAIN = {
    b"plain.png",
    b"x\\y",
    b"-leading-dash.png",
    b'quo"te.png',
    b"comma,name.png",
    b"back\\slash\\n.png",
    b"[bold]markup.png",
}


def test_path_field_round_trip() -> None:
    for name in HOSTILE + [b"", b"x\\y", b"\xed\xa0\x80"]:
        text = os.fsdecode(name)
        field = path_field(text)
        if b"/" not in name:
            assert (field == text) == (name in PLAIN), name
        field.encode("utf-8")  # valid UTF-8
        assert "\n" not in field and len(field.splitlines()) <= 1
        assert os.fsencode(read_path_field(field)) == name
    assert path_field("plain.png") == "plain.png"
    assert path_field("back\\slash.png") == "back\\slash.png"
    assert path_field("new\nline.png") == '"new\\nline.png"'


def test_null_separated_paths_from_stdin_end_to_end(
    tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    """`find -print0 | convnext classify - -0`: names with newlines, spaces and non-UTF-8
    bytes each give one record, and the record gives the name's bytes back."""
    names = [b"two\nlines.png", b" spaced out .png", b"caf\xe9.png", b"plain.png"]
    for name in names:
        shutil.copy(os.fsencode(photos[0]), os.path.join(os.fsencode(tmp_path), name))
    stdin = b"\0".join(os.path.join(os.fsencode(tmp_path), n) for n in names) + b"\0"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "convnext_cli",
            "classify",
            "-",
            "-0",
            "-m",
            str(v1_checkpoint),
            "--dtype",
            "float32",
            "--format",
            "jsonl",
        ],
        input=stdin,
        capture_output=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.decode("utf-8").splitlines()]
    assert [os.path.basename(os.fsencode(r["path"])) for r in records] == names
    assert all(r["predictions"] for r in records)
