"""Progress that tells the truth: elapsed time, images/s, a labelled ETA and the failures so
far on a terminal; one summary line at the end on any stderr; -q and --no-progress."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from convnext_cli.cli import app, progress
from convnext_cli.cli.progress import Batches, RunProgress, clock, note, track
from convnext_cli.results import Prediction, Result

REPO = Path(__file__).resolve().parents[2]
BAR = "━"
# (the inputs that succeeded, when some failed; all inputs): `classified 2 of 3 images in ...`
SUMMARY = re.compile(
    r"classified (?:(\d+) of )?(\d+) images? in \d+\.\d s(?: with \S+)? on cpu float32"
    r"(?:, written to \S+)?"
)
FAILED = re.compile(r"  \d+ failed: \S.*")  # every kind, no "..."
TIMES = re.compile(
    r"  \d+\.\d s start-up and model load, \d+\.\d s for the images(?: \([\d.-]+ img/s\))?"
)
SPEED = re.compile(r"  Speed: \d+\.\d ms decode, \d+\.\d ms model per image")


def closing(lines: list[str]) -> re.Match[str] | None:
    """The summary's first line (matched), checked with the lines that follow it: the time
    split, then (when the runner timed itself) the per-image speed, and nothing after."""
    lines = [line for line in lines if line.strip()]
    for i, line in enumerate(lines):
        match = SUMMARY.fullmatch(line)
        if match:
            rest = lines[i + 1 :]
            if match.group(1) is not None:  # some failed: the kinds on the next line
                assert rest and FAILED.fullmatch(rest[0]) and "..." not in rest[0], lines
                rest = rest[1:]
            assert rest and TIMES.fullmatch(rest[0]), lines
            assert len(rest) <= 2 and all(SPEED.fullmatch(r) for r in rest[1:]), lines
            return match
    return None


pty_only = pytest.mark.skipif(sys.platform == "win32", reason="needs pseudo-terminals")


@pytest.fixture(autouse=True)
def default_settings():
    yield
    progress.configure()  # tests here change the process-wide setting


@pytest.fixture
def rich_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    """RunProgress builds rich's bar (rich then decides it is no terminal): without a
    terminal and without TTY_COMPATIBLE / FORCE_COLOR it keeps rich unimported instead."""
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    # an earlier in-process command (-q, --no-progress) leaves the process's settings behind
    monkeypatch.setattr(progress.SETTINGS, "quiet", False)
    monkeypatch.setattr(progress.SETTINGS, "bar", True)


# ----------------------------------------------------------------------------- pieces


class Listing:
    """A total that is not known until the listing ends."""

    total: int | None = None


def shown(run: RunProgress) -> str:
    """The bar's line as a 120-column terminal shows it (rich's public rendering)."""
    console = Console(width=120, file=io.StringIO(), color_system=None, legacy_windows=False)
    with console.capture() as captured:
        console.print(run.progress.make_tasks_table(run.progress.tasks))
    return captured.get().rstrip()


@pytest.mark.usefixtures("rich_bar")
def test_unknown_total_shows_count_and_rate_then_eta() -> None:
    listing = Listing()
    run = RunProgress(listing)
    now = [0.0]
    run.progress.get_time = lambda: now[0]  # rich's clock for the speed samples: a steady rate
    task = run.progress.tasks[0]
    assert task.total is None
    run.advance(8)
    text = shown(run)
    assert re.search(r"(^|\s)8 images  - img/s  elapsed \d:\d\d$", text), text
    assert "ETA" not in text
    listing.total = 20
    now[0] = 2.0
    run.advance(4, failed=1)  # the total changed: rich starts its speed samples again
    now[0] = 4.0
    run.advance(4)  # 4 images in 2 s
    assert task.total == 20 and task.completed == 16
    text = shown(run)
    assert re.search(r"(^|\s)16/20  2\.0 img/s  elapsed \d:\d\d  ETA 0:02  1 failed$", text), text


@pytest.mark.usefixtures("rich_bar")
def test_total_as_int_or_none() -> None:
    assert RunProgress(7).progress.tasks[0].total == 7
    assert RunProgress(None).progress.tasks[0].total is None


def test_clock() -> None:
    assert [clock(s) for s in (0, 7.4, 61, 3600 + 62)] == ["0:00", "0:07", "1:01", "1:01:02"]


class Collect:
    names_errors_on_stderr = True

    def __init__(self) -> None:
        self.results: list[Result] = []

    def write(self, results: list[Result]) -> None:
        self.results.extend(results)


def batches() -> list[list[Result]]:
    good = Result("a.jpg", predictions=[Prediction("cat", 1, 0.9)])
    return [[good, Result("b.jpg", error="empty file")], [good]]


def test_summary_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    writer = Collect()
    failed = track(Batches(batches(), "classified", "cpu", "torch.float32"), writer, 3)
    assert failed == 1 and len(writer.results) == 3
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: b.jpg: empty file"  # a format that leaves failures out names them
    match = closing(err)
    assert match and match.groups() == ("2", "3")
    assert "  1 failed: empty file" in err


def test_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    progress.configure(quiet=True)
    note("note: not shown")
    failed = track(Batches(batches(), "classified"), Collect(), 3)
    assert failed == 1
    # under -q: the errors, and the failure count (the exit code says 1), nothing else
    assert capsys.readouterr().err.splitlines() == [
        "error: b.jpg: empty file",
        "1 of 3 inputs failed",
    ]
    progress.configure(quiet=False)
    note("note: shown")
    assert capsys.readouterr().err == "note: shown\n"


# ----------------------------------------------------------------------------- the CLI


def classify_args(checkpoint: Path, photos: list[Path], *extra: str) -> list[str]:
    common = ["-m", checkpoint, "-b", "1", "--workers", "0", "--device", "cpu"]
    return ["classify", *map(str, photos), *map(str, common), "--dtype", "float32", *extra]


def stderr_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


@pty_only
def test_bar_on_a_terminal_says_rate_and_eta(v1_checkpoint: Path, photos: list[Path]) -> None:
    from pty_helpers import run_attached, screen

    run = run_attached(classify_args(v1_checkpoint, photos), stdout="file", stderr="tty")
    assert run.returncode == 0, stderr_text(run.stderr)
    err = stderr_text(run.stderr)
    frames = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", f) for f in re.split(r"[\r\n]", err)]
    bars = [f for f in frames if BAR in f]
    assert bars, err
    assert all("img/s" in f and "elapsed" in f for f in bars)
    assert any(re.search(rf"\b{len(photos)}/{len(photos)}\b.*ETA \d+:\d\d", f) for f in bars)
    shown = [line for line in screen(run.stderr) if line]
    assert SUMMARY.fullmatch(shown[0]) and closing(shown), shown  # the bar is gone
    assert len(shown) == 3, shown  # summary, time split, speed


@pty_only
def test_no_progress_and_quiet_on_a_terminal(v1_checkpoint: Path, photos: list[Path]) -> None:
    from pty_helpers import run_attached

    args = classify_args(v1_checkpoint, photos[:2], "--format", "jsonl")
    plain = run_attached([*args, "--no-progress"], stdout="file", stderr="tty")
    assert plain.returncode == 0
    err = stderr_text(plain.stderr).strip()
    assert BAR not in err and "\x1b[" not in err
    assert SUMMARY.fullmatch(err.splitlines()[0]) and closing(err.splitlines())  # only it
    quiet = run_attached([*args, "-q"], stdout="file", stderr="tty")
    assert quiet.returncode == 0 and quiet.stderr == b""
    assert len([line for line in quiet.stdout.splitlines() if line.startswith(b"{")]) == 2


def test_not_a_terminal_no_bar_summary_unless_quiet(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    args = classify_args(v1_checkpoint, [photos[0], broken])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert BAR not in result.stderr and "\x1b[" not in result.stderr
    match = closing(result.stderr.strip().splitlines())
    assert match and match.groups() == ("1", "2")
    quiet = CliRunner().invoke(app, [*args, "-q"])
    assert quiet.exit_code == 1 and quiet.stderr == "1 of 2 inputs failed\n"


def test_quiet_silences_notes(v1_checkpoint: Path, photos: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    first = CliRunner().invoke(app, classify_args(v1_checkpoint, photos[:2], "-o", str(out)))
    assert first.exit_code == 0
    again = classify_args(v1_checkpoint, photos[:3], "-o", str(out), "--resume")
    resumed = CliRunner().invoke(app, again)
    assert resumed.exit_code == 0 and "resuming" in resumed.stderr  # a note
    match = closing(resumed.stderr.strip().splitlines())
    assert match and match.groups() == (None, "1") and f"written to {out}" in match.group(0)
    out.unlink()
    CliRunner().invoke(app, classify_args(v1_checkpoint, photos[:2], "-o", str(out)))
    quiet = CliRunner().invoke(app, [*again, "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert len(out.read_text().splitlines()) == 3


def test_embed_summary(v1_checkpoint: Path, photos: list[Path]) -> None:
    args = ["embed", str(photos[0]), "-m", str(v1_checkpoint), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--dtype", "float32"])
    assert result.exit_code == 0
    lines = result.stderr.strip().splitlines()
    assert re.fullmatch(r"embedded 1 image in \d+\.\d s with \S+ on cpu float32", lines[0]), lines
    assert TIMES.fullmatch(lines[1]) and SPEED.fullmatch(lines[2]) and len(lines) == 3
