"""Benchmark inputs made offline: a convnext-tiny-shaped checkpoint and a folder of photos.

The Hub is unreachable from CI and from this project's machines, so the checkpoint is
ConvNeXt-T's exact architecture (depths 3-3-9-3, widths 96-768, 1000 ImageNet labels) with
random weights: speed does not depend on the weights' values.  The photos are the sample
photos re-encoded as JPEGs at ordinary camera-roll sizes (random crops and scales).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image

from convnext_cli.checkpoints.checkpoint import PREPROCESSOR_FILE
from convnext_cli.checkpoints.weights_io import save_safetensors
from convnext_cli.imaging.preprocess import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PreprocessSpec,
)
from convnext_cli.model.config import ConvNextConfig
from convnext_cli.model.convnext import ConvNeXtForClassification
from convnext_cli.model.labels import id2label_dict, labels_for

REPO = Path(__file__).resolve().parent.parent


def make_checkpoint(folder: Path, size: str = "tiny", v2: bool = False, seed: int = 0) -> Path:
    """A Hub-layout folder (config, safetensors, preprocessor config) of the given size."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "model.safetensors").exists():
        return folder
    config = ConvNextConfig.from_size(size, v2=v2)
    config.id2label = {int(k): v for k, v in id2label_dict(labels_for(1000)).items()}
    torch.manual_seed(seed)
    model = ConvNeXtForClassification(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 1:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.02)
    raw = config.to_dict()
    raw["architectures"] = [
        "ConvNextV2ForImageClassification" if v2 else "ConvNextForImageClassification"
    ]
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    spec = PreprocessSpec(
        shortest_edge=224, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD
    )
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    save_safetensors(model.state_dict(), folder / "model.safetensors", {"format": "pt"})
    return folder


def make_photos(folder: Path, count: int = 100, seed: int = 0) -> Path:
    """`count` JPEGs of 400-1024 px on the long side, cut from the sample photos."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.jpg"))
    if len(existing) >= count:
        return folder
    rng = random.Random(seed)
    sources = [
        Image.open(p).convert("RGB")
        for p in sorted((REPO / "sample_images").iterdir())
        if p.suffix.lower() in (".jpg", ".png")
    ]
    for i in range(count):
        image = sources[i % len(sources)]
        w, h = image.size
        cw, ch = rng.randint(w * 2 // 3, w), rng.randint(h * 2 // 3, h)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = image.crop((left, top, left + cw, top + ch))
        scale = rng.randint(400, 1024) / max(crop.size)
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.BICUBIC)
        crop.save(folder / f"photo_{i:05d}.jpg", quality=90)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "bench-out" / "convnext-tiny")
    parser.add_argument("--photos", type=Path, default=REPO / "bench-out" / "photos")
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    print(make_checkpoint(args.checkpoint))
    print(make_photos(args.photos, args.count))


if __name__ == "__main__":
    main()
