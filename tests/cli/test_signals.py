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
