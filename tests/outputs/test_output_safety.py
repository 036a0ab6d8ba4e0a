"""Never damaging what the user owns: -o is refused over an input or a checkpoint, written
beside the target and moved into place, locked against a second run; the -o extension picks
the format.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import invoke, start_with_stdin

CPU = ["--dtype", "float32", "--device", "cpu", "--workers", "0"]


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ----------------------------------------------------------------------------- refusals


@pytest.fixture
def own_photo(tmp_path: Path, photos: list[Path]) -> Path:
    photo = tmp_path / "photo.png"
    shutil.copy(photos[0], photo)
    return photo


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "dotted"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_output_over_an_input_is_refused(
    link: str, fmt: str, own_photo: Path, tmp_path: Path, v1_checkpoint: Path
) -> None:
    before = own_photo.read_bytes()
    if link == "same":
        out = own_photo
    elif link == "dotted":
        out = tmp_path / "." / own_photo.name
    else:
        out = tmp_path / f"alias.{fmt}"
        (out.symlink_to if link == "symlink" else out.hardlink_to)(own_photo)
    listing = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("classify", own_photo, "-m", v1_checkpoint, "--format", fmt, "-o", out, *CPU)
    assert result.exit_code == 2
    assert "refusing" in one_error_line(result) and "input" in result.stderr
    assert own_photo.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing opened or created


def test_npy_sidecar_over_an_input_is_refused(
    tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    """The .paths.txt beside an npy is an output too."""
    victim = tmp_path / "feats.paths.txt"
    shutil.copy(photos[0], victim)
    result = invoke("embed", victim, "-m", v1_checkpoint, "-o", tmp_path / "feats.npy", *CPU)
    assert result.exit_code == 2 and "refusing" in one_error_line(result)
    assert victim.read_bytes() == photos[0].read_bytes()


@pytest.mark.parametrize("how", ["folder", "file", "symlink"])
def test_output_over_a_checkpoint_is_refused(
    how: str, tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(v1_checkpoint, folder)
    weights = folder / "model.safetensors"
    before = weights.read_bytes()
    if how == "folder":
        model, out = folder, folder / "config.json"
    elif how == "file":
        model, out = weights, weights
    else:
        model, out = folder, tmp_path / "out.jsonl"
        out.symlink_to(weights)
    result = invoke("classify", photos[0], "-m", model, "-o", out, "--format", "jsonl", *CPU)
    assert result.exit_code == 2
    assert "checkpoint" in one_error_line(result)
    assert weights.read_bytes() == before
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_new_file_in_the_model_folder_is_fine(
    tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(v1_checkpoint, folder)
    result = invoke("classify", photos[0], "-m", folder, "-o", folder / "labels.jsonl", *CPU)
    assert result.exit_code == 0, result.stderr


# ----------------------------------------------------------------------------- life cycle


def test_output_through_a_symlink_replaces_the_file_it_points_to(
    tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    result = invoke("classify", photos[0], "-m", v1_checkpoint, "-o", link, *CPU)
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and json.loads(real.read_text())["path"] == str(photos[0])


def test_failed_run_leaves_the_old_output_untouched(
    tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    out = tmp_path / "labels.jsonl"
    out.write_text('{"old": true}\n')
    out.chmod(0o640)
    result = invoke("classify", photos[0], "-m", tmp_path / "no-model", "-o", out, *CPU)
    assert result.exit_code == 2
    assert out.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl"]

    ok = invoke("classify", photos[0], "-m", v1_checkpoint, "-o", out, *CPU)
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(out.read_text())["path"] == str(photos[0])
    assert (out.stat().st_mode & 0o777) == 0o640  # the replaced file keeps its permissions


def _slow_run(v1_checkpoint: Path, photos: list[Path], out: Path, count: int = 3000):
    listing = "".join(f"{photos[i % len(photos)]}\n" for i in range(count))
    return start_with_stdin(
        [sys.executable, "-m", "convnext_cli", "classify", "-", "-m", v1_checkpoint]
        + ["--dtype", "float32", "--device", "cpu", "-b", "4", "-o", out],
        listing.encode(),
    )


def _wait_for(path: Path, size: int = 300, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > size):
        assert time.monotonic() < deadline, f"{path} did not grow"
        time.sleep(0.02)


def _slow_run_over_an_old_target(
    tmp_path: Path, photos: list[Path], checkpoint: Path
) -> tuple[Path, Path, subprocess.Popen[bytes]]:
    """A run writing over ``labels.jsonl`` (which holds an old record), started and seen
    writing its partial file: (target, partial file, the running process)."""
    out = tmp_path / "labels.jsonl"
    out.write_text('{"old": true}\n')
    proc = _slow_run(checkpoint, photos, out)
    partial = tmp_path / ".labels.jsonl.partial"
    _wait_for(partial)
    return out, partial, proc


@pytest.mark.skipif(sys.platform == "win32", reason="flock and signals")
def test_second_run_on_the_same_output_refuses_and_the_target_waits(
    tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    out, partial, first = _slow_run_over_an_old_target(tmp_path, photos, v1_checkpoint)
    # a reader of the target during the run sees the old file, whole
    assert out.read_text() == '{"old": true}\n'
    second = invoke("classify", photos[0], "-m", v1_checkpoint, "-o", out, *CPU)
    assert second.exit_code == 2
    assert "another convnext run" in one_error_line(second)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records and all("predictions" in r for r in records)
    assert not partial.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_after_kill_9_the_target_is_untouched_and_the_partial_holds_whole_batches(
    tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    out, partial, proc = _slow_run_over_an_old_target(tmp_path, photos, v1_checkpoint)
    proc.kill()
    proc.communicate(timeout=120)
    assert out.read_text() == '{"old": true}\n'
    lines = partial.read_text().splitlines()
    assert lines and all("predictions" in json.loads(line) for line in lines[:-1])
    # the next run takes the stale partial over and finishes normally
    ok = invoke("classify", photos[0], "-m", v1_checkpoint, "-o", out, *CPU)
    assert ok.exit_code == 0, ok.stderr
    assert len(out.read_text().splitlines()) == 1 and not partial.exists()


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "command,name,check",
    [
        ("classify", "out.jsonl", "jsonl"),
        ("classify", "out.JSON", "json"),
        ("classify", "out.csv", "csv"),
        # out.txt names no format: a usage error (tests/cli/test_first_run.py)
        ("embed", "out.json", "json"),
        ("embed", "out.csv", "csv"),
        ("embed", "out.npy", "npy"),
        ("embed", "out.safetensors", "safetensors"),
    ],
)
def test_output_extension_picks_the_format(
    command: str, name: str, check: str, tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    out = tmp_path / name
    result = invoke(command, *photos[:2], "-m", v1_checkpoint, "-o", out, *CPU)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    if check == "jsonl":
        assert len([json.loads(line) for line in out.read_text().splitlines()]) == 2
    elif check == "json":
        assert len(json.loads(out.read_text())) == 2
    elif check == "csv":
        assert out.read_text().startswith("path,")
    elif check == "npy":
        import numpy as np

        assert np.load(out).shape[0] == 2 and (tmp_path / "out.paths.txt").exists()
    else:
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            assert f.get_slice("embeddings").get_shape()[0] == 2


@pytest.mark.parametrize(
    "command,fmt,name",
    [
        ("classify", "csv", "out.jsonl"),
        ("classify", "json", "out.jsonl"),
        ("embed", "npy", "out.safetensors"),
        ("embed", "jsonl", "out.npy"),
        ("classify", "auto", "out.npy"),  # classify writes no matrices
    ],
)
def test_format_contradicting_the_extension_is_a_usage_error(
    command: str, fmt: str, name: str, tmp_path: Path, photos: list[Path], v1_checkpoint: Path
) -> None:
    result = invoke(command, photos[0], "-m", v1_checkpoint, "--format", fmt, "-o", tmp_path / name)
    assert result.exit_code == 2
    one_error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_dash_output_is_stdout(
    photos: list[Path], v1_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("classify", photos[0], "-m", v1_checkpoint, "-o", "-", *CPU)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["path"] == str(photos[0])
    assert list(tmp_path.iterdir()) == []
    csv_out = invoke("classify", photos[0], "-m", v1_checkpoint, "-o", "-", "--format", "csv", *CPU)
    assert csv_out.stdout.startswith("path,rank")


def test_output_folder_is_a_usage_error(
    photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    result = invoke("classify", photos[0], "-m", v1_checkpoint, "-o", tmp_path, *CPU)
    assert result.exit_code == 2 and "folder" in one_error_line(result)
