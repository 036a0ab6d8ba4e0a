"""The Hub path, offline: a real huggingface_hub cache in tmp_path, no network, no mocked loader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import COMMIT, fill_cache

from convnext_cli.checkpoints.checkpoint import load_checkpoint
from convnext_cli.checkpoints.hub import split_revision
from convnext_cli.errors import CheckpointError


@pytest.fixture
def hub_cache(tmp_path: Path, v1_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    files = ["config.json", "preprocessor_config.json", "model.safetensors"]
    fill_cache(cache, "facebook/convnext-tiny-224", v1_checkpoint, files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_split_revision() -> None:
    assert split_revision("facebook/convnext-tiny-224@v1.0") == (
        "facebook/convnext-tiny-224",
        "v1.0",
    )
    assert split_revision("facebook/convnext-tiny-224") == ("facebook/convnext-tiny-224", None)


def test_hub_id_resolves_from_cache(hub_cache: Path, v1_checkpoint: Path) -> None:
    checkpoint = load_checkpoint("facebook/convnext-tiny-224")
    assert checkpoint.layout == "hf" and checkpoint.config.num_labels == 1000
    assert checkpoint.preprocess.shortest_edge == 224
    pinned = load_checkpoint(f"facebook/convnext-tiny-224@{COMMIT}")
    assert pinned.config == checkpoint.config


def test_hub_missing_offline_is_one_line_error(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        load_checkpoint("facebook/convnextv2-tiny-22k-384")


def test_pytorch_model_bin_fallback(tmp_path: Path, v1_checkpoint: Path, monkeypatch) -> None:
    """A repo with only pytorch_model.bin: read with weights_only=True."""
    import huggingface_hub.constants as constants
    import torch
    from safetensors.torch import load_file

    source = tmp_path / "src"
    source.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(v1_checkpoint / name, source / name)
    torch.save(load_file(v1_checkpoint / "model.safetensors"), source / "pytorch_model.bin")
    cache = tmp_path / "hub"
    fill_cache(
        cache,
        "org/legacy",
        source,
        ["config.json", "preprocessor_config.json", "pytorch_model.bin"],
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    checkpoint = load_checkpoint("org/legacy")
    reference = load_checkpoint(str(v1_checkpoint))
    assert checkpoint.state_dict.keys() == reference.state_dict.keys()
    for key, value in reference.state_dict.items():
        assert torch.equal(checkpoint.state_dict[key], value)


def test_cli_honours_hf_hub_cache_env(tmp_path: Path, v1_checkpoint: Path, photos) -> None:
    """A real process finds the model through HF_HUB_CACHE + HF_HUB_OFFLINE alone."""
    cache = tmp_path / "hub"
    fill_cache(
        cache,
        "facebook/convnext-tiny-224",
        v1_checkpoint,
        ["config.json", "preprocessor_config.json", "model.safetensors"],
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "convnext_cli",
            "classify",
            str(photos[0]),
            "-k",
            "1",
            "--dtype",
            "float32",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["path"] == str(photos[0]) and len(record["predictions"]) == 1


@pytest.fixture
def silent_hub():
    """A TCP server that accepts connections and never answers: an unreachable Hub as a
    blackholed network shows it (each request waits for its timeout)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    server.close()
    for conn in accepted:
        conn.close()


def classify_through(env: dict[str, str], model: str, photo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convnext_cli", "classify", str(photo), "-m", model, "-k", "1",
         "--format", "jsonl", "--device", "cpu", "--dtype", "float32", "--workers", "0"],
        capture_output=True, text=True, env=env, timeout=150,
    )  # fmt: skip


def test_cached_model_does_not_wait_for_a_silent_hub(
    tmp_path: Path, v1_checkpoint: Path, photos, silent_hub
) -> None:
    """Each of huggingface_hub's requests would wait its 60 s timeout (past the subprocess
    limit); one short question to the Hub, then the cache is used."""
    endpoint, accepted = silent_hub
    cache = tmp_path / "hub"
    files = ["config.json", "preprocessor_config.json", "model.safetensors"]
    fill_cache(cache, "org/cached", v1_checkpoint, files)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": endpoint, "HF_HUB_ETAG_TIMEOUT": "60",
           "HF_HUB_DOWNLOAD_TIMEOUT": "60"}  # fmt: skip
    out = classify_through(env, "org/cached", photos[0])
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1
    assert "did not answer within 3 s; using the cached org/cached" in out.stderr
    assert len(accepted) < len(
        files
    )  # a short question (httpx may connect twice), not one per file


def test_uncached_model_and_a_silent_hub_fail_in_one_line(
    tmp_path: Path, photos, silent_hub
) -> None:
    """huggingface_hub alone retries past the subprocess limit here."""
    endpoint, _ = silent_hub
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": endpoint, "HF_HUB_ETAG_TIMEOUT": "1",
           "HF_HUB_DOWNLOAD_TIMEOUT": "1"}  # fmt: skip
    out = classify_through(env, "org/elsewhere", photos[0])
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: org/elsewhere: the Hugging Face Hub did not answer")
    assert len(out.stderr.strip().splitlines()) == 1
