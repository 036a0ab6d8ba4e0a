"""`--format table`: one table for any number of images, as a person sees it on a terminal.

The field failure: 200 photos gave 26 boxed tables, paths and ImageNet-22k labels wrapped
over five lines each, wider than an 80-column terminal.  The screen tests run the CLI in
pseudo-terminals of 80 and 120 columns on a folder of 200 photos with a truncated JPEG and
a text file named .jpg, with a checkpoint whose labels are the longest ImageNet-22k names,
and read the screen a person would see.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from convnext_cli.outputs.names import visible
from convnext_cli.outputs.table import (
    ERROR_MARK,
    ColumnLayout,
    bar,
    cells,
    fit,
    shorten_middle,
    shorten_path,
    shown_path,
)
from convnext_cli.outputs.writers import open_writer
from convnext_cli.results import Prediction, Result

REPO = Path(__file__).resolve().parents[2]
SCORE = re.compile(r"\b[01]\.\d{4}\b")

# ----------------------------------------------------------------------------- pieces


def test_paths_shortened_in_the_middle_keeping_the_name() -> None:
    path = "photos/2024-summer-holiday-in-the-mountains/IMG_20240712_0000.png"
    assert shorten_path(path, 80) == path
    assert shorten_path(path, 30) == "photos/…/IMG_20240712_0000.png"
    assert shorten_path(path, 40) == "photos/2024-summe…/IMG_20240712_0000.png"
    assert shorten_path(path, 24) == "…/IMG_20240712_0000.png"
    short = shorten_path(path, 16)  # the name itself too long: its start and its end
    assert short.endswith("0000.png") and short.startswith("IMG_") and "…" in short
    for width in range(8, 70):
        assert cells(shorten_path(path, width)) <= width
    wide = "写真/旅行/とても長いファイル名の写真_0001.jpg"
    for width in range(8, 40):
        assert cells(shorten_path(wide, width)) <= width
    assert shorten_middle("abcdefghij", 5).endswith("hij") and len(shorten_middle("abcdef", 5)) == 5


def test_paths_kept_as_given_and_visible(tmp_path: Path) -> None:
    inside = str(tmp_path / "photos" / "a.jpg")
    assert shown_path(inside, str(tmp_path)) == inside  # absolute as typed, not photos/a.jpg
    assert shown_path("/a.jpg", str(tmp_path)) == "/a.jpg"
    assert shown_path("./photos/../a.jpg", str(tmp_path)) == "./photos/../a.jpg"
    assert shown_path("x\n\x1b[31my.jpg", None) == "x\\n\\x1b[31my.jpg"


def test_labels_cut_with_an_ellipsis_and_bars() -> None:
    label = "Granny Smith, apple, eating apple, dessert apple, Malus pumila"
    assert fit(label, 20) == "Granny Smith, apple…" and fit(label, 200) == label
    assert bar(1.0, 8) == "█" * 8 and bar(0.0, 8) == " " * 8 and bar(0.5, 8).startswith("████")


@pytest.mark.parametrize("longest_path", [None, 1, 20, 300])
@pytest.mark.parametrize("top_k", [1, 2, 5, 10])
@pytest.mark.parametrize("width", [40, 60, 79, 80, 100, 120, 200])
def test_layout_fits_the_width(width: int, top_k: int, longest_path: int | None) -> None:
    layout = ColumnLayout.for_width(width, top_k, longest_path)
    if longest_path is not None:
        assert layout.image <= max(longest_path, 5)
    used = layout.image + 2 + layout.label + 2 + 6
    used += (layout.rank + 2 if layout.rank else 0) + (layout.index + 2 if layout.index else 0)
    used += layout.bar + 1 if layout.bar else 0
    assert used <= width
    assert layout.label >= 14 and layout.image >= (5 if longest_path else 12)
    assert layout.compact == (top_k == 1)


def fake_results() -> list[Result]:
    long_label = (
        "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"
    )
    return [
        Result(
            "d/[red]x[/].jpg",
            predictions=[Prediction(long_label, 2, 0.91), Prediction("tench", 0, 0.05)],
        ),
        Result("d/bad\x1b[2J\n.jpg", error="cannot decode image: truncated\x07"),
    ]


@pytest.mark.parametrize("columns", [80, 120])
def test_table_to_a_file(columns: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "table.txt"
    writer = open_writer("classify", "table", out, top_k=2)
    writer.write(fake_results())
    writer.write(fake_results())  # a second batch: rows only, no second header
    writer.close()
    assert writer.records == 4 and not writer.names_errors_on_stderr
    lines = out.read_text().splitlines()
    assert "\x1b" not in out.read_text()  # a file: no colours
    assert [line.split()[:3] for line in lines].count(["image", "#", "label"]) == 1
    assert all(cells(line) <= columns for line in lines), lines
    assert sum(line.startswith("d/[red]x[/].jpg") for line in lines) == 2
    errors = [line for line in lines if ERROR_MARK in line]
    assert len(errors) == 2 and all("error: cannot decode image" in e for e in errors)
    assert all(e.startswith(visible("d/bad\x1b[2J\n.jpg")) for e in errors)
    assert all("\\x07" in e for e in errors)
    assert "great white shark, white shark" in lines[2] and "…" in lines[2]
    assert "0.9100" in lines[2] and "0.0500" in lines[3]


# ----------------------------------------------------------------------------- screens

pty_only = pytest.mark.skipif(sys.platform == "win32", reason="needs pseudo-terminals")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A folder to run in: ``names-22k/`` (a checkpoint with ImageNet-22k-length labels) and
    200 photos plus two broken files under ``photos/...``; the inputs, relative to it."""
    import demo_data

    root = tmp_path_factory.mktemp("screens")
    demo_data.long_label_checkpoint(root / "names-22k")
    return root, demo_data.photo_folder(root)


def run_screen(root: Path, columns: int, *args: object):
    from pty_helpers import run_attached

    common = ["-m", "names-22k", "--device", "cpu", "--dtype", "float32"]
    return run_attached(
        ["classify", *map(str, args), *common],
        stdout="tty",
        stderr="tty",
        columns=columns,
        cwd=root,
        env={"PYTHONPATH": str(REPO)},
    )


def table_lines(stdout: bytes, columns: int) -> tuple[int, list[str]]:
    """The table on the screen: the image column's width (from the header) and the rows;
    checks it is one table that fits the terminal."""
    from pty_helpers import screen

    lines = [line for line in screen(stdout) if line]
    assert all(cells(line) <= columns for line in lines), max(lines, key=cells)
    headers = [n for n, line in enumerate(lines) if line.split()[:1] == ["image"]]
    assert headers == [0], lines[:5]  # exactly one header line, first
    assert set(lines[1]) == {"─"}
    header = lines[0]
    image_width = header.index("#") - 2 if "#" in header else header.index("label") - 2
    return image_width, lines[2:]


def check_rows(rows: list[str], inputs: list[str], image_width: int, broken: set[str]) -> None:
    """Each input starts exactly one line, with its path shortened on that one line; the
    other lines are its further predictions (or the rest of an error), indented."""
    starts = [row for row in rows if not row.startswith(" ")]
    shown = {shorten_path(path, image_width): path for path in inputs}
    assert len(shown) == len(inputs)
    assert len(starts) == len(inputs)
    for row in starts:
        key = row[:image_width].rstrip()
        path = shown.pop(key)  # every path once, never wrapped: its whole short form here
        if Path(path).name in broken:
            assert f"{ERROR_MARK}" in row and "error: " in row, row
            assert not SCORE.search(row)
        else:
            assert SCORE.search(row), row
    assert not shown
    for row in rows:
        if row.startswith(" ") and SCORE.search(row):  # a further prediction: rank, label
            assert re.match(rf"\s{{{image_width}}}\s+\d+\s\s\S", row), row


BROKEN = {"IMG_20240712_0042_truncated.jpg", "notes-from-the-trip.jpg"}


@pty_only
@pytest.mark.parametrize("columns", [80, 120])
def test_single_image_screen(columns: int, demo: tuple[Path, list[str]]) -> None:
    root, inputs = demo
    run = run_screen(root, columns, inputs[0])
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    image_width, rows = table_lines(run.stdout, columns)
    assert len(rows) == 5  # top-5, one line each
    check_rows(rows, inputs[:1], image_width, set())
    assert "…" in rows[0]  # a 22k-length label, cut to fit
    from pty_helpers import screen

    summary = [line for line in screen(run.stderr) if line][-3]
    assert re.fullmatch(r"classified 1 image in \d+\.\d s with names-22k on cpu float32", summary)


@pty_only
@pytest.mark.parametrize("top_k", [5, 1])
@pytest.mark.parametrize("columns", [80, 120])
def test_folder_of_200_with_errors_screen(
    columns: int, top_k: int, demo: tuple[Path, list[str]]
) -> None:
    from pty_helpers import screen

    root, inputs = demo
    run = run_screen(root, columns, Path(inputs[0]).parent, "-k", top_k)
    assert run.returncode == 1, run.stderr.decode(errors="replace")  # two inputs failed
    image_width, rows = table_lines(run.stdout, columns)
    assert image_width == min(len(inputs[0]), ColumnLayout.for_width(columns, top_k).image)
    check_rows(rows, inputs, image_width, BROKEN)
    good = [row for row in rows if SCORE.search(row)]
    assert len(good) == (len(inputs) - len(BROKEN)) * top_k
    if top_k == 1:  # compact: one line per image (an error may take a second line)
        assert len(rows) <= len(inputs) + len(BROKEN)
    shown_err = [line for line in screen(run.stderr) if line]
    assert re.fullmatch(
        r"classified 200 of 202 images in \d+\.\d s with names-22k on cpu float32",
        shown_err[-4],
    ), shown_err
    assert shown_err[-3].startswith("  2 failed: 1 "), shown_err  # every kind, no "..."
    assert "img/s" in shown_err[-2] and shown_err[-1].startswith("  Speed: ")
    assert "img/s" in run.stderr.decode() and "ETA" in run.stderr.decode()  # the bar was there


@pty_only
@pytest.mark.parametrize("columns", [80, 200])
def test_absolute_inputs_shown_as_typed(columns: int, demo: tuple[Path, list[str]]) -> None:
    """An absolute path stays absolute (not ../x or photos/x); cut in the middle only when
    it does not fit the column."""
    root, inputs = demo
    typed = str(root / inputs[3])
    run = run_screen(root, columns, typed, "-k", "1")
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    image_width, rows = table_lines(run.stdout, columns)
    assert image_width == min(len(typed), ColumnLayout.for_width(columns, 1).image)
    assert rows[0].startswith(shorten_path(typed, image_width) + "  ")
    assert rows[0].startswith("/")
    if len(typed) <= image_width:
        assert rows[0].startswith(typed + "  ")
    else:
        assert "…" in rows[0][:image_width]
