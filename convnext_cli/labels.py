"""Class names for classifier heads: ImageNet-1k, ImageNet-22k, or generic ``LABEL_i``.

The names ship as package data (``convnext_cli/data/imagenet-1k.txt``, 1000 lines, and
``convnext_cli/data/imagenet-22k.txt``, 21841 lines, one class per line in index order) in
the format transformers' ImageNet configs use, e.g. index 281 is ``"tabby, tabby cat"``.
``convnext_cli/data/README.md`` says where they come from.  The files are read lazily,
the first time a head of that size needs names.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources

IMAGENET_1K = 1000
IMAGENET_22K = 21841

_LABEL_FILES: dict[int, str] = {
    IMAGENET_1K: "imagenet-1k.txt",
    IMAGENET_22K: "imagenet-22k.txt",
}


def labels_for(num_labels: int) -> list[str]:
    """Class names for a head of ``num_labels`` outputs, index order.

    ImageNet-1k names for 1000 classes, ImageNet-22k names for 21841, ``LABEL_i`` otherwise.
    """
    filename = _LABEL_FILES.get(num_labels)
    if filename is None:
        return generic_labels(num_labels)
    return list(_read_label_file(filename))


def generic_labels(num_labels: int) -> list[str]:
    """transformers' placeholder names: ``LABEL_0``, ``LABEL_1``, ..."""
    return [f"LABEL_{i}" for i in range(num_labels)]


def id2label_dict(labels: Sequence[str]) -> dict[str, str]:
    """config.json's ``id2label``: string indices to names."""
    return {str(i): name for i, name in enumerate(labels)}


def label2id_dict(labels: Sequence[str]) -> dict[str, int]:
    """config.json's ``label2id`` (a repeated name keeps its last index, as in transformers)."""
    return {name: i for i, name in enumerate(labels)}


@cache
def _read_label_file(filename: str) -> tuple[str, ...]:
    data = resources.files("convnext_cli").joinpath("data")
    text = data.joinpath(filename).read_text(encoding="utf-8")
    names = tuple(text.splitlines())
    expected = {v: k for k, v in _LABEL_FILES.items()}[filename]
    if len(names) != expected:
        raise RuntimeError(f"package data {filename} has {len(names)} names, expected {expected}")
    return names
