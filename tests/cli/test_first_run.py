"""What a newcomer reads in the first minutes: the Hub out of reach, a model folder that does
not exist, a missing input, Pillow's texts in the tool's words, ``-o`` names, ``-k`` capped,
the closing summary (wall time, split, speed, the file written), Ctrl-C, ``| head``."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from helpers import invoke, start_with_stdin
from PIL import Image
from pty_helpers import _drain, screen

CPU = ["--device", "cpu", "--dtype", "float32"]
CLI = [sys.executable, "-m", "convnext_cli"]


def one_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def hub_env(tmp_path: Path) -> dict[str, str]:
    """An empty cache and a Hub endpoint that refuses connections at once (DNS-like)."""
    return {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "empty-cache"),
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }


def run(args: list[object], env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=200
    )


def test_unreachable_hub_says_so_and_how_to_go_on(tmp_path: Path, photos: list[Path]) -> None:
    out = run(["classify", photos[0], *CPU], env=hub_env(tmp_path))
    assert out.returncode == 2
    line = one_error(out)
    assert "could not reach the Hugging Face Hub" in line, line
    assert "did not answer" not in line  # a refused connection is not a timeout
    assert "-m a local folder" in line and "HF_HUB_OFFLINE=1" in line


def test_missing_model_folder_says_no_local_path_then_hub(
    tmp_path: Path, photos: list[Path]
) -> None:
    out = run(["classify", photos[0], "-m", "my-model", *CPU], env=hub_env(tmp_path), cwd=tmp_path)
    line = one_error(out)
    assert out.returncode == 2
    assert line.startswith("error: no local file or folder my-model exists, so it was tried as")
    assert "Hub id" in line and "could not reach the Hugging Face Hub" in line
    offline = {**hub_env(tmp_path), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "models").mkdir()  # models/convnext reads as a Hub id, but models/ is here
    out = run(["classify", photos[0], "-m", "models/convnext", *CPU], env=offline, cwd=tmp_path)
    assert "no local file or folder models/convnext exists" in one_error(out)


def test_missing_input_and_pillow_texts_in_the_tools_words(
    tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(photos[-1].read_bytes()[:300])  # ends inside the header
    broken = tmp_path / "broken.png"
    img = Image.effect_noise((256, 256), 64).convert("RGB")
    img.save(broken)
    data = bytearray(broken.read_bytes())
    broken.write_bytes(bytes(data[: len(data) // 2]))  # ends inside the pixel data
    missing = tmp_path / "nonexist.jpg"
    out = tmp_path / "labels.jsonl"
    args = [missing, truncated, broken, photos[0], "-m", v1_checkpoint, *CPU, "-o", out]
    result = invoke("classify", *args)
    assert result.exit_code == 1
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["nonexist.jpg"]["error"] == "no such file"
    for name in ("cut.jpg", "broken.png"):
        error = records[name]["error"]
        assert "ends too early" in error and "(Pillow: " in error, error
    assert "classified 1 of 4 images in " in result.stderr
    assert "  3 failed: " in result.stderr and "1 no such file" in result.stderr


def test_output_name_without_a_format_is_a_usage_error(
    tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    target = tmp_path / "out.txt"
    result = invoke("classify", photos[0], "-m", v1_checkpoint, *CPU, "-o", target)
    assert result.exit_code == 2
    line = one_error(result)
    assert "'.txt' names no format" in line and "--format" in line
    assert not target.exists()
    said = invoke("classify", photos[0], "-m", v1_checkpoint, *CPU, "-o", target, "--format", "csv")
    assert said.exit_code == 0 and target.read_text().startswith("path,")


def test_top_k_over_the_classes_is_said_and_summary_names_the_file(
    tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    out = tmp_path / "labels.jsonl"
    result = invoke("classify", *photos[:2], "-m", v1_checkpoint, *CPU, "-k", "2000", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "-k 2000 is more than the model's 1000 classes" in result.stderr
    assert all(len(json.loads(r)["predictions"]) == 1000 for r in out.read_text().splitlines())
    lines = result.stderr.strip().splitlines()
    assert re.fullmatch(
        rf"classified 2 images in (\d+\.\d) s with {re.escape(str(v1_checkpoint))} on cpu "
        rf"float32, written to {re.escape(str(out))}",
        lines[-3],
    ), lines
    split = re.fullmatch(
        r"  (\d+\.\d) s start-up and model load, (\d+\.\d) s for the images \([\d.]+ img/s\)",
        lines[-2],
    )
    assert split, lines
    assert re.fullmatch(r"  Speed: \d+\.\d ms decode, \d+\.\d ms model per image", lines[-1])


def test_summary_wall_time_covers_start_up(photos: list[Path], v1_checkpoint: Path) -> None:
    """The whole run (a subprocess, timed from outside) against what the summary says."""
    started = time.monotonic()
    out = run(["classify", *photos[:2], "-m", v1_checkpoint, *CPU, "--format", "jsonl"])
    outside = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    found = re.search(r" in (\d+\.\d) s with ", lines[-3])
    assert found, lines
    wall = float(found.group(1))
    load, images = map(float, re.findall(r"(\d+\.\d) s", lines[-2]))
    assert load > 0.0  # imports and model loading are counted
    assert abs(wall - (load + images)) <= 0.11
    assert 0.5 * outside <= wall <= outside + 0.2, (wall, outside)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_says_what_was_kept_and_that_resume_continues(
    tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    out = tmp_path / "labels.jsonl"
    stdin = "".join(f"{photos[i % len(photos)]}\n" for i in range(3000))
    proc = start_with_stdin(
        [*CLI, "classify", "-", "-m", v1_checkpoint, *CPU, "-b", "2", "-o", out], stdin.encode()
    )
    partial = tmp_path / ".labels.jsonl.partial"
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size > 300):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    lines = err.decode().strip().splitlines()
    assert lines[-1] == "interrupted"
    kept = len(out.read_text().splitlines())
    assert lines[-2] == (
        f"kept {kept} records in {out}; run the same command with --resume to continue"
    ), lines


def run_shell(command: str, columns: int = 80) -> tuple[int, bytes]:
    """``sh -c command`` with stdout and stderr on one terminal ``columns`` wide."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns)}
    proc = subprocess.Popen(
        ["sh", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    sink: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(master, sink), daemon=True)
    reader.start()
    proc.wait(timeout=200)
    reader.join(timeout=30)
    os.close(master)
    return proc.returncode, b"".join(sink)


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals")
def test_pipe_into_head_leaves_no_frozen_bar(photos: list[Path], v1_checkpoint: Path) -> None:
    names = " ".join(f"'{p}'" for p in photos)
    args = f"-m '{v1_checkpoint}' --device cpu --dtype float32 -b 1 --workers 0"
    code, data = run_shell(f"{sys.executable} -m convnext_cli classify {names} {args} | head -2")
    assert code == 0
    assert "━".encode() in data  # the bar was drawn
    shown = [line for line in screen(data) if line.strip()]
    assert len(shown) == 2, shown
    assert all(line.startswith('{"path": ') for line in shown), shown


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals")
def test_embed_on_a_terminal_is_a_short_table_and_piped_stays_jsonl(
    photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    from pty_helpers import run_attached

    missing = tmp_path / "nonexist.jpg"
    args = ["embed", *photos[:3], missing, "-m", v1_checkpoint, *CPU]
    shown = run_attached(args, stdout="tty", stderr="file", columns=80)
    assert shown.returncode == 1
    lines = [line for line in screen(shown.stdout) if line.strip()]
    assert all(len(line) <= 80 for line in lines), lines
    assert len(lines) == 3 + 4, lines  # hint, header, rule, one line per input
    assert "-o feats.npy" in lines[0] and re.match(r"first \d+ of 32 values", lines[0])
    assert lines[1].split() == ["image", "dim", "norm", "values"]
    for line, photo in zip(lines[3:6], photos[:3], strict=True):
        path, dim, norm, *values = line.split()
        assert path.startswith("/") and (path == str(photo) or "…" in path)  # as typed
        assert dim == "32" and float(norm) > 0 and 1 <= len(values) <= 10
    assert lines[6].startswith(str(missing)[:10]) and "✗ error: no such file" in lines[6]
    piped = run_attached(args, stdout="pipe", stderr="file", columns=80)
    records = [json.loads(line) for line in piped.stdout.decode().splitlines()]
    assert [len(r.get("embedding", [])) for r in records] == [32, 32, 32, 0]
