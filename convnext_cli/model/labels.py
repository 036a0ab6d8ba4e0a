"""Class names for classifier heads: ImageNet-1k, ImageNet-22k, or generic ``LABEL_i``.

The names ship as package data (``convnext_cli/model/data/imagenet-1k.txt``, 1000 lines, and
``convnext_cli/model/data/imagenet-22k.txt``, 21841 lines, one class per line in index order) in
the format transformers' ImageNet configs use, e.g. index 281 is ``"tabby, tabby cat"``.
``convnext_cli/model/data/README.md`` says where they come from.  The files are read lazily,
the first time a head of that size needs names.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from convnext_cli.errors import UsageError, one_line
from convnext_cli.reading import MAX_JSON_FILE_BYTES, parse_json, read_small_file

MAX_LABEL_FILE_BYTES = MAX_JSON_FILE_BYTES
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


def label_name(index: int) -> str:
    """transformers' placeholder name for class ``index``, ``LABEL_7``: made only here."""
    return f"LABEL_{index}"


def generic_labels(num_labels: int) -> list[str]:
    """transformers' placeholder names: ``LABEL_0``, ``LABEL_1``, ..."""
    return [label_name(i) for i in range(num_labels)]


def id2label_dict(labels: Sequence[str]) -> dict[str, str]:
    """config.json's ``id2label``: string indices to names."""
    return {str(i): name for i, name in enumerate(labels)}


def label2id_dict(labels: Sequence[str]) -> dict[str, int]:
    """config.json's ``label2id`` (a repeated name keeps its last index, as in transformers)."""
    return {name: i for i, name in enumerate(labels)}


@cache
def _read_label_file(filename: str) -> tuple[str, ...]:
    data = resources.files("convnext_cli.model").joinpath("data")
    text = data.joinpath(filename).read_text(encoding="utf-8")
    names = tuple(text.splitlines())
    expected = {v: k for k, v in _LABEL_FILES.items()}[filename]
    if len(names) != expected:
        raise RuntimeError(f"package data {filename} has {len(names)} names, expected {expected}")
    return names


def read_labels_file(path: Path, expected: int) -> list[str]:
    """``--labels FILE``: class names in index order, replacing a checkpoint's ``id2label``.

    The file is one name per line (UTF-8; a trailing empty line is ignored), or JSON: a
    list of names, an object ``{"0": "cat", ...}`` (an ``id2label``), or a config.json-like
    object holding ``id2label``.  It must name exactly ``expected`` classes.
    """
    if expected == 0:
        raise UsageError(f"--labels {path}: the model has no classifier (a feature model)")
    data = read_small_file(path, f"--labels {path}", limit=MAX_LABEL_FILE_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--labels {path}: cannot read ({one_line(exc)})") from exc
    names = _json_labels(text, path) if text.lstrip().startswith(("[", "{")) else None
    if names is None:
        names = text.splitlines()
        if names and names[-1] == "":
            names.pop()
    if len(names) != expected:
        raise UsageError(
            f"--labels {path}: {len(names)} names, but the classifier has {expected} outputs"
        )
    return names


def _json_labels(text: str, path: Path) -> list[str]:
    data: Any = parse_json(text, f"--labels {path}")
    if isinstance(data, dict) and isinstance(data.get("id2label"), dict):
        data = data["id2label"]
    if isinstance(data, dict):
        try:
            ordered = sorted((int(k), v) for k, v in data.items())
        except (TypeError, ValueError):
            raise UsageError(f"--labels {path}: keys must be class indices 0..n-1") from None
        if [k for k, _ in ordered] != list(range(len(ordered))):
            raise UsageError(f"--labels {path}: keys must be class indices 0..n-1, no gaps")
        data = [v for _, v in ordered]
    if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
        raise UsageError(f"--labels {path}: expected a list of names or an id2label object")
    return data
