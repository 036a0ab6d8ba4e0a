"""Hostile flags, environment variables and standard streams, each in a real subprocess.

Every case: the exit code, one line on stderr naming what was wrong, no traceback, a
"does not hang" time bound, and for the cases that used to build something huge (brace
patterns, batch sizes) a peak-memory bound on the subprocess (``ru_maxrss`` of a small
wrapper's children, as in test_memory_bounds.py; an address-space limit keeps a
regression from taking the machine with it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_with_peak

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss, >&-: Linux")

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "convnext_cli"]
TIME_BOUND = 60.0  # seconds: "does not hang" on a loaded CI machine (these take 1-3 s)
MEMORY_BOUND = 400e6  # bytes; a usage error peaks near 40 MB, the old expansions at GBs
ADDRESS_LIMIT = 4 * 1024**3  # a regression fails with MemoryError instead of swapping


def env_with(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop("CONVNEXT_DEBUG", None)
    return env


def run(
    args: list[str], tmp_path: Path, env: dict[str, str] | None = None, limit: int = 0
) -> tuple[subprocess.CompletedProcess, float, float]:
    """The CLI with ``args``: (completed process, seconds, peak RSS in bytes)."""
    done = run_with_peak(
        *args, env=env or env_with(), timeout=TIME_BOUND * 2, text=False, limit=limit
    )
    return done.done, done.seconds, done.peak


def assert_usage_error(done: subprocess.CompletedProcess, *words: str) -> str:
    err = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert done.returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    if lines[0].startswith("Usage:"):  # Typer's own usage error (a flag's min=/max=)
        text = " ".join(line.strip("│╭╰─ ") for line in lines)
    else:
        assert len(lines) == 1, err
        text = lines[0]
    for word in words:
        assert word in text, err
    return text


BIG = "99999999999999999999"

# (name, arguments after `classify -m CKPT`, words the one line must name)
FLAG_CASES = [
    ("shard-huge-n", ["--shard", f"1/{BIG}", "x.jpg"], ["--shard", "1000000"]),
    ("shard-superscript", ["--shard", "1/²", "x.jpg"], ["--shard", "I/N"]),
    ("shard-huge-i", ["--shard", f"{BIG}/4", "x.jpg"], ["--shard", "0 <= I < N"]),
    ("batch-huge", ["-b", BIG, "x.jpg"], ["--batch-size", "4096"]),
    ("top-k-huge", ["-k", BIG, "x.jpg"], ["--top-k"]),
    ("workers-huge", ["--workers", BIG, "x.jpg"], ["--workers"]),
    ("replicas-huge", ["--replicas", BIG, "x.jpg"], ["--replicas"]),
    ("brace-long", ["{1..1}" * 3000], ["brace pattern", "4096 characters"]),
    ("brace-wide", ["{0..99999999}.jpg"], ["brace pattern", "1000000"]),
    ("brace-product", ["x{0..999}{0..999}{0..9}.tar"], ["brace pattern", "1000000"]),
]


@pytest.mark.parametrize("name,args,words", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_absurd_flags_are_one_usage_line(
    name: str, args: list[str], words: list[str], v1_checkpoint: Path, tmp_path: Path
) -> None:
    done, seconds, peak = run(
        ["classify", "-m", str(v1_checkpoint), *args], tmp_path, limit=ADDRESS_LIMIT
    )
    assert_usage_error(done, *words)
    assert seconds < TIME_BOUND and peak < MEMORY_BOUND, (seconds, peak)


@pytest.mark.parametrize(
    "args,words",
    [
        (["-b", "100000000"], ["-b", "positive integers up to 4096"]),
        (["-b", BIG], ["-b", "positive integers up to 4096"]),
        (["-b", "1,²"], ["-b", "comma-separated integers"]),
        (["-b", ",".join(str(n) for n in range(1, 100))], ["at most 64"]),
        (["--iters", BIG], ["--iters"]),
        (["--warmup", BIG], ["--warmup"]),
    ],
)
def test_absurd_benchmark_flags_are_one_usage_line(
    args: list[str], words: list[str], v1_checkpoint: Path, tmp_path: Path
) -> None:
    done, seconds, peak = run(
        ["benchmark", "-m", str(v1_checkpoint), "--device", "cpu", *args],
        tmp_path,
        limit=ADDRESS_LIMIT,
    )
    assert_usage_error(done, *words)
    assert seconds < TIME_BOUND and peak < MEMORY_BOUND, (seconds, peak)


def test_absurd_convert_image_size_is_one_usage_line(v1_checkpoint: Path, tmp_path: Path) -> None:
    done, seconds, _ = run(
        ["convert", str(v1_checkpoint), str(tmp_path / "out"), "--image-size", BIG], tmp_path
    )
    assert_usage_error(done, "--image-size")
    assert seconds < TIME_BOUND


def test_nested_braces_expand_once_as_bash_does(v1_checkpoint: Path, tmp_path: Path) -> None:
    """``{0..{99999999..99999999}}`` used to expand the inner group, then the 100 million
    names of the outer one; now the inner group's result is not expanded again (bash
    gives ``{0..99999999}`` too): one input, one error record, fast and small."""
    done, seconds, peak = run(
        ["classify", "-m", str(v1_checkpoint), "{0..{99999999..99999999}}"],
        tmp_path,
        limit=ADDRESS_LIMIT,
    )
    err = done.stderr.decode()
    assert "Traceback" not in err and done.returncode == 1, err
    assert done.stdout.decode().count('"error"') == 1
    # this run loads torch and the model (about 0.9 GB); 100 million names are 6 GB and more
    assert seconds < TIME_BOUND and peak < 1.5e9, (seconds, peak)


ENV_CASES = [
    ("CONVNEXT_PARQUET_ROWS_PER_PART", "abc"),
    ("CONVNEXT_PARQUET_ROWS_PER_PART", "0"),
    ("CONVNEXT_MAX_FILE_BYTES", "99999999999999999999999G"),
    ("CONVNEXT_MAX_IMAGE_BYTES", "²"),
    ("CONVNEXT_DECODE_TIMEOUT", "1e300"),
    ("CONVNEXT_STAGING", "maybe"),
    ("HF_HUB_ETAG_TIMEOUT", "abc"),
    ("HF_HUB_DOWNLOAD_TIMEOUT", "-1"),
]


@pytest.mark.parametrize("name,value", ENV_CASES, ids=[f"{n}={v}" for n, v in ENV_CASES])
def test_malformed_environment_is_one_usage_line(
    name: str, value: str, v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    done, seconds, _ = run(
        ["classify", "-m", str(v1_checkpoint), str(photos[0])], tmp_path, env_with(**{name: value})
    )
    assert_usage_error(done, name)
    assert seconds < TIME_BOUND


@pytest.mark.parametrize("value", ["²", BIG, "1000000000", "-5", "0", " ", "80x"])
@pytest.mark.parametrize("command", [["--help"], ["classify", "--help"]])
def test_absurd_terminal_size_falls_back_to_80_columns(
    value: str, command: list[str], tmp_path: Path
) -> None:
    done, seconds, peak = run(
        command, tmp_path, env_with(COLUMNS=value, LINES=value), limit=ADDRESS_LIMIT
    )
    err = done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in err and not err.strip(), err
    lines = done.stdout.decode().splitlines()
    assert lines and max(len(line) for line in lines) <= 80
    assert seconds < TIME_BOUND and peak < MEMORY_BOUND, (seconds, peak)


@pytest.mark.parametrize("name", ["COLUMNS", "LINES"])
def test_absurd_terminal_size_in_a_run(
    name: str, v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    """The progress console (rich) is built in every run: ``COLUMNS=²`` used to be exit 70."""
    done, seconds, _ = run(
        ["classify", "-m", str(v1_checkpoint), str(photos[0])], tmp_path, env_with(**{name: "²"})
    )
    err = done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in err, err
    assert done.stdout.decode().count('"predictions"') == 1
    assert seconds < TIME_BOUND


def shell(
    command: str, v1_checkpoint: Path, photo: Path, tmp_path: Path
) -> subprocess.CompletedProcess:
    """``command`` through sh, with $CLI, $CKPT and $PHOTO set (for >&- and 2>&-)."""
    env = env_with(CLI=" ".join(CLI), CKPT=str(v1_checkpoint), PHOTO=str(photo))
    return subprocess.run(
        ["sh", "-c", command], capture_output=True, env=env, cwd=tmp_path, timeout=TIME_BOUND * 2
    )


def test_closed_stdout_is_one_line_and_exit_2(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    for command in (
        '$CLI classify -m "$CKPT" "$PHOTO" >&-',
        "$CLI --help >&-",
        "$CLI --version >&-",
        "$CLI env >&-",
    ):
        done = shell(command, v1_checkpoint, photos[0], tmp_path)
        err = done.stderr.decode()
        assert done.returncode == 2, (command, err)
        assert err.strip().splitlines() == [
            "error: stdout is closed: nothing can be written there (use -o FILE)"
        ], (command, err)


def test_closed_stdout_with_an_output_file_still_runs(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    done = shell(
        '$CLI classify -m "$CKPT" "$PHOTO" -o out.jsonl >&-', v1_checkpoint, photos[0], tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1


def test_closed_stderr_and_stdin_do_not_leak_into_stdout(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    """With fd 2 closed, Python's ``print(file=sys.stderr)`` went to stdout (sys.stderr is
    None): the summary line ended up among the records."""
    done = shell('$CLI classify -m "$CKPT" "$PHOTO" 2>&- <&-', v1_checkpoint, photos[0], tmp_path)
    assert done.returncode == 0
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("{"), lines
