"""Tiny transformers ConvNeXt models with randomised weights, saved as Hub-layout folders.

A fresh init leaves layer scale at 1e-6 and GRN at zero, so every block would be a near
identity and parity would prove nothing: every parameter gets real values here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers import randomise

IMAGENET_PREPROCESSOR = {
    "image_processor_type": "ConvNextImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "crop_pct": 0.875,
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def hf_model(
    v2: bool = False,
    depths: tuple[int, ...] = (1, 1, 2, 1),
    hidden_sizes: tuple[int, ...] = (8, 16, 24, 32),
    num_labels: int = 10,
    layer_scale: float = 1e-6,
    head: bool = True,
    seed: int = 0,
    **extra,
):
    """A transformers ConvNeXt (V1 or V2) with randomised weights."""
    import transformers

    kwargs = dict(
        depths=list(depths),
        hidden_sizes=list(hidden_sizes),
        num_stages=len(depths),
        num_labels=num_labels,
        **extra,
    )
    config: Any
    cls: Any
    if v2:
        config = transformers.ConvNextV2Config(**kwargs)
        cls = (
            transformers.ConvNextV2ForImageClassification if head else transformers.ConvNextV2Model
        )
    else:
        config = transformers.ConvNextConfig(layer_scale_init_value=layer_scale, **kwargs)
        cls = transformers.ConvNextForImageClassification if head else transformers.ConvNextModel
    return randomise(cls(config), seed)


def save_hf(model, folder: Path, preprocessor: dict | None = None) -> Path:
    """Save a transformers model plus a preprocessor_config.json as a Hub-layout folder."""
    model.save_pretrained(folder)
    pre = dict(IMAGENET_PREPROCESSOR if preprocessor is None else preprocessor)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return folder


def make_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A WebDataset-style tar shard holding ``members`` (name, bytes), in order."""
    import io
    import tarfile

    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path
