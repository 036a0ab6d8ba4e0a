"""Validated JSON: reading a checkpoint's JSON object, and typed, range-checked reads of its
fields whose failures are one line naming the file and the field.

``config.json`` (:mod:`convnext_cli.model.config`) and ``preprocessor_config.json``
(:mod:`convnext_cli.imaging.preprocess`) are both read through :func:`read_json_object` and
checked with a :class:`Fields` subclass.  No torch: this module is light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convnext_cli.errors import CheckpointError
from convnext_cli.reading import MAX_JSON_FILE_BYTES, read_json_file

MAX_JSON_BYTES = MAX_JSON_FILE_BYTES  # config.json (ImageNet-22k labels: about 1 MB)


def json_kind(value: Any) -> str:
    """A JSON value for a one-line message: ``null``, ``true``, ``"3"``, ``[1, 2]`` (shortened)."""
    import json

    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` object hook: a key given twice is refused (json keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def is_int(value: Any) -> bool:
    """A JSON integer (bool is an int in Python, not in JSON)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (UTF-8, at most MAX_JSON_BYTES, no key given twice), or a
    one-line CheckpointError."""
    data = read_json_file(
        path, error=CheckpointError, limit=MAX_JSON_BYTES, object_pairs_hook=no_duplicate_keys
    )
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {json_kind(data)}")
    return data


class Fields:
    """The fields of one JSON object; each failure is a CheckpointError ``WHERE: FIELD: ...``."""

    def __init__(self, raw: dict[str, Any], where: str) -> None:
        self.raw = raw
        self.where = where

    def fail(self, name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {name}: {problem}")

    def bounded_int(
        self, name: str, value: Any, limits: tuple[int, int], expected: str = "an integer"
    ) -> int:
        """``value`` as an int within ``limits`` (both included), else a failure of ``name``."""
        low, high = limits
        if not is_int(value):
            raise self.fail(name, f"expected {expected}, found {json_kind(value)}")
        if not low <= value <= high:
            raise self.fail(name, f"{value} is out of range ({low}..{high})")
        return int(value)
