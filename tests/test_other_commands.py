"""convert's file modes (the umask, as `cp`), env's cuDNN version, benchmark's table and
notes (80 columns, an end-to-end row faster than the model, float16 on the CPU)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from convnext_cli.environment import cudnn_version

REPO = Path(__file__).resolve().parent.parent
HUB_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def convert(*args: object, umask: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "convnext_cli", "convert", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        umask=umask,
    )


def modes(folder: Path) -> dict[str, int]:
    return {name: stat.S_IMODE((folder / name).stat().st_mode) for name in HUB_FILES}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_convert_files_get_the_mode_cp_would_give(
    umask: int, v1_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = convert(v1_checkpoint, out, umask=umask)
    assert result.returncode == 0, result.stderr
    assert set(modes(out).values()) == {0o666 & ~umask}, modes(out)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_forced_convert_keeps_the_modes_of_the_files_it_replaces(
    v1_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert convert(v1_checkpoint, out, umask=0o022).returncode == 0
    for name in HUB_FILES:
        os.chmod(out / name, 0o640)
    result = convert(v1_checkpoint, out, "--force", umask=0o077)
    assert result.returncode == 0, result.stderr
    assert set(modes(out).values()) == {0o640}


def test_cudnn_version_as_cudnn_writes_it() -> None:
    assert cudnn_version(92400) == "9.24.0"
    assert cudnn_version(90100) == "9.1.0"
    assert cudnn_version(8902) == "8.9.2"
    assert cudnn_version(8700) == "8.7.0"
