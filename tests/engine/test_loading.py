"""The one loading path: a model reference and run options to a ready runner plus notes,
checkpoints located the same way for every command, layouts as one enum, label files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import COMMIT, fill_cache, save_pth
from safetensors.torch import load_file, save_file

from convnext_cli import Classifier, choices, load_model
from convnext_cli.checkpoints.checkpoint import load_checkpoint, locate
from convnext_cli.checkpoints.layouts import CheckpointLayout
from convnext_cli.engine.loading import ModelSource, RunOptions, load_runner
from convnext_cli.errors import CheckpointError, UsageError


def test_layouts_are_one_enum_matching_the_cli_choices() -> None:
    assert [layout.value for layout in CheckpointLayout] == list(choices.LAYOUTS)
    for layout in CheckpointLayout:
        assert layout.display and layout.rules and callable(layout.detect)
        assert str(layout) == layout.value and layout == layout.value


def test_load_runner_returns_runner_checkpoint_and_notes(
    v1_checkpoint: Path, photos: list[Path]
) -> None:
    loaded = load_runner(str(v1_checkpoint), RunOptions("cpu", "float32"))
    assert loaded.notes == []  # nothing chosen for the user
    assert loaded.runner.device == torch.device("cpu") and loaded.runner.dtype == torch.float32
    assert loaded.checkpoint.layout is CheckpointLayout.HF and len(loaded.runner.labels) == 1000
    compiled = load_runner(str(v1_checkpoint), RunOptions("cpu", "float32", compile=True))
    assert any("compiling" in note for note in compiled.notes)
    (batch,) = loaded.runner.classify([str(photos[0])], top_k=2, workers=0)
    assert batch[0].error is None and len(batch[0].predictions) == 2


def test_api_and_load_model_use_the_same_path(v1_checkpoint: Path, photos: list[Path]) -> None:
    clf = Classifier(str(v1_checkpoint), device="cpu", dtype="float32", workers=0)
    net = load_model(str(v1_checkpoint))
    assert clf.notes == [] and net.preprocess == clf.checkpoint.preprocess
    for (name, a), (_, b) in zip(
        clf.model.state_dict().items(), net.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_ddp_prefixed_transformers_weights_load_with_and_without_config(
    tmp_path: Path, v1_checkpoint: Path
) -> None:
    """Once an inconsistency: ``module.``-prefixed transformers keys beside a config.json
    failed while the same file alone loaded."""
    tensors = load_file(v1_checkpoint / "model.safetensors")
    wrapped = {f"module.{k}": v for k, v in tensors.items()}
    with_config = tmp_path / "with_config"
    with_config.mkdir()
    shutil.copy(v1_checkpoint / "config.json", with_config)
    save_file(wrapped, str(with_config / "model.safetensors"))
    alone = save_pth({"state_dict": wrapped}, tmp_path / "alone.pth")
    reference = load_checkpoint(str(v1_checkpoint))
    for source in (with_config, alone):
        checkpoint = load_checkpoint(str(source))
        assert checkpoint.layout is CheckpointLayout.HF
        assert checkpoint.state_dict.keys() == reference.state_dict.keys()
        for key, value in reference.state_dict.items():
            assert torch.equal(checkpoint.state_dict[key], value), key
    # beside its config.json the labels and eps are the folder's
    assert load_checkpoint(str(with_config)).config == reference.config


def test_locate_names_the_files_a_run_reads(tmp_path: Path, v1_checkpoint: Path) -> None:
    files = locate(str(v1_checkpoint))
    assert files.folder and files.weights == v1_checkpoint / "model.safetensors"
    assert files.paths == [
        v1_checkpoint / "model.safetensors",
        v1_checkpoint / "config.json",
        v1_checkpoint / "preprocessor_config.json",
    ]
    single = locate(str(v1_checkpoint / "model.safetensors"))
    assert not single.folder and single.weights == files.weights
    with pytest.raises(UsageError, match="local path, not a Hub id"):
        locate(str(v1_checkpoint), revision="main")
    with pytest.raises(UsageError, match="--revision"):
        locate("org/model@v1", revision="v2")
    with pytest.raises(CheckpointError, match="not a Hugging Face Hub id"):
        locate(str(tmp_path / "missing.safetensors"))


def test_cache_dir_and_revision_reach_the_hub(tmp_path: Path, v1_checkpoint: Path) -> None:
    cache = tmp_path / "elsewhere"
    files = ["config.json", "preprocessor_config.json", "model.safetensors"]
    fill_cache(cache, "org/tiny", v1_checkpoint, files)
    located = locate("org/tiny", revision=COMMIT, cache_dir=cache)
    assert located.weights.parent.name == COMMIT and located.folder
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        locate("org/tiny")  # not in the default cache


def test_labels_file_replaces_the_checkpoint_names(
    tmp_path: Path, v2_checkpoint: Path, photos: list[Path]
) -> None:
    names = [f"kind {i}" for i in range(7)]
    text_file = tmp_path / "labels.txt"
    text_file.write_text("\n".join(names) + "\n", encoding="utf-8")
    json_file = tmp_path / "labels.json"
    json_file.write_text(json.dumps({str(i): n for i, n in enumerate(names)}))
    list_file = tmp_path / "list.json"
    list_file.write_text(json.dumps(names))
    for labels in (text_file, json_file, list_file):
        clf = Classifier(str(v2_checkpoint), device="cpu", dtype="float32", labels=labels)
        assert clf.labels == names
        top = clf.classify(str(photos[0]), top_k=1)[0].predictions[0]
        assert top.label == names[top.index]
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    with pytest.raises(UsageError, match="2 names, but the classifier has 7 outputs"):
        load_runner(ModelSource(str(v2_checkpoint), labels=short), RunOptions("cpu", "float32"))
    gappy = tmp_path / "gappy.json"
    gappy.write_text(json.dumps({"0": "a", "2": "b"}))
    with pytest.raises(UsageError, match="no gaps"):
        load_runner(ModelSource(str(v2_checkpoint), labels=gappy), RunOptions("cpu", "float32"))
