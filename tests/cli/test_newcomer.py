"""The first ten minutes, part two (issue 30), the way a newcomer meets them: real
pseudo-terminals at 80 and 120 columns, real subprocesses, a real Ctrl-C.

- Everything said on stderr for people wraps at spaces to the terminal's width, never
  inside a word, and not at all when stderr is a file or a pipe;
- the summary counts successes plainly, names the model, lists every failure kind;
- a mistyped folder is an error at once (exit 2), before the model loads; no speed figures
  for images never decoded;
- ``embed --stage`` on a terminal shows the stage features; help that fits and says true
  things; ``-k 0`` is one ``error:`` line; one-batch benchmark rows are marked; a replaced
  output is said; ``convnext env`` notices a broken torchvision.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import invoke, repeated_paths
from pty_helpers import _drain, _terminal, run_attached, screen
from rich.cells import cell_len

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs pseudo-terminals")

CPU = ["--device", "cpu", "--dtype", "float32", "--workers", "0"]
CLI = [sys.executable, "-m", "convnext_cli"]
NUMBER = re.compile(r"\d+(\.\d+)?")


def words(lines: list[str]) -> list[str]:
    """The words of some lines, in order, numbers (timings) made alike."""
    return [NUMBER.sub("0", word) for line in lines for word in line.split()]


def assert_wrapped_at_words(shown: list[str], whole: list[str], columns: int) -> None:
    """``shown`` (a terminal's lines) is ``whole`` (the same text unwrapped) cut at spaces
    only: no line wider than the terminal, the same words in the same order, none broken."""
    assert all(cell_len(line) <= columns for line in shown), max(shown, key=cell_len)
    assert words(shown) == words(whole), (shown, whole)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> list[Path]:
    """Two photos and one input of each kind of failure, in a folder with a long name (so
    the summary is longer than 120 columns)."""
    folder = tmp_path_factory.mktemp("a-folder-with-a-rather-long-name-for-the-summary-line")
    shutil.copy(photos[0], folder / "good-1.png")
    shutil.copy(photos[-1], folder / "good-2.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image at all")
    data = photos[-1].read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 3])
    names = ["good-1.png", "good-2.jpg", "empty.jpg", "notes.jpg", "cut.jpg", "missing.jpg"]
    return [folder / name for name in names]


def stderr_lines(data: bytes) -> list[str]:
    return [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]


def test_summary_wraps_at_words_on_a_terminal_only(
    mixed: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    out = "labels-of-the-first-ten-minutes-part-two.jsonl"  # in tmp_path: a word < 78 cells
    args = ["classify", *mixed, "-m", v1_checkpoint, *CPU, "-o", out]
    piped = run_attached(args, stdout="pipe", stderr="pipe", cwd=tmp_path)
    assert piped.returncode == 1, piped.stderr
    whole = stderr_lines(piped.stderr)
    # not a terminal: every line whole, however long
    first = next(line for line in whole if line.startswith("classified "))
    assert re.fullmatch(
        rf"classified 2 of 6 images in \d+\.\d s with {re.escape(str(v1_checkpoint))} on cpu "
        rf"float32, written to {out}",
        first,
    ), whole
    assert len(first) > 120
    failed = whole[whole.index(first) + 1]
    assert failed.startswith("  4 failed: ") and "..." not in failed, whole
    kinds = {kind.split(" ", 1)[1] for kind in failed.removeprefix("  4 failed: ").split(", ")}
    assert kinds == {"empty file", "not a recognised image format", "cannot decode image"} | {
        "no such file"
    }, failed
    for columns in (80, 120):
        (tmp_path / out).unlink()  # else a note says it was replaced
        run = run_attached(args, stdout="pipe", stderr="tty", columns=columns, cwd=tmp_path)
        assert run.returncode == 1
        shown = [line for line in screen(run.stderr) if line.strip()]
        assert_wrapped_at_words(shown, whole, columns)
        assert len(shown) > len(whole)  # the summary's first line did need wrapping


def test_one_line_errors_wrap_at_words(tmp_path: Path) -> None:
    args = ["classify", "x.jpg", "-k", "2.5"]  # a usage error: no model is loaded
    whole = stderr_lines(run_attached(args, stdout="pipe", stderr="pipe").stderr)
    assert len(whole) == 1 and whole[0].startswith("error: Invalid value for '--top-k'"), whole
    assert "╭" not in whole[0] and "Usage:" not in whole[0]  # not Typer's boxed panel
    for columns in (80, 120):
        run = run_attached(args, stdout="pipe", stderr="tty", columns=columns)
        assert run.returncode == 2
        shown = [line for line in screen(run.stderr) if line.strip()]
        assert_wrapped_at_words(shown, whole, columns)
        assert (len(shown) > 1) == (len(whole[0]) > columns)


def test_ctrl_c_hint_wraps_at_words(
    photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    """A real SIGINT mid-run, stderr an 80-column terminal: the note on what was kept and
    how to go on is cut at spaces, '--resume' whole."""
    out = "a-long-name-for-the-labels-file.jsonl"  # in tmp_path: the note needs two lines
    master, slave = _terminal(80)
    listing = "".join(f"{path}\n" for path in repeated_paths(photos, 3000)).encode()
    proc = subprocess.Popen(
        [*CLI, "classify", "-", "-m", str(v1_checkpoint), *CPU, "-b", "1", "-o", out],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env={**os.environ, "COLUMNS": "80", "TERM": "xterm-256color"},
        cwd=tmp_path,
        start_new_session=True,
    )
    os.close(slave)
    received: list[bytes] = []
    drain = threading.Thread(target=_drain, args=(master, received), daemon=True)
    drain.start()
    assert proc.stdin is not None
    proc.stdin.write(listing)
    proc.stdin.close()
    deadline = time.monotonic() + 240
    while not re.search(rb"\D[1-9]\d*/3000", b"".join(received)):  # the bar counts records
        assert time.monotonic() < deadline and proc.poll() is None, b"".join(received)
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    drain.join(timeout=30)
    os.close(master)
    shown = [line for line in screen(b"".join(received)) if line.strip()]
    start = next(n for n, line in enumerate(shown) if line.startswith("kept "))
    note = [shown[start]]
    note += [line for line in shown[start + 1 :] if line.startswith("  ")]  # its continuation
    assert "interrupted" in shown[start + len(note) :]  # then the last line: exit 130
    assert len(note) >= 2 and all(cell_len(line) <= 80 for line in note), note
    joined = " ".join(line.strip() for line in note)
    assert re.fullmatch(
        rf"kept \d+ records? in {out}; run the same command with --resume "
        "to continue",
        joined,
    ), note
    assert "--resume" in " ".join(note).split()  # never cut as `--resum` / `e`


def test_nothing_named_exists_is_an_error_before_the_model_loads(tmp_path: Path) -> None:
    """A mistyped folder: exit 2 at once (the model named does not even exist: it is never
    looked at); a glob that matches nothing likewise."""
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    for given, said in (
        (["nothing_here/"], "error: nothing_here/: no such file or folder"),
        (["nothing_here/", "nope.jpg"], "error: nothing_here/, nope.jpg: none of these exists"),
        (["nothing_here/*.jpg"], "error: nothing_here/*.jpg: matches no file"),
    ):
        done = subprocess.run(
            [*CLI, "classify", *given, "-m", "no-such-model", *CPU],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=offline,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == said
        assert done.stdout == ""


def test_no_speed_for_images_never_decoded(
    mixed: list[Path], v1_checkpoint: Path, photos: list[Path]
) -> None:
    """Every input failed: the summary says so, with no rate and no Speed line; a missing
    file named beside one that exists still gets its own record (exit 1, not 2)."""
    result = invoke("classify", mixed[2], mixed[3], "-m", v1_checkpoint, *CPU, "--format", "jsonl")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("classified 0 of 2 images in "), lines
    assert lines[1] == "  2 failed: 1 empty file, 1 not a recognised image format", lines
    assert "img/s" not in result.stderr and "Speed" not in result.stderr
    assert len(lines) == 3 and lines[2].endswith(" s for the images"), lines
    beside = invoke("classify", mixed[5], photos[0], "-m", v1_checkpoint, *CPU, "--format", "csv")
    assert beside.exit_code == 1 and "no such file" in beside.stdout


@pytest.mark.parametrize("columns", [80, 120])
def test_embed_stages_on_a_terminal(columns: int, photos: list[Path], v1_checkpoint: Path) -> None:
    args = ["embed", *photos[:3], "-m", v1_checkpoint, *CPU, "--stage", "stage2"]
    run = run_attached([*args, "--stage", "stage4"], stdout="tty", stderr="pipe", columns=columns)
    assert run.returncode == 0, run.stderr
    lines = [line for line in screen(run.stdout) if line]
    assert "error" not in run.stdout.decode() and "None" not in run.stdout.decode()
    assert all(cell_len(line) <= columns for line in lines)
    assert lines[0].startswith("first values shown; -o feats.safetensors writes them all")
    assert lines[1].split() == ["image", "stage", "dim", "norm", "values"]
    rows = lines[3:]
    assert len(rows) == 6  # two stages an image
    assert [row.split()[0].split("/")[-1] for row in rows[::2]] == [p.name for p in photos[:3]]
    assert [row.split()[1] for row in rows[::2]] == ["stage2"] * 3
    assert [row.split()[0] for row in rows[1::2]] == ["stage4"] * 3  # the path not repeated
    dims = {int(row.split()[2]) for row in rows[::2]}, {int(row.split()[1]) for row in rows[1::2]}
    assert dims == ({16}, {32})
    assert "embedded 3 images in " in run.stderr.decode()
    one = run_attached(args, stdout="tty", stderr="pipe", columns=columns)
    head = [line for line in screen(one.stdout) if line][0]
    assert head.startswith("first ") and "of 16 values shown; -o feats.npy writes them all" in head
    maps = run_attached([*args, "--pool", "none"], stdout="tty", stderr="pipe", columns=columns)
    assert maps.returncode == 2 and maps.stdout == b""
    said = stderr_lines(maps.stderr)
    assert len(said) == 1 and "the terminal's table cannot hold" in said[0], said
    assert "-o FILE.npy" in said[0] and "not jsonl" not in said[0]


def test_replacing_an_output_is_said(
    photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "labels.jsonl"
    common = ["classify", *photos[:2], "-m", v1_checkpoint, *CPU, "-o", out]
    first = invoke(*common)
    assert first.exit_code == 0 and "replaced" not in first.stderr
    second = invoke(*common[:2], *common[3:])  # one image this time
    assert second.exit_code == 0
    assert len(out.read_text().splitlines()) == 1
    notes = [line for line in second.stderr.splitlines() if "replaced" in line]
    assert len(notes) == 1 and notes[0].startswith(f"note: replaced the earlier {out} ("), notes
    assert "--resume" in notes[0]
    assert "replaced" not in invoke(*common, "-q").stderr  # -q: no notes


def test_env_notices_a_torchvision_that_does_not_work(tmp_path: Path) -> None:
    """A torchvision whose operators are missing (built for another torch) imports fine:
    `convnext env` calls one and says it is broken."""
    fake = tmp_path / "shadow" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "class ops:\n"
        "    @staticmethod\n"
        "    def nms(*args):\n"
        "        raise RuntimeError('operator torchvision::nms does not exist')\n"
    )
    path = os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    text = subprocess.run([*CLI, "env"], capture_output=True, text=True, env=env, timeout=120)
    assert text.returncode == 0, text.stderr
    flat = " ".join(text.stdout.split())
    assert "broken: torchvision" in flat and "torchvision::nms does not exist" in flat
    as_json = subprocess.run(
        [*CLI, "env", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    problems = json.loads(as_json.stdout)["problems"]
    assert len(problems) == 1 and "torchvision" in problems[0]
    healthy = subprocess.run([*CLI, "env", "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(healthy.stdout)["problems"] == []


def help_screen(*command: str) -> list[str]:
    run = run_attached([*command, "-h"], stdout="tty", stderr="same", columns=80)
    assert run.returncode == 0
    return screen(run.stdout)


def test_help_is_short_and_says_true_things() -> None:
    classify = help_screen("classify")
    assert len(classify) <= 100, len(classify)  # 139 lines before issue 30
    embed = "\n".join(help_screen("embed"))
    assert "--labels" not in embed  # an embedding has no class names
    force = " ".join(line for line in embed.splitlines() if "--force-resume" in line)
    assert "top-k" not in force
    assert "NAME.paths.txt" in " ".join(embed.split())
    convert = " ".join(" ".join(help_screen("convert")).split())
    assert "MODEL" not in convert and "SOURCE" in convert
    benchmark = help_screen("benchmark")
    flat = " ".join(line.strip("│ ") for line in benchmark)
    assert "max-autotune-no-cudagraphs" in flat.split() or "max-autotune-no-cudagraphs." in flat
    # the descriptions keep their room: no on/off pair widening the middle columns (the
    # description started at column 58 before issue 30, 20 cells left for it)
    channels = next(line for line in benchmark if line.startswith("│ --channels-last"))
    assert channels.index("NHWC") <= 40, channels
    assert any("--no-channels-last" in line for line in benchmark)


def test_benchmark_with_fewer_images_than_a_batch_times_full_batches(
    photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    """6 images and batch 8: the end-to-end row is not one partial batch of 6 (issue 30): the
    images are cycled into full batches, and a note says so; --iters 1 rows are noisy."""
    folder = tmp_path / "six"
    folder.mkdir()
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    done = subprocess.run(
        [*CLI, "benchmark", "-m", str(v1_checkpoint), "--device", "cpu", "-b", "2,8"]
        + ["--images", str(folder), "--iters", "1", "--warmup", "0", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = {(r["mode"], r["batch_size"]): r for r in report["rows"]}
    row = rows[("end-to-end", 8)]
    assert row["images"] % 8 == 0 and row["images"] >= 20 * 8, row
    assert rows[("model", 8)]["noisy"]  # --iters 1: one timed batch
    assert "single timed batch" in report["header"]["noise_rule"]
    said = " ".join(done.stderr.split())
    assert f"--images has {len(photos)} images, fewer than batch 8" in said
    assert "cycled" in said


def test_wrapping_counts_cells_and_cuts_only_words_wider_than_a_line() -> None:
    from convnext_cli.outputs.names import wrap_words

    line = "error: 写真の名前が長いファイル.jpg: cannot decode image: the file ends too early"
    for width in (32, 44, 60):  # the longest word is 29 cells: it fits after the indent
        wrapped = wrap_words(line, width)
        assert all(cell_len(part) <= width for part in wrapped), wrapped
        assert " ".join(wrapped).split() == line.split()  # no word cut, none lost
        assert all(part.startswith("  ") for part in wrapped[1:])
    path = "/a/" + "x" * 70 + ".jpg"
    wrapped = wrap_words(f"error: {path}: no such file", 40)
    assert all(cell_len(part) <= 40 for part in wrapped)
    assert "".join(part.strip() for part in wrapped).startswith(f"error: {path}:")


def test_the_summary_names_every_kind_or_counts_two_or_more() -> None:
    from collections import Counter

    from convnext_cli.cli.progress import failure_kinds

    four = Counter({"empty file": 3, "no such file": 2, "cannot decode image": 1, "x": 1})
    assert failure_kinds(four, 7) == "3 empty file, 2 no such file, 1 cannot decode image, 1 x"
    five = Counter({f"kind {n}": 6 - n for n in range(5)})
    assert failure_kinds(five, 20).count(",") == 4 and "more" not in failure_kinds(five, 20)
    seven = Counter({f"kind {n}": 8 - n for n in range(7)})
    said = failure_kinds(seven, sum(seven.values()))
    assert said.endswith(", 9 more of 3 other kinds") and "..." not in said, said
