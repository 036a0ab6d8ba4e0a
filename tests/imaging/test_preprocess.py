"""Pixels equal transformers' ConvNextImageProcessor for the same preprocessor config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_pixels_match
from PIL import Image

from convnext_cli.imaging.preprocess import PreprocessSpec

IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
CONFIGS = {
    "224-bicubic": dict(size={"shortest_edge": 224}, crop_pct=0.875, resample=3, **IMAGENET),
    "384-warp": dict(size={"shortest_edge": 384}, resample=3, **IMAGENET),
    "512-warp": dict(size={"shortest_edge": 512}, resample=3),
    "torchvision-bilinear": dict(size={"shortest_edge": 224}, crop_pct=224 / 236, resample=2),
    "160-lanczos": dict(size={"shortest_edge": 160}, crop_pct=0.95, resample=1),
    "nearest": dict(size={"shortest_edge": 224}, crop_pct=0.875, resample=0),
    "legacy-int-size": dict(size=288, crop_pct=1.0, resample=3, **IMAGENET),
    "no-rescale": dict(
        size={"shortest_edge": 224},
        do_rescale=False,
        image_mean=[120, 110, 100],
        image_std=[60, 60, 60],
    ),
    "no-normalize": dict(size={"shortest_edge": 224}, do_normalize=False),
    "defaults": {},
}


def reference_pixels(config: dict, image: torch.Tensor) -> torch.Tensor:
    from transformers import ConvNextImageProcessor

    processor = ConvNextImageProcessor(**config)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    return processor(pil, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pixels_match_processor(name: str, photos: list[Path]) -> None:
    config = CONFIGS[name]
    spec = PreprocessSpec.from_dict(config)
    assert_pixels_match(spec, photos, lambda image: reference_pixels(config, image))


@pytest.mark.parametrize("size", [(7, 5), (100, 30), (30, 100), (223, 224), (1, 300)])
def test_small_and_extreme_aspect_images(size: tuple[int, int]) -> None:
    """Tiny and thin images: the resize rounding and centre-crop offsets still agree."""
    gen = torch.Generator().manual_seed(sum(size))
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=gen)
    for name in ("224-bicubic", "384-warp", "160-lanczos"):
        spec = PreprocessSpec.from_dict(CONFIGS[name])
        expected = reference_pixels(CONFIGS[name], image)
        got = spec.normalize(spec.resize_and_crop(image)[None])[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_spec_round_trips_through_transformers(tmp_path: Path) -> None:
    """to_dict() writes a preprocessor_config.json that transformers reads to the same spec."""
    from transformers import AutoImageProcessor

    spec = PreprocessSpec.from_dict(CONFIGS["torchvision-bilinear"] | IMAGENET)
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(spec.to_dict()))
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.size["shortest_edge"] == 224
    assert processor.crop_pct == pytest.approx(224 / 236)
    assert int(processor.resample) == 2
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


def test_missing_fields_take_processor_defaults() -> None:
    from transformers import ConvNextImageProcessor

    spec = PreprocessSpec.from_dict({})
    processor = ConvNextImageProcessor()
    assert spec.shortest_edge == processor.size["shortest_edge"]
    assert spec.crop_pct == pytest.approx(processor.crop_pct)
    assert list(spec.image_mean) == list(processor.image_mean)
    assert list(spec.image_std) == list(processor.image_std)
    assert spec.resample == int(processor.resample)
