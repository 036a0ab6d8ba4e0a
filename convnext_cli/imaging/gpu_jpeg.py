"""JPEG decoding on the model's device: nvjpeg on CUDA, through torchvision.io.decode_jpeg.

The decode workers only read a JPEG's header (the decompression-bomb check, its colour
mode and EXIF orientation) and hand its bytes over; a background thread of the main process
decodes the whole batch on the device in one call, applies the orientation with tensor
flips and resizes the batch there at once (see :mod:`convnext_cli.engine.gpu.device_decode`).
Whatever the device decoder is not trusted with is decoded on the CPU as before:
files that are not JPEGs, CMYK/YCCK JPEGs, files that do not end in an end-of-image
marker (truncated ones, which the CPU path reports as errors, and ones with trailing
data), and any image the device decoder rejects (sent back to a decode worker, with its
deadline and crash isolation: see ``gpu.device_decode.RejectDecoder``).  Only ``--decode gpu``
decodes here; ``auto`` is CPU decoding, the exact path.

The header is read by :func:`convnext_cli.imaging.decoding.open_header`, so the CPU path's refusals
hold here too, before anything reaches the device: only the advertised formats, the pixel
limit, the per-image memory budget, and the structural time-bomb checks (a JPEG with more
than ``MAX_JPEG_SCANS`` scans is refused, not handed to nvjpeg).

nvjpeg's pixels can differ from libjpeg-turbo's (which Pillow, and so transformers, use) by
a grey level or two, so ``--decode cpu`` is the choice for bit-exact preprocessing.  On the
CPU the same code path runs with torchvision's libjpeg-turbo decoder, which is how it is
tested without a GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from convnext_cli.choices import DECODERS
from convnext_cli.errors import UsageError, one_line
from convnext_cli.imaging.decoding import no_deprecation_warning, open_header, torchvision_io

DECODE_CHOICES = DECODERS

_JPEG_MAGIC = b"\xff\xd8\xff"
_END_OF_IMAGE = b"\xff\xd9"
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG's bytes, passed from a decode worker to the device, with its EXIF orientation."""

    data: bytes
    orientation: int = 1  # EXIF: 1 upright .. 8


def device_decodable(data: bytes) -> EncodedJpeg | None:
    """The JPEG to decode on the device, or None when the CPU path should decode `data`.

    Raises ImageError for an image over the pixel limit, exactly as the CPU path does.
    """
    if not data.startswith(_JPEG_MAGIC) or not data.endswith(_END_OF_IMAGE):
        return None
    image = open_header(data)
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    try:
        orientation = int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # an unreadable EXIF block: let Pillow's own handling decide
        return None
    return EncodedJpeg(data, orientation if 1 <= orientation <= 8 else 1)


def resolve_decode(
    choice: str, device: torch.device, on_note: Callable[[str], None] | None = None
) -> bool:
    """Whether to decode JPEGs on `device`, for ``--decode auto|cpu|gpu``.

    auto decodes on the CPU: Pillow's pixels, the same results on every device (nvjpeg's
    pixels and the resize on the GPU differ from them by a grey level or two).  gpu needs a
    CUDA device; at load one tiny JPEG is decoded there (:func:`probe`): a torchvision
    without a working nvjpeg would otherwise fail every batch, so then the run decodes on
    the CPU, and ``on_note`` hears one line saying why.
    """
    choice = choice.lower()
    if choice not in DECODE_CHOICES:
        raise UsageError(f"unknown --decode {choice!r} (use {', '.join(DECODE_CHOICES)})")
    if choice == "gpu" and device.type != "cuda":
        raise UsageError(f"--decode gpu needs a CUDA device; the model runs on {device}")
    if choice != "gpu":
        return False  # and torchvision stays unimported: its import costs seconds
    quiet_codec_warnings()
    problem = probe(device)
    if problem is not None:
        if on_note is not None:
            on_note(f"--decode gpu: {problem}; decoding JPEGs on the CPU instead")
        return False
    return True


def probe(device: torch.device) -> str | None:
    """Decode one tiny JPEG on `device`: None when that works, else why not (one line)."""
    io_ops = torchvision_io()
    if io_ops is None:
        return "torchvision's JPEG decoder is absent"
    import io

    from PIL import Image

    encoded = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(encoded, format="JPEG", quality=95)
    data = torch.frombuffer(bytearray(encoded.getvalue()), dtype=torch.uint8)
    try:
        with no_deprecation_warning():
            image = io_ops.decode_jpeg([data], mode=io_ops.ImageReadMode.RGB, device=device)[0]
        ok = tuple(image.shape) == (3, 16, 16) and abs(int(image[0, 8, 8]) - 200) < 16
    except Exception as exc:  # any failure of the device decoder means: do not use it
        return f"the device JPEG decoder failed a test image ({one_line(exc)[:200]})"
    return None if ok else "the device JPEG decoder returned wrong pixels for a test image"


def decode(encoded: list[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs on `device` to upright (3, H, W) uint8 RGB tensors there.

    One batched call; if the batch fails (torchvision returns nothing then), it is halved
    and each half tried again, down to single images: one bad JPEG in a batch of 256 costs
    about 16 calls, not 256.  None marks an image the device decoder rejected: decode it on
    the CPU.
    """
    io_ops = torchvision_io()
    buffers = [torch.frombuffer(bytearray(e.data), dtype=torch.uint8) for e in encoded]
    # no warnings.catch_warnings here: it swaps process-wide state and is not thread-safe
    # (this runs in the decode thread); quiet_codec_warnings ran in the main thread
    images = _decode_halving(io_ops, buffers, device)
    return [
        None if image is None else upright(image, e.orientation)
        for image, e in zip(images, encoded, strict=True)
    ]


def _decode_halving(
    io_ops: Any, buffers: list[torch.Tensor], device: torch.device
) -> list[torch.Tensor | None]:
    rgb = io_ops.ImageReadMode.RGB
    if not buffers:
        return []
    if len(buffers) == 1:
        try:
            return [io_ops.decode_jpeg(buffers[0], mode=rgb, device=device)]
        except RuntimeError:
            return [None]
    try:
        return list(io_ops.decode_jpeg(buffers, mode=rgb, device=device))
    except RuntimeError:
        middle = len(buffers) // 2
        return _decode_halving(io_ops, buffers[:middle], device) + _decode_halving(
            io_ops, buffers[middle:], device
        )


def quiet_codec_warnings() -> None:
    """Ignore torchvision's deprecation notice on its codecs (issued on every call since
    0.29), once and for the process: called from the main thread, before the decode
    thread starts, instead of a ``warnings.catch_warnings`` around each call in that
    thread (not thread-safe before Python 3.14)."""
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a (C, H, W) tensor, as Pillow's ``exif_transpose`` does."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-2, -1)
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image
