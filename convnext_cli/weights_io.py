"""Reading weight files from disk: safetensors, or pickles loaded with ``weights_only=True``.

Nothing here executes code from a checkpoint: safetensors holds bare tensors, and
``torch.load(weights_only=True)`` refuses any pickle that would construct an
arbitrary object.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnext_cli.errors import CheckpointError, one_line

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".tar")


def read_weights_file(path: Path) -> dict[str, Any]:
    """Return the top-level mapping stored in a weights file (tensors or nested dicts)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    return _read_pickle(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(exc)})") from exc


def _read_pickle(path: Path) -> dict[str, Any]:
    import argparse
    import pickle

    import torch

    try:
        # Training checkpoints (facebookresearch `checkpoint-*.pth`) carry their argparse
        # arguments beside the weights; a Namespace holds plain values and runs no code.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds objects other than tensors "
            f"(only weights_only pickles are read) ({one_line(exc)})"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable PyTorch weights file ({one_line(exc)})"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _is_zip(path: Path) -> bool:
    """torch's zip format can be memory-mapped; the legacy tar/pickle format cannot."""
    import zipfile

    return zipfile.is_zipfile(path)


def shape_problems(
    expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, Any]
) -> str | None:
    """One line naming missing and unexpected keys and shape mismatches, or None if none."""
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(found[k])} vs expected {list(shape)}"
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    problems = [
        f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    return "; ".join(problems) or None


def save_safetensors(
    state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    """Write a state dict as safetensors (contiguous, unshared tensors)."""
    import torch
    from safetensors.torch import save_file

    # one contiguous, unshared copy of each tensor (safetensors refuses shared storage)
    tensors = {
        k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()
    }
    save_file(tensors, str(path), metadata=metadata)
