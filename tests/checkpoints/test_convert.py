"""`convnext convert`: the written folder loads in transformers unchanged and matches the source."""

from __future__ import annotations

import argparse
import fractions
import json
from pathlib import Path

import factories
import layout_sources as src
import pytest
import torch
import transformers
import typer
from helpers import save_pth
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from convnext_cli.checkpoints.convert import convert, convert_checkpoint
from convnext_cli.errors import CheckpointError, UsageError

ATOL = 1e-4
HUB_FILES = ["config.json", "model.safetensors", "preprocessor_config.json"]
IMAGENET_PRE = dict(
    factories.IMAGENET_PREPROCESSOR, size={"shortest_edge": 256}, crop_pct=0.9, resample=2
)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() < ATOL


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@torch.no_grad()
def test_timm_file_to_hub_folder(tmp_path: Path) -> None:
    model = src.timm_model("convnextv2_atto", num_classes=1000)
    source = save_pth(model.state_dict(), tmp_path / "atto.pth")
    out = convert_checkpoint(source, tmp_path / "out")
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == HUB_FILES
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}

    hf = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "ConvNextV2ForImageClassification"
    assert hf.config.id2label[281] == "tabby, tabby cat"
    assert hf.config.layer_norm_eps == 1e-6
    x = src.pixels()
    assert close(hf(x).logits, model(x))

    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert processor.size.shortest_edge == 224
    assert processor.crop_pct == 0.875
    assert int(processor.resample) == 3
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]
    assert list(processor.image_std) == [0.229, 0.224, 0.225]
    image = Image.new("RGB", (320, 240), (120, 30, 200))
    assert processor(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 224, 224)


@torch.no_grad()
def test_torchvision_file(tmp_path: Path) -> None:
    model = src.torchvision_model(num_classes=7)
    source = save_pth(model.state_dict(), tmp_path / "tv.pth")
    out = convert_checkpoint(source, tmp_path / "out", layout="torchvision")
    hf = transformers.ConvNextForImageClassification.from_pretrained(out).eval()
    x = src.pixels(1)
    assert close(hf(x).logits, model(x))
    assert hf.config.id2label[6] == "LABEL_6"


@torch.no_grad()
def test_fb_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    hf_source = src.hf_model(v2=False, seed=3)
    source = tmp_path / "convnext_fb.safetensors"
    save_file(src.fb_state_dict(hf_source), str(source))
    result = convert(source, tmp_path / "out")
    assert result.layout == "fb"
    assert result.num_labels == 10
    assert "fb, ConvNeXt V1, depths [1, 1, 2, 1]" in result.summary()
    hf = transformers.ConvNextForImageClassification.from_pretrained(result.output_dir).eval()
    x = src.pixels(2)
    assert close(hf(x).logits, hf_source(x).logits)


@torch.no_grad()
def test_fcmae_checkpoint_becomes_feature_model(tmp_path: Path) -> None:
    hf_source = src.hf_model(v2=True, head=False, seed=8)
    fb = {k: v for k, v in src.fb_state_dict(hf_source).items() if not k.startswith("norm.")}
    source = save_pth(src.fcmae_checkpoint(fb), tmp_path / "convnextv2_atto_1k_224_fcmae.pt")
    result = convert(source, tmp_path / "out")
    assert result.layout == "fcmae"
    assert result.num_labels == 0
    assert "no head" in result.summary()
    config = read_json(result.output_dir / "config.json")
    assert config["architectures"] == ["ConvNextV2Model"]
    assert "id2label" not in config
    model = transformers.AutoModel.from_pretrained(result.output_dir).eval()
    assert type(model).__name__ == "ConvNextV2Model"
    x = src.pixels(3)
    assert close(model(x).last_hidden_state, hf_source(x).last_hidden_state)


@torch.no_grad()
def test_bin_folder_becomes_safetensors_keeping_config(tmp_path: Path) -> None:
    hf_source = src.hf_model(num_labels=3, layer_norm_eps=1e-12, seed=9)
    hf_source.config.id2label = {0: "ant", 1: "bee", 2: "wasp"}
    hf_source.config.label2id = {"ant": 0, "bee": 1, "wasp": 2}
    folder = tmp_path / "bin"
    hf_source.config.save_pretrained(folder)
    torch.save(hf_source.state_dict(), folder / "pytorch_model.bin")
    (folder / "preprocessor_config.json").write_text(json.dumps(IMAGENET_PRE))

    out = convert_checkpoint(folder, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == HUB_FILES
    config = read_json(out / "config.json")
    assert config["layer_norm_eps"] == 1e-12  # the folder's own setting is kept
    assert config["id2label"] == {"0": "ant", "1": "bee", "2": "wasp"}
    assert read_json(out / "preprocessor_config.json") == IMAGENET_PRE
    hf = transformers.ConvNextForImageClassification.from_pretrained(out).eval()
    x = src.pixels(4)
    assert close(hf(x).logits, hf_source(x).logits)


def test_hf_folder_config_must_match_weights(tmp_path: Path) -> None:
    hf_source = src.hf_model(v2=True)
    folder = tmp_path / "hf"
    hf_source.save_pretrained(folder)
    config = read_json(folder / "config.json")
    config["depths"] = [3, 3, 9, 3]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="depths"):
        convert_checkpoint(folder, tmp_path / "out")


def test_timm_hub_folder_uses_pretrained_cfg(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = src.timm_model(conv_mlp=True)
    folder = tmp_path / "timm-repo"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    timm_config = {
        "architecture": "convnext_atto",
        "num_classes": 10,
        "pretrained_cfg": {
            "input_size": [3, 288, 288],
            "crop_pct": 0.95,
            "interpolation": "bicubic",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
    }
    (folder / "config.json").write_text(json.dumps(timm_config))
    out = convert_checkpoint(folder, tmp_path / "out")
    config = read_json(out / "config.json")
    assert config["model_type"] == "convnext" and config["image_size"] == 288
    pre = read_json(out / "preprocessor_config.json")
    assert pre["size"] == {"shortest_edge": 288} and pre["crop_pct"] == 0.95


def test_overrides(tmp_path: Path) -> None:
    model = src.timm_model()
    source = save_pth({"state_dict": model.state_dict()}, tmp_path / "m.pth")
    out = convert_checkpoint(source, tmp_path / "out", image_size=288, crop_pct=0.95)
    assert read_json(out / "config.json")["image_size"] == 288
    pre = read_json(out / "preprocessor_config.json")
    assert pre["size"] == {"shortest_edge": 288}
    assert pre["crop_pct"] == 0.95
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert processor.size.shortest_edge == 288 and processor.crop_pct == 0.95


def test_refuses_non_empty_output_unless_forced(tmp_path: Path) -> None:
    source = save_pth(src.timm_model().state_dict(), tmp_path / "m.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "pytorch_model.bin").write_bytes(b"stale")
    with pytest.raises(UsageError, match="not empty"):
        convert_checkpoint(source, out)
    assert not (out / "model.safetensors").exists()
    convert_checkpoint(source, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(HUB_FILES + ["notes.txt"])


def test_refuses_bad_targets_and_options(tmp_path: Path) -> None:
    source = save_pth(src.timm_model().state_dict(), tmp_path / "m.pth")
    with pytest.raises(UsageError, match="source's own folder"):
        convert_checkpoint(source, tmp_path, force=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="not a folder"):
        convert_checkpoint(source, tmp_path / "file")
    with pytest.raises(UsageError, match="--from"):
        convert_checkpoint(source, tmp_path / "o1", layout="keras")
    with pytest.raises(UsageError, match="--crop-pct"):
        convert_checkpoint(source, tmp_path / "o2", crop_pct=0)
    with pytest.raises(UsageError, match="--image-size"):
        convert_checkpoint(source, tmp_path / "o3", image_size=0)
    with pytest.raises(CheckpointError, match="no such"):
        convert_checkpoint(tmp_path / "missing.pth", tmp_path / "o4")


def test_pickle_with_objects_is_refused(tmp_path: Path) -> None:
    sd = src.timm_model().state_dict()
    source = save_pth({"model": sd, "epoch": fractions.Fraction(1, 3)}, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        convert_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_training_checkpoint_with_argparse_namespace_loads(tmp_path: Path) -> None:
    """facebookresearch training checkpoints keep their argparse arguments beside the weights."""
    sd = src.timm_model().state_dict()
    source = save_pth({"model": sd, "args": argparse.Namespace(lr=0.1)}, tmp_path / "ckpt.pth")
    assert (convert_checkpoint(source, tmp_path / "out") / "model.safetensors").is_file()


def test_unknown_layout_names_keys(tmp_path: Path) -> None:
    source = save_pth({"model": {"resnet.fc.weight": torch.zeros(2, 2)}}, tmp_path / "r.pth")
    with pytest.raises(CheckpointError, match=r"resnet\.fc\.weight"):
        convert_checkpoint(source, tmp_path / "out")


# --------------------------------------------------------------------------- CLI


def cli() -> typer.Typer:
    """The convert command alone, registered as the real app registers it (errors handled)."""
    from convnext_cli.cli import register
    from convnext_cli.cli.convert import convert as convert_command

    app = typer.Typer()
    register(app, "convert", convert_command)
    return app


def test_cli_prints_folder_on_stdout_and_summary_on_stderr(tmp_path: Path) -> None:
    source = save_pth(src.timm_model(v2=True).state_dict(), tmp_path / "m.pth")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli(), [str(source), str(out), "--from", "timm"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    assert "converted" in result.stderr and "timm, ConvNeXt V2" in result.stderr
    assert "10 labels" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == HUB_FILES


def test_cli_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    source = save_pth(src.timm_model().state_dict(), tmp_path / "m.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    result = CliRunner().invoke(cli(), [str(source), str(out)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and "--force" in result.stderr
    assert result.stderr.count("\n") == 1
    result = CliRunner().invoke(cli(), [str(source), str(out), "--force", "--crop-pct", "0.9"])
    assert result.exit_code == 0, result.output
    assert read_json(out / "preprocessor_config.json")["crop_pct"] == 0.9


def test_cli_resolves_hub_ids_through_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convnext_cli.checkpoints.hub as hub

    folder = tmp_path / "snapshot"
    src.hf_model(v2=True).save_pretrained(folder)
    seen: list[str] = []

    def fake_download(ref: hub.HubRef, on_note: object = None) -> Path:
        seen.append(str(ref))
        return folder

    monkeypatch.setattr(hub, "download", fake_download)
    result = CliRunner().invoke(cli(), ["facebook/convnextv2-atto", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert seen == ["facebook/convnextv2-atto"]
    assert "hf, ConvNeXt V2" in result.stderr
