"""End to end: `convnext classify` probabilities equal transformers' own pipeline.

The oracle is transformers itself: ``pipeline("image-classification")`` (which decodes with
Pillow: EXIF transpose, then ``convert("RGB")``) for every photo and every mode where our
decoding policy does the same, and transformers' processor + model on independently
computed pixels where the policy goes further (alpha over white, full 16-bit depth).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import composite_over_white, png_bytes
from PIL import Image
from typer.testing import CliRunner

from convnext_cli.cli import app

TOLERANCE = 2e-3


def ours(folder: Path, paths: list[Path], top_k: int) -> list[dict]:
    result = CliRunner().invoke(
        app,
        [
            "classify",
            *map(str, paths),
            "-m",
            str(folder),
            "-k",
            str(top_k),
            "--format",
            "jsonl",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "-b",
            "4",
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def compare(record: dict, expected: list[tuple[int, float]], where: str) -> float:
    got = {p["index"]: p["score"] for p in record["predictions"]}
    assert record["predictions"][0]["index"] == expected[0][0], f"{where}: top-1 differs"
    worst = 0.0
    for index, score in expected:
        assert index in got, f"{where}: class {index} missing from our top-k"
        worst = max(worst, abs(got[index] - score))
    assert worst <= TOLERANCE, f"{where}: probabilities differ by {worst}"
    return worst


def mode_variants(photo: Path, folder: Path) -> list[Path]:
    """The photo re-encoded in every mode the decoding policy covers via Pillow semantics."""
    image = Image.open(photo).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    variants: dict[str, tuple[Any, str, dict[str, Any]]] = {
        "exif6.jpg": (image, "JPEG", {"exif": exif.tobytes(), "quality": 95}),
        "grey.png": (image.convert("L"), "PNG", {}),
        "palette.png": (image.convert("P"), "PNG", {}),
        "cmyk.jpg": (image.convert("CMYK"), "JPEG", {"quality": 95}),
        "lossless.webp": (image, "WEBP", {"lossless": True}),
        "plain.bmp": (image, "BMP", {}),
        "plain.tiff": (image, "TIFF", {}),
        "anim.gif": (
            image.convert("P"),
            "GIF",
            {"save_all": True, "append_images": [Image.new("P", image.size, 3)]},
        ),
    }
    paths = []
    for name, (img, fmt, kwargs) in variants.items():
        path = folder / f"{photo.stem}-{name}"
        img.save(path, format=fmt, **kwargs)
        paths.append(path)
    return paths


@pytest.mark.parametrize("checkpoint", ["v1_checkpoint", "v2_checkpoint"])
def test_classify_matches_transformers_pipeline(
    checkpoint: str, request: pytest.FixtureRequest, photos: list[Path], tmp_path: Path
) -> None:
    from transformers import pipeline

    folder: Path = request.getfixturevalue(checkpoint)
    inputs = list(photos)
    for photo in photos[:2]:
        inputs += mode_variants(photo, tmp_path)
    classifier = pipeline("image-classification", model=str(folder), device="cpu")
    top_k = 5
    records = ours(folder, inputs, top_k)
    assert [r["path"] for r in records] == [str(p) for p in inputs]
    label2id: Any = classifier.model.config.label2id
    for path, record in zip(inputs, records, strict=True):
        expected = [(label2id[p["label"]], p["score"]) for p in classifier(str(path), top_k=top_k)]
        compare(record, expected, path.name)


def reference_scores(folder: Path, pixels: np.ndarray, top_k: int) -> list[tuple[int, float]]:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    batch = processor(Image.fromarray(pixels.astype(np.uint8), "RGB"), return_tensors="pt")
    with torch.no_grad():
        probs = model(**batch).logits.softmax(-1)[0]
    scores, indices = probs.topk(top_k)
    return list(zip(indices.tolist(), scores.tolist(), strict=True))


def test_alpha_and_sixteen_bit_policy_end_to_end(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    """Pixels the policy defines beyond Pillow's convert('RGB'), fed to transformers directly."""
    rgb = np.asarray(Image.open(photos[2]).convert("RGB")).astype(np.float64)
    rng = np.random.default_rng(0)
    alpha = rng.integers(0, 256, size=rgb.shape[:2] + (1,))
    rgba = np.concatenate([rgb, alpha], -1).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    deep = (rgb * 257 + rng.integers(-128, 128, size=rgb.shape)).clip(0, 65535).astype(np.uint16)
    (tmp_path / "deep.png").write_bytes(png_bytes(deep, 2))

    records = ours(v1_checkpoint, [tmp_path / "alpha.png", tmp_path / "deep.png"], 5)
    compare(records[0], reference_scores(v1_checkpoint, composite_over_white(rgba), 5), "alpha")
    compare(records[1], reference_scores(v1_checkpoint, np.rint(deep / 257.0), 5), "16-bit")


def test_no_resize_config_batches_mixed_sizes(photos: list[Path], tmp_path: Path) -> None:
    """With do_resize false, a batch holds several image sizes: each runs at its own size."""
    import factories

    pre = dict(factories.IMAGENET_PREPROCESSOR, do_resize=False)
    folder = factories.save_hf(factories.hf_model(num_labels=5, seed=8), tmp_path / "m", pre)
    small = []
    for i, photo in enumerate(photos[:4]):  # four photos at three different sizes
        path = tmp_path / f"p{i}.png"
        Image.open(photo).convert("RGB").resize((64 + 32 * (i % 3), 48)).save(path)
        small.append(path)
    records = ours(folder, small, 5)
    for path, record in zip(small, records, strict=True):
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
        compare(record, reference_scores(folder, pixels, 5), path.name)
