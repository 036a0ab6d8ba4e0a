"""What the screen tests and the captures in docs/screens/ run on: a checkpoint whose labels
are as long as ImageNet-22k's, and a folder of many photos with a few broken files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import factories

SAMPLES = Path(__file__).resolve().parents[2] / "sample_images"
PHOTO_DIR = "photos/2024-summer-holiday-in-the-mountains"


def long_labels(count: int = 1000) -> list[str]:
    """The ``count`` longest ImageNet-22k class names (comma lists of 60 to 175 characters)."""
    from convnext_cli.model.labels import IMAGENET_22K, labels_for

    names = labels_for(IMAGENET_22K)
    return sorted(names, key=len, reverse=True)[:count]


def long_label_checkpoint(folder: Path, sharpen: float = 4.0) -> Path:
    """A tiny V1 classifier with 1000 classes named like ImageNet-22k's longest; its head
    scaled by ``sharpen`` so that, like a trained model's, its top scores stand out."""
    import torch

    model = factories.hf_model(num_labels=1000, seed=1)
    with torch.no_grad():
        model.classifier.weight.mul_(sharpen)
    factories.save_hf(model, folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    labels = long_labels()
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
    config_path.write_text(json.dumps(config, indent=2))
    return folder


def photo_folder(root: Path, count: int = 200, broken: bool = True) -> list[str]:
    """``count`` photos (symlinks to the samples) under ``root/PHOTO_DIR``, with a truncated
    JPEG and a text file named .jpg among them when ``broken``; their paths relative to root."""
    folder = root / PHOTO_DIR
    folder.mkdir(parents=True, exist_ok=True)
    samples = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    names = []
    for n in range(count):
        sample = samples[n % len(samples)]
        name = f"IMG_20240712_{n:04d}{sample.suffix.lower()}"
        target = folder / name
        if not target.exists():
            os.symlink(sample, target)
        names.append(name)
    if broken:
        jpeg = next(p for p in samples if p.suffix.lower() == ".jpg").read_bytes()
        (folder / "IMG_20240712_0042_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
        (folder / "notes-from-the-trip.jpg").write_text("not an image, only a name that says so")
        names += ["IMG_20240712_0042_truncated.jpg", "notes-from-the-trip.jpg"]
    return [f"{PHOTO_DIR}/{name}" for name in sorted(names)]
