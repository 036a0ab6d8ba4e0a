"""Signals and exit codes, with real signals and real closed pipes on a subprocess.

130 Ctrl-C (at any moment, imports included) · 143 SIGTERM · both keep every finished
record in a valid, closed output · 141 the reader of stdout went away (quiet) · 70 internal
error · 2 "cannot write output".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers import repeated_paths

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

CLI = [sys.executable, "-m", "convnext_cli"]


def common(checkpoint: Path) -> list[str]:
    return ["-m", str(checkpoint), "--dtype", "float32", "--device", "cpu"]


def listing(photos: list[Path], count: int = 3000) -> str:
    return "".join(f"{path}\n" for path in repeated_paths(photos, count))


def start(args: Sequence[object], stdin: str | None = None, **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*CLI, *map(str, args)],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=kwargs.pop("stdout", subprocess.PIPE),
        stderr=subprocess.PIPE,
        **kwargs,
    )
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
        proc.stdin = None
    return proc


def wait_for_size(path: Path, size: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > size:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never grew past {size} bytes")


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.5])
def test_ctrl_c_at_any_moment_is_one_line_and_130(
    delay: float, v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    """During imports (0.2 s), while the model loads, or mid-run: one line, exit 130."""
    proc = start(["classify", "-", *common(v1_checkpoint), "-b", "2"], stdin=listing(photos))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.decode().strip().splitlines() == ["interrupted"], err


@pytest.mark.parametrize(
    "signum,code,fmt,command",
    [
        (signal.SIGTERM, 143, "json", "classify"),
        (signal.SIGINT, 130, "json", "classify"),
        (signal.SIGTERM, 143, "jsonl", "classify"),
        (signal.SIGTERM, 143, "csv", "classify"),
        (signal.SIGTERM, 143, "npy", "embed"),
        (signal.SIGINT, 130, "safetensors", "embed"),
    ],
)
def test_signal_mid_run_keeps_finished_records_in_a_valid_file(
    signum: int,
    code: int,
    fmt: str,
    command: str,
    v1_checkpoint: Path,
    photos: list[Path],
    tmp_path: Path,
) -> None:
    out = tmp_path / f"out.{fmt}"
    inputs = [p for p in photos if p.suffix.lower() in (".png", ".jpg")]
    args = [command, "-", *common(v1_checkpoint), "-b", "4", "--workers", "1", "-o", out]
    proc = start(args, stdin=listing(inputs))
    wait_for_size(tmp_path / f".out.{fmt}.partial", 300)  # some batches are written
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.decode().strip().splitlines()[-1] in ("interrupted", "terminated")
    assert b"Traceback" not in err
    if fmt == "json":
        count = len(json.loads(out.read_text()))
    elif fmt == "jsonl":
        count = len([json.loads(line) for line in out.read_text().splitlines()])
    elif fmt == "csv":
        count = len(out.read_text().splitlines()) - 1
    elif fmt == "npy":
        import numpy as np

        count = np.load(out).shape[0]
        assert len((tmp_path / "out.paths.txt").read_text().splitlines()) == count
    else:
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            count = f.get_slice("embeddings").get_shape()[0]
            assert len(json.loads(f.metadata()["paths"])) == count
    assert 0 < count < 3000
    # nothing left beside the output but the note of what wrote it (for --resume)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert [n for n in leftovers if not n.endswith(".run.json")] == []


def test_closed_stdout_pipe_is_quiet_141(v1_checkpoint: Path, photos: list[Path]) -> None:
    """`| head -1`: the reader takes one line and goes; no error line, no traceback."""
    proc = start(["classify", "-", *common(v1_checkpoint), "-b", "2"], stdin=listing(photos, 500))
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"{")
    proc.stdout.close()
    err = proc.stderr.read() if proc.stderr else b""
    proc.wait(timeout=120)
    assert proc.returncode == 141, err
    assert err == b"", err


def test_closed_pipe_through_a_shell(v1_checkpoint: Path, photos: list[Path]) -> None:
    cmd = " ".join(
        [*CLI, "classify", *map(str, photos), *common(v1_checkpoint), "-b", "1", "| head -1"]
    )
    out = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, timeout=120
    )
    assert out.returncode == 141 and out.stderr == b"", out.stderr
    assert len(out.stdout.splitlines()) == 1


def test_internal_error_has_its_own_exit_code(v1_checkpoint: Path, photos: list[Path]) -> None:
    code = (
        "import runpy, sys\n"
        "import convnext_cli.engine.pipeline as p\n"
        "def boom(self, *a, **k):\n    raise RuntimeError('a bug')\n"
        "p.Runner.classify = boom\n"
        f"sys.argv = ['convnext', 'classify', {str(photos[0])!r}, '-m', {str(v1_checkpoint)!r}, "
        "'--dtype', 'float32']\n"
        "runpy.run_module('convnext_cli', run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 70, out.stderr
    assert "internal error" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("where", ["-o", "stdout"])
def test_write_error_is_cannot_write_output_exit_2(
    where: str, v1_checkpoint: Path, photos: list[Path]
) -> None:
    args = [*CLI, "classify", *map(str, photos[:2]), *common(v1_checkpoint)]
    if where == "-o":
        out = subprocess.run([*args, "-o", "/dev/full"], capture_output=True, timeout=120)
    else:
        with open("/dev/full", "wb") as full:
            out = subprocess.run(args, stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot write output" in lines[0], lines
    assert "internal error" not in lines[0]


# ------------------------------------------------------------------ the end of a run
#
# Whatever moment a signal lands -- while the output is closed and moved into place, just
# after the summary line, during the exit -- the records are at the name asked for (never
# left in .NAME.partial), and the process ends 130/143, or 0 when it had finished before
# the signal came; never killed by the signal itself (-2: Python's own handler).

END_MOMENTS = [0.0, 0.001, 0.003, 0.01, 0.03, 0.1]


def watch_stderr(proc: subprocess.Popen, starts: str) -> tuple[threading.Event, list[bytes]]:
    """A thread reading the child's stderr; the event is set once a line starts with
    ``starts``."""
    seen, lines = threading.Event(), []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if line.startswith(starts.encode()):
                seen.set()
        seen.set()  # the end of stderr: do not wait any longer

    threading.Thread(target=read, daemon=True).start()
    return seen, lines


def assert_records_at_their_name(out: Path, count: int) -> None:
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == count and all("predictions" in r for r in records), records
    assert [p.name for p in out.parent.iterdir() if p.name.endswith((".partial", ".resume"))] == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_just_after_the_summary_finds_the_records_in_place(
    signum: int, v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    code = 130 if signum == signal.SIGINT else 143
    for n, delay in enumerate(END_MOMENTS):
        out = tmp_path / f"out{n}.jsonl"
        args = ["classify", *photos, *common(v1_checkpoint), "--workers", "0", "-o", out]
        proc = subprocess.Popen(
            [*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        summary, lines = watch_stderr(proc, "classified")
        assert summary.wait(120)
        time.sleep(delay)
        proc.send_signal(signum)
        proc.wait(timeout=120)
        err = b"".join(lines).decode()
        assert proc.returncode in (0, code), (delay, proc.returncode, err)
        assert "Traceback" not in err
        assert_records_at_their_name(out, len(photos))


CLOSING_SLOWLY = r"""
import os, sys, time
from pathlib import Path
from convnext_cli.outputs import files

commit = files.OutputFile.commit

def slow_commit(self):
    Path(os.environ["CLOSING_MARK"]).touch()
    time.sleep(1.0)
    commit(self)

files.OutputFile.commit = slow_commit
sys.argv = ["convnext", *sys.argv[1:]]
from convnext_cli.cli import main
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_output_is_moved_into_place_keeps_it(
    signum: int, v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    """The output is being closed (the summary not said yet): the close completes, the
    records are at their name, and the run ends 130/143."""
    out, mark = tmp_path / "out.jsonl", tmp_path / "closing"
    args = ["classify", *photos, *common(v1_checkpoint), "--workers", "0", "-o", out]
    env = dict(os.environ, CLOSING_MARK=str(mark))
    proc = subprocess.Popen(
        [sys.executable, "-c", CLOSING_SLOWLY, *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if signum == signal.SIGINT else 143), err
    assert err.decode().strip().splitlines()[-1] in ("interrupted", "terminated"), err
    assert_records_at_their_name(out, len(photos))


@pytest.mark.parametrize("moment", ["loading", "mid-run", "summary"])
def test_ctrl_c_twice_is_130_never_death_by_sigint(
    moment: str, v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    """Two Ctrl-C 0.1 s apart, at several moments of a run, repeated to catch a race: exit
    130 (0 when the run had ended), and the records that were finished at their name."""
    for n in range(4):
        out = tmp_path / f"out{n}.jsonl"
        count = 4 if moment == "summary" else 400
        args = ["classify", "-", *common(v1_checkpoint), "-b", "2", "-o", out]
        proc = start(args, stdin=listing(photos, count), stdout=subprocess.DEVNULL)
        if moment == "loading":
            time.sleep(0.8 + 0.2 * n)
        elif moment == "mid-run":
            wait_for_size(tmp_path / f".out{n}.jsonl.partial", 300)
        else:
            summary, _ = watch_stderr(proc, "classified")
            assert summary.wait(120)
            time.sleep(0.01 * n)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        assert proc.returncode in ((0, 130) if moment == "summary" else (130,)), proc.returncode
        if moment != "loading":
            assert not (tmp_path / f".out{n}.jsonl.partial").exists()
            assert out.exists()
