"""Shared fixtures: offline Hub, tiny randomised checkpoints, the sample photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import factories  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_images"
PHOTOS = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".png"))


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    assert len(PHOTOS) >= 6
    return PHOTOS


@pytest.fixture(scope="session")
def v1_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-stage V1 classifier with 1000 labels (ImageNet-sized head), 224 preprocessing."""
    folder = tmp_path_factory.mktemp("v1")
    return factories.save_hf(factories.hf_model(num_labels=1000, seed=1), folder)


@pytest.fixture(scope="session")
def v2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A V2 classifier with 7 labels and 384 (warp, no crop) preprocessing."""
    folder = tmp_path_factory.mktemp("v2")
    pre = dict(factories.IMAGENET_PREPROCESSOR, size={"shortest_edge": 384})
    return factories.save_hf(factories.hf_model(v2=True, num_labels=7, seed=2), folder, pre)
