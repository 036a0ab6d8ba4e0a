"""Listing at scale: the local engine streams its inputs.

The first records are written while the listing is still going on (a folder that takes
forever to read, stdin still open), in the order a full listing gives; --shard and the
refusal to write -o over an input hold per input as it is listed; an empty stream is
still "no input images found" (exit 2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from helpers import record_ids
from typer.testing import CliRunner

from convnext_cli.cli import app
from convnext_cli.inputs.expand import InputStream, expand_inputs, iter_inputs

CLI = [sys.executable, "-m", "convnext_cli"]
CPU = ["--device", "cpu", "--dtype", "float32", "-k", "1", "-b", "4"]
TIMEOUT = 120

# os.scandir, slowed down: reading a folder whose name ends in "-slow" waits until the file
# named by CONVNEXT_TEST_RELEASE exists (a huge tree, or a network file system, mid-listing)
SLOW_LISTING = """
import os, sys, time
real_scandir = os.scandir
def scandir(path="."):
    if str(path).rstrip("/").endswith("-slow"):
        release = os.environ["CONVNEXT_TEST_RELEASE"]
        deadline = time.monotonic() + 120
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)
    return real_scandir(path)
os.scandir = scandir
sys.argv = ["convnext", *sys.argv[1:]]
from convnext_cli.cli import main
main()
"""


def stop(proc: subprocess.Popen) -> None:
    """Kill a child a test started if it is still running (a failed assertion, a timeout)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def read_line_within(stream: IO[bytes], seconds: float) -> bytes:
    """One line from a pipe, or b'' if none comes within `seconds`."""
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    return got[0] if got else b""


@pytest.fixture
def tree(tmp_path: Path, photos: list[Path]) -> Path:
    """tree/a/ with 8 photos, then tree/b-slow/ with 4 more (listed last, slowly)."""
    root = tmp_path / "tree"
    for folder, count in (("a", 8), ("b-slow", 4)):
        (root / folder).mkdir(parents=True)
        for n in range(count):
            photo = photos[n % len(photos)]
            shutil.copy(photo, root / folder / f"{n:02d}{photo.suffix}")
    return root


@pytest.mark.parametrize("workers", ["0", "1"])
def test_first_records_come_before_the_listing_ends(
    workers: str, tree: Path, v1_checkpoint: Path, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    env = dict(os.environ, CONVNEXT_TEST_RELEASE=str(release))
    args = ["classify", str(tree), "-r", "-m", str(v1_checkpoint), *CPU, "--format", "jsonl"]
    with open(tmp_path / "stderr", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_LISTING, *args, "--workers", workers],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    try:
        assert proc.stdout is not None
        first = read_line_within(proc.stdout, TIMEOUT)
        # a record is out, and the listing is still held at tree/b-slow
        assert json.loads(first)["path"] == str(tree / "a" / "00.png")
        assert proc.poll() is None and not release.exists()
        release.touch()
        out = proc.stdout.read()
        proc.wait(timeout=TIMEOUT)
    finally:
        release.touch()
        stop(proc)
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    paths = [json.loads(first)["path"]] + [json.loads(x)["path"] for x in out.splitlines()]
    assert paths == expand_inputs([str(tree)], recursive=True)


def test_first_records_come_before_stdin_ends(
    photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    """``-``: paths are taken as they arrive; the pipe is still open when the first record
    is written."""
    proc = subprocess.Popen(
        [*CLI, "classify", "-", "-m", str(v1_checkpoint), *CPU, "--workers", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    listing = [str(photos[n % len(photos)]) for n in range(20)]
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("".join(f"{p}\n" for p in listing[:12]).encode())
        proc.stdin.flush()
        first = read_line_within(proc.stdout, TIMEOUT)
        assert json.loads(first)["path"] == listing[0]
        assert proc.poll() is None  # waiting for more paths
        proc.stdin.write("".join(f"{p}\n" for p in listing[12:]).encode())
        proc.stdin.close()
        out = proc.stdout.read()
        proc.wait(timeout=TIMEOUT)
    finally:
        stop(proc)
    assert proc.returncode == 0
    # the same photo listed again is recorded as PATH#2, PATH#3, ... (one id per input)
    paths = [json.loads(first)["path"]] + [json.loads(x)["path"] for x in out.splitlines()]
    assert paths == record_ids(listing)


def test_a_stream_of_paths_written_whole_before_reading_does_not_deadlock(
    tmp_path: Path, v1_checkpoint: Path
) -> None:
    """A caller that writes all of stdin before it reads any output (more than either pipe
    holds) still gets every record: stdin is drained while the run writes."""
    listing = [str(tmp_path / f"missing-{n:05d}.jpg") for n in range(3000)]
    proc = subprocess.Popen(
        [*CLI, "classify", "-", "-m", str(v1_checkpoint), *CPU, "--workers", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin = proc.stdin

    def write_all() -> None:
        stdin.write("".join(f"{p}\n" for p in listing).encode())
        stdin.close()

    try:
        writer = threading.Thread(target=write_all, daemon=True)
        writer.start()
        writer.join(TIMEOUT)  # everything written before a single record is read
        assert not writer.is_alive(), "the run stopped reading its stdin"
        out = proc.stdout.read()
        proc.wait(timeout=TIMEOUT)
    finally:
        stop(proc)
    assert proc.returncode == 1  # every path is missing: an error record each
    assert [json.loads(x)["path"] for x in out.splitlines()] == listing


def test_an_input_listed_mid_run_that_is_the_output_is_refused(
    tree: Path, v1_checkpoint: Path, tmp_path: Path
) -> None:
    """-o names a file that the listing meets only later (tree/b-slow/03.png): the run stops
    there with the usual one-line refusal (exit 2); the file is untouched and no partial
    output is left."""
    victim = tree / "b-slow" / "03.png"
    before = victim.read_bytes()
    result = CliRunner().invoke(
        app,
        ["classify", str(tree), "-r", "-m", str(v1_checkpoint), *CPU, "--workers", "0"]
        + ["--format", "jsonl", "-o", str(victim)],
    )
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "refusing to write the output over an input" in lines[0]
    assert victim.read_bytes() == before
    assert sorted(p.name for p in victim.parent.iterdir()) == [
        "00.png",
        "01.png",
        "02.png",
        "03.png",
    ]


def test_shards_of_a_stream_match_shards_of_the_list(tree: Path, v1_checkpoint: Path) -> None:
    listed = expand_inputs([str(tree)], recursive=True)
    seen = []
    for index in range(3):
        result = CliRunner().invoke(
            app,
            ["classify", str(tree), "-r", "-m", str(v1_checkpoint), *CPU, "--workers", "0"]
            + ["--format", "jsonl", "--shard", f"{index}/3"],
        )
        assert result.exit_code == 0, result.stderr
        got = [json.loads(x)["path"] for x in result.stdout.splitlines()]
        assert got == listed[index::3]
        seen += got
    assert sorted(seen) == sorted(map(str, listed))


def test_empty_streams_are_a_usage_error(tmp_path: Path) -> None:
    for args, stdin in ((["-"], ""), ([str(tmp_path)], None)):
        result = CliRunner().invoke(app, ["classify", *args], input=stdin)
        assert result.exit_code == 2
        assert "no input images found" in result.stderr


def test_input_stream_knows_its_total_when_the_listing_ends(tree: Path) -> None:
    """Listed ahead in a thread: the total is known while inputs are still to be handed
    out (the progress bar's ETA), and the inputs still come one at a time, in order."""
    stream = InputStream(iter_inputs([str(tree)], recursive=True))
    first = [next(stream) for _ in range(3)]
    assert stream.count == 3
    deadline = time.monotonic() + 60
    while stream.total is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.total == 12 and stream.count == 3
    rest = list(stream)
    assert len(first) + len(rest) == 12 == stream.count
    assert first + rest == list(iter_inputs([str(tree)], recursive=True))


def test_a_deep_tree_is_listed_without_recursion_limits(tmp_path: Path) -> None:
    """Deeper than Python's recursion limit (the listing keeps its own stack).

    The limit is lowered for the test rather than the tree built past the process's own
    limit: torch._dynamo raises that to thousands once imported, and a tree that deep has
    paths longer than PATH_MAX (4,096 bytes), which no listing can open.
    """
    depth_now = 0
    frame = sys._getframe()
    while frame.f_back is not None:
        frame, depth_now = frame.f_back, depth_now + 1
    limit = depth_now + 150  # room for the listing's own calls, not for one per folder
    chain = [tmp_path]
    old_limit = sys.getrecursionlimit()
    try:
        for _ in range(limit + 50):
            chain.append(chain[-1] / "d")
            chain[-1].mkdir()
        (chain[-1] / "x.jpg").write_bytes(b"x")
        sys.setrecursionlimit(limit)
        listed = expand_inputs([str(tmp_path)], recursive=True)
        sys.setrecursionlimit(old_limit)
        assert listed == [str(chain[-1] / "x.jpg")]
    finally:  # rmtree itself recurses
        sys.setrecursionlimit(old_limit)
        (chain[-1] / "x.jpg").unlink(missing_ok=True)
        for folder in reversed(chain[1:]):
            if folder.exists():
                folder.rmdir()


# Names that a folder-at-a-time listing could get wrong: case, dot files (".jpg" has no
# extension, "..a.jpg" has), several dots, extensions followed by more, a newline, bytes
# that are not UTF-8, a character whose lower case is longer ("İ"), dataset files.
AWKWARD_NAMES = [
    "a.jpg",
    "B.JPG",
    "c.Jpeg",
    "d.png.txt",
    "e",
    "f.",
    ".jpg",
    "..jpg",
    "...",
    ".hidden.png",
    "..a.jpg",
    "g.tar",
    "h.PARQUET",
    "i.pq",
    "j.jpg\n",
    "k .webp",
    "İ.JPG",
    "İİİ",
    "l.tiff",
    "m.tif",
    "n.gif.",
    os.fsdecode(b"\xff\xfe.jpg"),
    os.fsdecode(b"o\xff"),
    "-p.bmp",
    "[q].png",
]


def reference_listing(folder: Path, recursive: bool) -> list[str]:
    """The documented policy, one entry at a time with the public is_listed (the oracle)."""
    from convnext_cli.inputs.expand import is_listed

    files, folders = [], []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if not is_dir and is_listed(entry.name):
            files.append(entry.path)
        elif is_dir and recursive and not entry.is_symlink():
            folders.append(Path(entry.path))
    return files + [path for sub in folders for path in reference_listing(sub, recursive)]


def awkward_tree(root: Path, alike: int) -> Path:
    """A folder of awkward names, of `alike` plain .jpg files (a block all alike), of special
    files named like images, and a sub-folder of each kind."""
    root.mkdir()
    for name in AWKWARD_NAMES:
        (root / name).write_bytes(b"")
    for n in range(alike):
        (root / f"{n:05d}.jpg").write_bytes(b"")
    os.mkfifo(root / "fifo.jpg")
    (root / "broken.png").symlink_to(root / "nowhere")
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "sub.jpg").mkdir()
    (root / "sub.jpg" / "inner.png").write_bytes(b"")
    (root / "sub").mkdir()
    (root / "sub" / "x.JPEG").write_bytes(b"")
    (root / "link.jpg").symlink_to(root / "sub")
    only = root / "only-alike"
    only.mkdir()
    for n in range(alike):
        (only / f"{n:05d}.{'JPG' if n % 7 == 0 else 'jpg'}").write_bytes(b"")
    dots = root / "dots"
    dots.mkdir()
    for name in (".jpg", "a.jpg", "b.jpg"):  # all end in .jpg, one has no extension
        (dots / name).write_bytes(b"")
    tars = root / "tars"
    tars.mkdir()
    for n in range(5):
        (tars / f"{n}.tar").write_bytes(b"")
    return root


@pytest.mark.parametrize("block", [3, 4096])
@pytest.mark.parametrize("recursive", [True, False])
def test_folder_listing_decides_as_one_entry_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int, recursive: bool
) -> None:
    """The listing takes a folder's entries a block at a time and decides a block without
    sub-folders as a whole (the fast path); it must list exactly what the per-entry policy
    lists, in the same order, with blocks of 3 (every kind of block, mixed) and of 4096
    (whole folders), and say of every chunk holding a dataset file that it may."""
    from convnext_cli.inputs import expand as inputs

    monkeypatch.setattr(inputs, "SCAN_BLOCK", block)
    root = awkward_tree(tmp_path / "awkward", alike=20)
    expected = reference_listing(root, recursive)
    assert str(root / "a.jpg") in expected and str(root / "fifo.jpg") in expected
    assert str(root / "dots" / ".jpg") not in expected
    if recursive:
        assert str(root / "sub" / "x.JPEG") in expected and str(root / "dots" / "a.jpg") in expected

    chunks = list(inputs.folder_chunks(str(root), recursive, None))
    assert [path for paths, _ in chunks for path in paths] == expected
    assert inputs.folder_images(root, recursive) == expected
    for paths, datasets in chunks:
        assert datasets or not any(inputs.is_dataset_file(path) for path in paths)
    # and in a whole listing, the dataset files become their (here: broken) members
    listed = expand_inputs([str(root)], recursive=recursive)
    plain = [item for item in listed if isinstance(item, str)]
    assert plain == [path for path in expected if not inputs.is_dataset_file(path)]
    assert len(listed) > len(plain)


def test_input_stream_hands_over_every_input_with_a_small_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The listing and the run meet through a deque: with a window of 5 inputs, a listing
    that pauses and a run that pauses, every input comes once, in order, and an error
    raised by the listing comes after the inputs before it."""
    from convnext_cli.inputs import expand as inputs

    monkeypatch.setattr(inputs, "LISTING_AHEAD", 5)

    def listing() -> Iterator[str]:
        for n in range(3000):
            if n % 700 == 0:
                time.sleep(0.02)  # the run waits for the listing
            yield f"{n:05d}.jpg"
        raise OSError("the disk went away")

    stream = InputStream(listing())
    got: list[str] = []
    with pytest.raises(OSError, match="the disk went away"):
        for path in stream:
            got.append(str(path))
            if len(got) % 500 == 0:
                time.sleep(0.02)  # the listing waits for the run (window full)
    assert got == [f"{n:05d}.jpg" for n in range(3000)] and stream.count == 3000
    assert list(stream) == []
