"""Decoding image files to RGB uint8 tensors, following the decoding policy in the README.

- EXIF orientation is applied.
- Greyscale, palette, CMYK and other modes are converted to RGB.
- Transparency is composited over white.
- 16-bit images are scaled to 8 bits as value / 257, rounded.
- Animations (GIF, WebP, APNG) use their first frame.
- Images over 178,956,970 pixels are refused from their header, before decoding.

Pillow decodes (libjpeg-turbo for JPEG: the same pixels as torchvision's decoder, and the
same decoder transformers' pipeline uses).  torchvision's decoders are not the default on
CPU: importing torchvision costs about 2 s (it pulls in torch._dynamo), more than Pillow's
extra milliseconds on a hundred photos.  16-bit PNGs are the exception: only torchvision's
PNG decoder returns their full depth, so they are decoded there.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnext_cli.errors import ImageError, one_line

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Pillow's own refusal threshold (2 x Image.MAX_IMAGE_PIXELS at its default), fixed here so
# a library user who changes Pillow's global does not change this tool's policy.
MAX_PIXELS = 178_956_970

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def decode_file(path: str | Path) -> torch.Tensor:
    """Read and decode one image file to a (3, H, W) uint8 tensor, or raise ImageError."""
    return decode_bytes(read_file(path))


def read_file(path: str | Path) -> bytes:
    """A file's bytes, or ImageError with the one-line reason it cannot be read."""
    try:
        return Path(path).read_bytes()
    except IsADirectoryError as exc:
        raise ImageError("is a directory, not an image") from exc
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or one_line(exc)}") from exc


def decode_bytes(data: bytes) -> torch.Tensor:
    """Decode encoded image bytes to a (3, H, W) uint8 RGB tensor, or raise ImageError."""
    if not data:
        raise ImageError("empty file")
    image = open_header(data)
    if data.startswith(_PNG_MAGIC) and len(data) > 24 and data[24] == 16:
        io_ops = torchvision_io()
        if io_ops is not None:
            return _decode_png16(io_ops, data)
    return _decode_with_pillow(image)


@lru_cache(maxsize=1)
def torchvision_io() -> Any:
    """torchvision.io's decoders, or None where this torchvision no longer ships them.

    torchvision 0.29 deprecates its image codecs in favour of TorchCodec; without them,
    16-bit PNGs fall back to Pillow, which keeps the high byte of each sample.
    """
    try:
        with no_deprecation_warning():
            from torchvision import io as tv_io

            tv_io.decode_jpeg, tv_io.decode_png, tv_io.ImageReadMode  # noqa: B018
    except (ImportError, AttributeError):
        return None
    return tv_io


def open_header(data: bytes) -> Image.Image:
    """Open lazily (header only) and refuse decompression bombs before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"refused: image too large ({one_line(exc)})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not a recognised image format") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"corrupt image header: {one_line(exc)}") from exc
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"refused: {width}x{height} = {width * height} pixels is over the "
            f"{MAX_PIXELS} pixel limit (possible decompression bomb)"
        )
    if width == 0 or height == 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    return image


@contextlib.contextmanager
def no_deprecation_warning() -> Iterator[None]:
    """torchvision >= 0.29 warns on every codec call; the fallback is documented above."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _torchvision_reason(exc: Exception) -> str:
    """torchvision's messages start with a C++ source location; keep the reason only."""
    text = one_line(exc)
    return text.rsplit(", ", 1)[-1] if ".cpp:" in text else text


def _decode_png16(io_ops: Any, data: bytes) -> torch.Tensor:
    """16-bit PNG: torchvision keeps all 16 bits, which are then scaled to 8 (v / 257, rounded)."""
    import torch

    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with no_deprecation_warning():
            raw = io_ops.decode_png(
                buffer, mode=io_ops.ImageReadMode.UNCHANGED, apply_exif_orientation=True
            )
    except RuntimeError as exc:
        raise ImageError(f"cannot decode PNG: {_torchvision_reason(exc)}") from exc
    scaled = raw.to(torch.float32)
    if raw.dtype != torch.uint8:
        scaled = (scaled / 257.0).round()
    return _to_rgb(scaled)


def _to_rgb(pixels: torch.Tensor) -> torch.Tensor:
    """(C, H, W) float in 0..255 with C = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA) -> RGB uint8."""
    import torch

    channels = pixels.shape[0]
    if channels in (2, 4):
        color, alpha = pixels[:-1], pixels[-1:] / 255.0
        pixels = (color * alpha + 255.0 * (1.0 - alpha)).round()
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return pixels.clamp(0, 255).to(torch.uint8).contiguous()


def _decode_with_pillow(image: Image.Image) -> torch.Tensor:
    import torch
    from PIL import ImageOps

    try:
        image.seek(0)  # first frame of an animation
        image = ImageOps.exif_transpose(image) or image
        rgb = pil_to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"cannot decode image: {one_line(exc)}") from exc
    import numpy as np

    # (H, W, 3) -> (3, H, W) as a view: channels-last memory, which the resize kernels prefer
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB per the decoding policy."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        image.load()
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) greyscale: value / 257, rounded, clipped to 0..255.
        import numpy as np

        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255)
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        return image.convert("L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
