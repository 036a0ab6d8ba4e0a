"""`classify` and `embed` read foreign checkpoint files directly; `convert` reproduces them.

Every source is a single weights file as its library (or the facebookresearch / FCMAE
training code) saves it, with randomised values.  The oracle is the source model itself
(timm, torchvision; for facebookresearch, which has no installable library, the
transformers model the weights were renamed from) run on pixels made by transformers'
``ConvNextImageProcessor`` configured with the preprocessing our loader picks for that
layout (:func:`convnext_cli.checkpoints.layouts.default_preprocessor`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import layout_sources as src
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import (
    assert_records_close,
    invoke,
    jsonl,
    relative_error,
    save_pth,
    save_safetensors,
)
from PIL import Image

from convnext_cli.checkpoints import layouts

PROB_TOLERANCE = 2e-3
EMBED_RELATIVE_TOLERANCE = 1e-3
TOP_K = 5
CPU = ("--dtype", "float32", "--device", "cpu", "--workers", "0")


@dataclass
class Source:
    """A foreign weights file and the model it came from (pixels -> logits or features)."""

    file: Path
    layout: str
    oracle: Callable[[torch.Tensor], torch.Tensor]
    state_dict: dict[str, torch.Tensor]

    def preprocessor(self) -> dict:
        """What our loader uses for this file (it has no preprocessor_config.json beside it)."""
        _, config = src.to_hf(layouts.unwrap(self.state_dict))
        return src.default_preprocessor(self.layout, config)

    @torch.no_grad()
    def pixels(self, photos: list[Path]) -> torch.Tensor:
        fields = {k: v for k, v in self.preprocessor().items() if k != "image_processor_type"}
        processor = transformers.ConvNextImageProcessor(**fields)
        images = [Image.open(p).convert("RGB") for p in photos]
        return processor(images, return_tensors="pt")["pixel_values"]


def torchvision_tiny() -> torch.nn.Module:
    """torchvision's real convnext_tiny (its 236 -> 224 bilinear preprocessing), randomised.

    Built on the meta device: the library's own init of 28M parameters is slow and every
    value is overwritten anyway.
    """
    from torchvision.models import convnext_tiny

    with torch.device("meta"):
        model = convnext_tiny()
    return src.randomise(model.to_empty(device="cpu"), seed=21)


CLASSIFIER_CASES = [
    "timm-convnext_atto",
    "timm-linear-v1",
    "timm-linear-v2",
    "torchvision-small",
    "torchvision-tiny",
    "fb-v1",
    "fb-v2",
]
HEADLESS_CASES = ["timm-headless-v2", "fcmae"]


def build_source(name: str, folder: Path) -> Source:
    if name == "timm-convnext_atto":  # 1x1-conv MLP, LayerNorm2d
        model = src.timm_model("convnext_atto", num_classes=10, seed=1)
        sd = model.state_dict()
        return Source(save_pth(sd, folder / "convnext_atto.pth"), "timm", model, sd)
    if name == "timm-linear-v1":
        model = src.timm_model(num_classes=10, seed=2)
        sd = model.state_dict()
        return Source(save_safetensors(sd, folder / "timm_v1.safetensors"), "timm", model, sd)
    if name == "timm-linear-v2":
        model = src.timm_model(v2=True, num_classes=10, seed=3)
        sd = model.state_dict()
        return Source(save_pth(sd, folder / "timm_v2.pth"), "timm", model, sd)
    if name == "torchvision-small":
        model = src.torchvision_model(num_classes=10, seed=4)
        sd = model.state_dict()
        return Source(save_pth(sd, folder / "tv_small.pth"), "torchvision", model, sd)
    if name == "torchvision-tiny":
        model = torchvision_tiny()
        sd = model.state_dict()
        return Source(save_pth(sd, folder / "convnext_tiny.pth"), "torchvision", model, sd)
    if name in ("fb-v1", "fb-v2"):
        v2 = name == "fb-v2"
        hf = src.hf_model(v2=v2, seed=5 if v2 else 6)
        sd = src.fb_state_dict(hf)

        def logits(x: torch.Tensor, hf: torch.nn.Module = hf) -> torch.Tensor:
            return hf(x).logits

        if v2:  # as the ConvNeXt-V2 repo saves it: {"model": state_dict}
            file = save_pth({"model": sd}, folder / "convnextv2_fb.pt")
        else:
            file = save_safetensors(sd, folder / "convnext_fb.safetensors")
        return Source(file, "fb", logits, sd)
    if name == "timm-headless-v2":  # num_classes=0: head.norm kept, no head.fc
        model = src.timm_model("convnextv2_atto", num_classes=0, seed=7)
        sd = model.state_dict()
        return Source(save_pth(sd, folder / "convnextv2_atto_features.pth"), "timm", model, sd)
    if name == "fcmae":
        hf = src.hf_model(v2=True, head=False, seed=8)
        fb = {k: v for k, v in src.fb_state_dict(hf).items() if not k.startswith("norm.")}
        checkpoint = src.fcmae_checkpoint(fb)

        def pooled(x: torch.Tensor, hf: torch.nn.Module = hf) -> torch.Tensor:
            # the identity-affine final norm: LayerNorm (eps 1e-6) of the mean-pooled encoder
            features = hf(x).last_hidden_state.mean((2, 3))
            return F.layer_norm(features, features.shape[-1:], eps=1e-6)

        file = save_pth(checkpoint, folder / "convnextv2_fcmae.pt")
        return Source(file, "fcmae", pooled, checkpoint)
    raise KeyError(name)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Source]:
    cache: dict[str, Source] = {}

    def get(name: str) -> Source:
        if name not in cache:
            cache[name] = build_source(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def inputs_for(name: str, photos: list[Path]) -> list[Path]:
    return photos[:3] if name == "torchvision-tiny" else photos  # 28M parameters: fewer photos


def classify_cli(model: Path, photos: list[Path]) -> list[dict]:
    result = invoke("classify", *photos, "-m", model, "-k", TOP_K, "--format", "jsonl", *CPU)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == [str(p) for p in photos]
    return records


def embed_cli(model: Path, photos: list[Path]) -> list[dict]:
    result = invoke("embed", *photos, "-m", model, *CPU)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == [str(p) for p in photos]
    return records


def convert_cli(source: Path, out: Path) -> Path:
    result = invoke("convert", source, out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    return out


# --------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize("name", CLASSIFIER_CASES)
def test_classify_foreign_file_matches_source_model(
    name: str, sources: Callable[[str], Source], photos: list[Path], tmp_path: Path
) -> None:
    source = sources(name)
    inputs = inputs_for(name, photos)
    assert layouts.detect_layout(layouts.unwrap(source.state_dict)) == source.layout

    with torch.no_grad():
        probs = source.oracle(source.pixels(inputs)).softmax(-1)
    records = classify_cli(source.file, inputs)
    worst = 0.0
    for path, record, expected in zip(inputs, records, probs, strict=True):
        got_indices = [p["index"] for p in record["predictions"]]
        want_indices = expected.topk(TOP_K).indices.tolist()
        assert got_indices == want_indices, f"{name} {path.name}: top-{TOP_K} differs"
        for p in record["predictions"]:
            worst = max(worst, abs(p["score"] - expected[p["index"]].item()))
    print(f"{name}: worst probability difference {worst:.2e} over {len(inputs)} photos")
    assert worst <= PROB_TOLERANCE, f"{name}: probabilities differ by {worst}"

    converted = convert_cli(source.file, tmp_path / "converted")
    written = json.loads((converted / "preprocessor_config.json").read_text())
    assert written == source.preprocessor()
    assert_records_close(classify_cli(converted, inputs), records)  # two runs: the tuner


def test_torchvision_tiny_uses_its_own_preprocessing(sources: Callable[[str], Source]) -> None:
    """The real convnext_tiny gets torchvision's eval transform, not the generic default."""
    pre = sources("torchvision-tiny").preprocessor()
    assert pre["resample"] == 2  # bilinear
    assert pre["size"] == {"shortest_edge": 224}
    assert int(224 / pre["crop_pct"]) == 236
    generic = sources("torchvision-small").preprocessor()
    assert generic["resample"] == 3 and generic["crop_pct"] == 0.875


# --------------------------------------------------------------------------- headless


@pytest.mark.parametrize("name", HEADLESS_CASES)
def test_embed_headless_file_matches_converted_folder_in_transformers(
    name: str, sources: Callable[[str], Source], photos: list[Path], tmp_path: Path
) -> None:
    source = sources(name)
    direct = embed_cli(source.file, photos)
    ours = np.array([r["embedding"] for r in direct], dtype=np.float32)

    converted = convert_cli(source.file, tmp_path / "converted")
    config = json.loads((converted / "config.json").read_text())
    assert "id2label" not in config
    processor = transformers.AutoImageProcessor.from_pretrained(converted)
    model = transformers.AutoModel.from_pretrained(converted).eval()
    assert type(model).__name__ == "ConvNextV2Model"
    images = [Image.open(p).convert("RGB") for p in photos]
    with torch.no_grad():
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        want = model(pixel_values=pixels).pooler_output.numpy()
        from_source = source.oracle(source.pixels(photos)).numpy()

    worst = {"transformers": 0.0, "source": 0.0}
    for path, got, expected, original in zip(photos, ours, want, from_source, strict=True):
        assert np.abs(expected).max() > 0.1
        for oracle, reference in (("transformers", expected), ("source", original)):
            error = relative_error(got, reference)
            assert error <= EMBED_RELATIVE_TOLERANCE, f"{name} {path.name}: {error} vs {oracle}"
            worst[oracle] = max(worst[oracle], error)
    print(f"{name}: worst relative embedding difference {worst}")

    assert_records_close(embed_cli(converted, photos), direct)  # two runs: the tuner


@pytest.mark.parametrize("name", HEADLESS_CASES)
def test_classify_headless_file_is_usage_error(
    name: str, sources: Callable[[str], Source], photos: list[Path]
) -> None:
    result = invoke("classify", photos[0], "-m", sources(name).file, *CPU)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "convnext embed" in lines[-1]
    assert result.stdout == "" and "Traceback" not in result.stderr
