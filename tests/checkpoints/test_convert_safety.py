"""`convert SOURCE OUT_DIR` never damages anything outside OUT_DIR, nor leaves torn files.

Real symlinks in tmp_path; every file a symlink pointed to is compared byte for byte
afterwards.  Interruption is a real signal (SIGKILL, SIGINT) raised inside a subprocess
in the middle of writing model.safetensors.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
HUB_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def convert(*args: str | Path, wrapper: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), CONVNEXT_DEBUG="0")
    head = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "convnext_cli"]
    return subprocess.run(
        [*head, "convert", *map(str, args)], capture_output=True, text=True, timeout=120, env=env
    )


def assert_refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def snapshot(*folders: Path) -> dict[Path, bytes]:
    """Every regular file under ``folders`` (symlinks not followed), with its bytes."""
    files: dict[Path, bytes] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                files[path] = path.read_bytes()
    return files


@pytest.fixture
def source(v1_checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the tiny Hub-layout checkpoint, as the conversion's source folder."""
    folder = tmp_path / "source"
    shutil.copytree(v1_checkpoint, folder)
    return folder


def loads(folder: Path) -> None:
    from convnext_cli.checkpoints.checkpoint import load_checkpoint

    assert load_checkpoint(str(folder)).config.num_labels == 1000


# --------------------------------------------------------------------------- SOURCE vs OUT_DIR


def test_source_that_is_out_dir_is_refused(source: Path) -> None:
    before = snapshot(source)
    assert_refused(convert(source, source, "--force"), "source")
    assert snapshot(source) == before


def test_source_inside_out_dir_is_refused(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    weights = out / "sub" / "model.safetensors"
    shutil.copy(source / "model.safetensors", weights)
    before = snapshot(out)
    assert_refused(convert(weights, out, "--force"), "inside OUTPUT_DIR")
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["sub"]


def test_source_file_through_a_symlink_into_out_dir_is_refused(
    source: Path, tmp_path: Path
) -> None:
    """The link lies outside OUT_DIR; the file it names is OUT_DIR's model.safetensors."""
    out = tmp_path / "out"
    shutil.copytree(source, out)
    link = tmp_path / "elsewhere" / "weights.safetensors"
    link.parent.mkdir()
    link.symlink_to(out / "model.safetensors")
    before = snapshot(out)
    assert_refused(convert(link, out, "--force"), "symlink", "inside OUTPUT_DIR")
    assert snapshot(out) == before


def test_source_folder_whose_weights_link_into_out_dir_is_refused(
    source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(source, out)
    (source / "model.safetensors").unlink()
    (source / "model.safetensors").symlink_to(out / "model.safetensors")
    before = snapshot(out, source)
    assert_refused(convert(source, out, "--force"), "inside OUTPUT_DIR")
    assert snapshot(out, source) == before


def test_out_dir_that_is_a_symlink_to_the_source_is_refused(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out-link"
    out.symlink_to(source, target_is_directory=True)
    before = snapshot(source)
    assert_refused(convert(source, out, "--force"), "source")
    assert snapshot(source) == before
    # a single weights file whose folder is OUT_DIR (through the link) too
    assert_refused(convert(source / "model.safetensors", out, "--force"), "source")
    assert snapshot(source) == before


def test_refusal_comes_before_anything_is_written(source: Path, tmp_path: Path) -> None:
    """OUT_DIR does not exist yet and SOURCE would lie inside it: nothing is created."""
    out = tmp_path / "new"
    link = tmp_path / "link.safetensors"
    link.symlink_to(out / "model.safetensors")  # dangling for now
    result = convert(link, out)
    assert result.returncode == 2 and not out.exists()


# --------------------------------------------------------------------------- symlinks in OUT_DIR


def test_symlinks_in_out_dir_are_replaced_not_written_through(source: Path, tmp_path: Path) -> None:
    victims = tmp_path / "victims"
    victims.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    for name in (*HUB_FILES, "pytorch_model.bin"):
        victim = victims / name
        victim.write_bytes(f"precious {name}, not to be touched\n".encode())
        (out / name).symlink_to(victim)
    before = snapshot(victims)

    result = convert(source, out, "--force")
    assert result.returncode == 0, result.stderr
    assert snapshot(victims) == before  # byte for byte
    assert not (out / "pytorch_model.bin").exists()  # the stale link went, not its target
    for name in HUB_FILES:
        assert (out / name).is_file() and not (out / name).is_symlink()
    loads(out)


def test_symlinked_out_dir_is_written_into_its_target(source: Path, tmp_path: Path) -> None:
    """OUT_DIR itself may be a link to a folder: that folder is OUT_DIR."""
    real = tmp_path / "real-out"
    real.mkdir()
    out = tmp_path / "out-link"
    out.symlink_to(real, target_is_directory=True)
    assert convert(source, out).returncode == 0
    assert sorted(p.name for p in real.iterdir()) == sorted(HUB_FILES)


# --------------------------------------------------------------------------- interruption

# Runs the CLI, but model.safetensors' writer stops half-way and the process gets a real
# signal: SIGKILL (nothing can clean up) or SIGINT (Ctrl-C).
INTERRUPTED_WRITE = r"""
import os, signal, sys
import safetensors.torch

signum = int(os.environ["KILL_WITH"])
original = safetensors.torch.save_file

def half_then_signal(tensors, filename, metadata=None):
    original(tensors, filename, metadata=metadata)
    size = os.path.getsize(filename)
    with open(filename, "r+b") as f:
        f.truncate(size // 2)
    os.kill(os.getpid(), signum)

safetensors.torch.save_file = half_then_signal
sys.argv = ["convnext", *sys.argv[1:]]
from convnext_cli.cli import main
main()
"""


@pytest.mark.parametrize("signum", ["SIGKILL", "SIGINT"])
def test_interrupted_convert_leaves_no_half_written_weights(
    source: Path, tmp_path: Path, signum: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    monkeypatch.setenv("KILL_WITH", str(int(getattr(signal, signum))))
    out = tmp_path / "out"
    result = convert(source, out, wrapper=INTERRUPTED_WRITE)
    expected = -signal.SIGKILL if signum == "SIGKILL" else 130
    assert result.returncode == expected, result.stderr
    assert not (out / "model.safetensors").exists()
    if signum == "SIGINT":  # cleaned up: no temporary left behind
        assert list(out.iterdir()) == []
        assert "Traceback" not in result.stderr


def test_interrupted_forced_convert_keeps_the_previous_weights(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    out = tmp_path / "out"
    assert convert(source, out).returncode == 0
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setenv("KILL_WITH", str(int(signal.SIGKILL)))
    result = convert(source, out, "--force", wrapper=INTERRUPTED_WRITE)
    assert result.returncode == -signal.SIGKILL
    assert (out / "model.safetensors").read_bytes() == before
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "classifier.weight" in f.keys()
