"""The library face of the tool: the same core the CLI uses, for Python callers.

Inputs may be paths or images already in memory:

- a path: ``str``, ``bytes`` or ``os.PathLike`` (``pathlib.Path``); one path is one input
  (``classify("cat.jpg")`` is one image, never one per character);
- a ``PIL.Image.Image``: its EXIF orientation applied, converted to RGB by the decoding
  policy (alpha over white, 16-bit scaled to 8 bits, ...); its current frame is used;
  images over the pixel limit are refused as files are;
- a NumPy array of uint8: ``H x W`` (grey), ``H x W x 1``, ``H x W x 3`` (RGB) or
  ``H x W x 4`` (RGBA, composited over white);
- a torch tensor of uint8: ``3 x H x W`` (RGB), ``1 x H x W``, ``4 x H x W`` or ``H x W``;
- a list (any iterable) of those; a 4-D array or tensor is a batch, one image per entry
  of its first dimension.

Images given in memory get the same resize, crop and normalisation as files; their
results' ``path`` is ``<image N>``, N being the input's position (from 0) in the call's
inputs.  An array or image that cannot be used (wrong dtype or shape, a truncated file
behind a lazily opened PIL image) gets an error record like an unreadable file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from convnext_cli.choices import DECODERS, DEFAULT_MODEL
from convnext_cli.engine.decode_pool import failure
from convnext_cli.engine.loading import ModelSource, RunOptions, load_runner
from convnext_cli.errors import ImageError, UsageError
from convnext_cli.imaging.decoding import check_pixel_count, pil_to_rgb
from convnext_cli.limits import (
    JOB_INTS,
    as_bool,
    as_device,
    as_dtype,
    as_int,
    as_path,
    as_text,
    parse_top_k,
)
from convnext_cli.results import InMemoryImage, Input, Result

ImageInput = Any  # str | os.PathLike | bytes | PIL.Image.Image | numpy.ndarray | torch.Tensor


class ImageModel:
    """Load a ConvNeXt checkpoint once; classify or embed images (files or in memory).

    >>> model = ImageModel("facebook/convnext-tiny-224", device="cpu", dtype="float32")
    >>> model.classify("cat.jpg")[0].predictions[0].label
    'tabby, tabby cat'

    ``revision``, ``cache_dir`` and ``token`` reach the Hub; ``labels`` names a file whose
    class names (one per line, or JSON) replace the checkpoint's.  What ``dtype="auto"``
    and ``decode="auto"`` chose is in :attr:`notes`.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        decode: str | None = "auto",
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | None = None,
        labels: str | os.PathLike[str] | None = None,
        compile: bool = False,
    ) -> None:
        """Every argument is checked as the CLI's flag for it is (:mod:`convnext_cli.limits`):
        None for ``device``, ``dtype`` or ``decode`` is ``"auto"``; a bad type or value is a
        UsageError (exit code 2)."""
        source = ModelSource(
            as_path(model, "model"),
            revision=_optional_text(revision, "revision"),
            cache_dir=_optional_path(cache_dir, "cache_dir"),
            token=_optional_text(token, "token"),
            labels=_optional_path(labels, "labels"),
        )
        decode = as_text("auto" if decode is None else decode, "--decode", DECODERS)
        options = RunOptions(
            as_device(device), as_dtype(dtype), decode, compile=as_bool(compile, "compile")
        )
        self.batch_size = _optional_int(batch_size, "batch_size")
        self.workers = _optional_int(workers, "workers")
        loaded = load_runner(source, options)
        self.runner = loaded.runner
        self.checkpoint = loaded.checkpoint
        self.model = loaded.runner.model
        self.notes = loaded.notes

    @property
    def labels(self) -> list[str]:
        return self.model.config.labels

    def classify(
        self, inputs: ImageInput | Iterable[ImageInput], top_k: int | str = 5
    ) -> list[Result]:
        """One result per input, in order: ``.predictions`` (label, index, score) or ``.error``.
        ``top_k``: 1 to :data:`~convnext_cli.limits.MAX_TOP_K`, or ``"all"`` (or 0)."""
        batches = self.runner.classify(
            as_inputs(inputs),
            top_k=parse_top_k(top_k),
            batch_size=self.batch_size,
            workers=self.workers,
        )
        return [r for batch in batches for r in batch]

    def embed(
        self, inputs: ImageInput | Iterable[ImageInput], normalize: bool = False
    ) -> list[Result]:
        """One result per input, in order: ``.embedding`` (pooler_output) or ``.error``."""
        batches = self.runner.embed(
            as_inputs(inputs),
            normalize=as_bool(normalize, "normalize"),
            batch_size=self.batch_size,
            workers=self.workers,
        )
        return [r for batch in batches for r in batch]


def _optional_int(value: Any, name: str) -> int | None:
    """batch_size or workers: None, or a whole number in the range of its CLI flag."""
    flag, low, high = JOB_INTS[name]
    return None if value is None else as_int(value, flag, low, high)


def _optional_text(value: Any, name: str) -> str | None:
    return None if value is None else as_text(value, name)


def _optional_path(value: Any, name: str) -> Path | None:
    return None if value is None else Path(as_path(value, name))


# The name this class had before it was ImageModel (it embeds as well as classifies): code
# written against it keeps working.
Classifier = ImageModel


def _kind(value: Any) -> str | None:
    """'path', 'pil', 'array', 'tensor', or None for anything else (an iterable, say)."""
    if isinstance(value, (str, bytes, os.PathLike)):
        return "path"
    module = type(value).__module__
    if module.startswith("PIL.") or module == "PIL":
        if isinstance(value, Image.Image):
            return "pil"
    if module == "numpy":
        if isinstance(value, np.ndarray):
            return "array"
    if module.startswith("torch"):
        if isinstance(value, torch.Tensor):
            return "tensor"
    return None


def as_inputs(inputs: ImageInput | Iterable[ImageInput]) -> list[Input]:
    """The pipeline's inputs for what a caller passed (see the module docstring)."""
    kind = _kind(inputs)
    batch = kind in ("array", "tensor") and getattr(inputs, "ndim", 0) == 4
    if kind is not None and not batch:
        inputs = [inputs]
    elif kind is None and not isinstance(inputs, Iterable):
        raise UsageError(
            f"expected an image path, a PIL image, a NumPy array, a uint8 tensor or a list "
            f"of them, not {type(inputs).__name__}"
        )
    items: list[Input] = []
    for number, value in enumerate(inputs):
        items.append(_as_input(value, number))
    return items


def _as_input(value: Any, number: int) -> Input:
    kind = _kind(value)
    if kind == "path":
        return as_path(value, f"input {number}")
    if kind is None:
        raise UsageError(
            f"input {number}: expected an image path, a PIL image, a NumPy array or a uint8 "
            f"tensor, not {type(value).__name__}"
        )
    name = f"<image {number}>"
    try:
        return InMemoryImage(name, _pixels(value, kind))
    except Exception as exc:
        return InMemoryImage(name, None, failure(exc))


def _pixels(value: Any, kind: str) -> torch.Tensor:
    """An in-memory image as an RGB uint8 (3, H, W) tensor, per the decoding policy.

    Its dtype, shape and pixel count are checked before anything is copied (a broadcast
    30000x30000 view holds a few bytes; a copy of it, gigabytes)."""
    if kind == "tensor":
        tensor = value.detach()
        if tensor.dtype != torch.uint8 or not (
            tensor.ndim == 2 or (tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4))
        ):
            raise ImageError(
                f"unsupported tensor: {str(tensor.dtype).removeprefix('torch.')} "
                f"{tuple(tensor.shape)} (use uint8 3xHxW, 1xHxW, 4xHxW or HxW)"
            )
        check_pixel_count(int(tensor.shape[-1]), int(tensor.shape[-2]))
        value = (tensor if tensor.ndim == 2 else tensor.permute(1, 2, 0)).cpu().numpy()
        kind = "array"
    if kind == "array":
        array = np.asarray(value)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.dtype != np.uint8 or not (
            array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (2, 3, 4))
        ):
            raise ImageError(
                f"unsupported array: {array.dtype} {array.shape} "
                "(use uint8 HxW, HxWx1, HxWx3 or HxWx4)"
            )
        check_pixel_count(int(array.shape[1]), int(array.shape[0]))
        value = Image.fromarray(np.ascontiguousarray(array))
    image: Image.Image = value
    check_pixel_count(*image.size)
    try:
        image = ImageOps.exif_transpose(image) or image
        rgb = pil_to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from exc
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)
