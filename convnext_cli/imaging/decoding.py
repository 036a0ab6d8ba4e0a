"""Reading and decoding image files to RGB uint8 tensors, following the decoding policy.

Decoding policy (the README's):

- EXIF orientation is applied.
- Greyscale, palette, CMYK and other modes are converted to RGB.
- Transparency is composited over white.
- 16-bit images are scaled to 8 bits as value / 257, rounded.
- Animations (GIF, WebP, APNG) and multi-page TIFFs use their first frame; later frames are
  never decoded.
- Only the advertised formats are decoded: JPEG (and MPO, the JPEG variant some cameras
  write), PNG, WebP, BMP, GIF, TIFF.  Whatever its extension, any other file (EPS/PostScript,
  PSD, ICO, JPEG 2000, ...) is refused as "not a supported image format" from its first
  bytes; Pillow never hands it to another decoder (EPS would go to Ghostscript).

Limits, all checked before any pixel is decoded:

- Reading: only regular files are read (a FIFO, device, socket or directory is refused from
  its ``stat``, without blocking or opening it for long; files are opened with
  ``O_NONBLOCK``), and at most :data:`DEFAULT_MAX_FILE_BYTES` (256 MiB) per file, overridable
  with the environment variable ``CONVNEXT_MAX_FILE_BYTES`` (bytes; a ``K``, ``M`` or ``G``
  suffix means KiB, MiB, GiB).
- Pixels: images over :data:`MAX_PIXELS` (178,956,970) pixels are refused from their header
  (decompression bombs).
- Memory per image: the decoded pixels may take at most :data:`DEFAULT_MAX_IMAGE_BYTES`
  (1.25 GiB: every 8-bit RGB image under the pixel limit fits), overridable with
  ``CONVNEXT_MAX_IMAGE_BYTES``.  The estimate is the decoder's
  buffer (Pillow: 4 bytes a pixel for colour images, 1 for greyscale and palette, 2 for
  16-bit greyscale; torchvision's 16-bit PNGs: 2 bytes a sample) plus the 3-byte RGB result
  (twice the decoder's buffer while a rotated image is turned upright, if that is more).
  Conversions to RGB run in strips of rows, never as full-size float or RGBA copies.  So an
  8-bit RGB photo of up to the pixel limit is decoded, a 12000 x 12000 16-bit RGBA PNG
  (1.58 GB by that estimate) is refused with a one-line record.  The resize that follows
  computes only what the centre crop keeps when its full output would be large (see
  :mod:`convnext_cli.imaging.preprocess`).
- Decoder time bombs, refused from the file's structure before Pillow parses it: a JPEG
  with more than :data:`MAX_JPEG_SCANS` (100) scans (libjpeg decodes every scan over the
  whole image, so many scans take seconds; photos have about 10);
  a PNG with more than 4,096 chunks plus one per 512 bytes of file (Pillow parses chunks in
  Python, so a million empty chunks take seconds; encoders write 8-64 KiB IDATs);
  a TIFF whose first image has more than :data:`MAX_TIFF_BLOCKS` (131,072) strips or tiles
  (Pillow builds one Python object per strip, so a million one-row strips take seconds; real
  files have a few thousand; the figures: ``benchmarks/README.md``, "Decoder time bombs").
  Only the first frame of any format is decoded.  What remains
  (e.g. a GIF with millions of extension sub-blocks, which Pillow walks one by one) is
  bounded by the file-size cap, and left to the pipeline's per-image deadline.

Pillow decodes (libjpeg-turbo for JPEG: the same pixels as torchvision's decoder, and the
same decoder transformers' pipeline uses).  torchvision's decoders are not the default on
CPU: importing torchvision pulls in torch._dynamo and costs more than Pillow's extra
milliseconds on a hundred photos (``benchmarks/README.md``, "Importing torchvision").
16-bit PNGs are the exception: only torchvision's
PNG decoder returns their full depth, so they are decoded there.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from convnext_cli.errors import ImageError, one_line
from convnext_cli.imaging.decoder_messages import pillow_words
from convnext_cli.reading import (
    MAX_IMAGE_BYTES_ENV,
    max_image_bytes,
    read_file,
)

# Pillow's own refusal threshold (2 x Image.MAX_IMAGE_PIXELS at its default), fixed here so
# a library user who changes Pillow's global does not change this tool's policy.
MAX_PIXELS = 178_956_970

MAX_JPEG_SCANS = 100
MAX_TIFF_BLOCKS = 1 << 17
PNG_BASE_CHUNKS = 4096  # plus one chunk per PNG_BYTES_PER_CHUNK bytes of file
PNG_BYTES_PER_CHUNK = 512

# Pillow format names decoded.  Pillow's JPEG opener also returns MPO images (the JPEG
# variant with extra images that some cameras write), whose first image is decoded.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
SUPPORTED_NAMES = "JPEG, PNG, WebP, BMP, GIF, TIFF"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ORIENTATION_TAG = 0x0112
# rows converted to RGB at a time: about a million pixels (public: the strip tests set it)
STRIP_PIXELS = 1 << 20


def decode_file(path: str | Path) -> torch.Tensor:
    """Read and decode one image file to a (3, H, W) uint8 tensor, or raise ImageError."""
    return decode_bytes(read_file(path))


def decode_bytes(data: bytes) -> torch.Tensor:
    """Decode encoded image bytes to a (3, H, W) uint8 RGB tensor, or raise ImageError."""
    if not data:
        raise ImageError("empty file")
    image = open_header(data)
    if _is_png16(image, data):
        io_ops = torchvision_io()
        if io_ops is not None:
            del image
            return _decode_png16(io_ops, data)
    return _decode_with_pillow(image)


def _is_png16(image: Image.Image, data: bytes) -> bool:
    return image.format == "PNG" and len(data) > 25 and data[24] == 16


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


def check_pixel_count(width: int, height: int, why: str = "") -> None:
    """Refuse an image over :data:`MAX_PIXELS` pixels, or with none."""
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"refused: {width}x{height} = {width * height} pixels is over the "
            f"{MAX_PIXELS} pixel limit{why}"
        )
    if width == 0 or height == 0:
        raise ImageError(f"image has no pixels ({width}x{height})")


def open_header(data: bytes) -> Image.Image:
    """Open lazily (header only) and refuse, before any pixel is decoded: formats we do not
    advertise, decompression bombs, images over the memory budget, JPEG scan bombs."""

    check_structure(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"refused: image too large ({one_line(exc)})") from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"cannot read the image header: {pillow_words(exc)}") from exc
    width, height = image.size
    check_pixel_count(width, height, why=" (possible decompression bomb)")
    needed = decode_bytes_needed(image, data)
    budget = max_image_bytes()
    if needed > budget:
        raise ImageError(
            f"refused: decoding this {width}x{height} {image.mode} image would take about "
            f"{needed / 1024**2:.0f} MiB, over the {budget / 1024**2:.0f} MiB per-image "
            f"budget (raise it with {MAX_IMAGE_BYTES_ENV})"
        )
    return image


def check_structure(data: bytes) -> None:
    """Refuse decoder time bombs from the file's structure (see the module docstring)."""
    if data.startswith(b"\xff\xd8\xff"):
        if count_jpeg_scans(data, MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
            raise ImageError(
                f"refused: JPEG with more than {MAX_JPEG_SCANS} scans "
                "(possible decoder time bomb; photos have about 10)"
            )
    elif data.startswith(_PNG_MAGIC):
        limit = PNG_BASE_CHUNKS + len(data) // PNG_BYTES_PER_CHUNK
        if count_png_chunks(data, limit) > limit:
            raise ImageError(
                f"refused: PNG with more than {limit} chunks for its {len(data)} bytes "
                "(possible decoder time bomb)"
            )
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        blocks = count_tiff_blocks(data)
        if blocks > MAX_TIFF_BLOCKS:
            raise ImageError(
                f"refused: TIFF with {blocks} strips or tiles, over the {MAX_TIFF_BLOCKS} "
                "limit (possible decoder time bomb)"
            )


def count_png_chunks(data: bytes, stop_after: int) -> int:
    """How many chunks a PNG has up to IEND, counting at most ``stop_after + 1``."""
    position, count, size = 8, 0, len(data)
    while position + 8 <= size and count <= stop_after:
        count += 1
        if data[position + 4 : position + 8] == b"IEND":
            break
        position += 12 + int.from_bytes(data[position : position + 4], "big")
    return count


def count_tiff_blocks(data: bytes) -> int:
    """The number of strips or tiles of a TIFF's first image (0 if its IFD is unreadable:
    Pillow then reports the file as corrupt)."""
    order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
    big = data[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte offsets and counts
    try:
        if big:
            offset = int.from_bytes(data[8:16], order)
            entries = int.from_bytes(data[offset : offset + 8], order)
            first, entry_size, count_at, count_size = offset + 8, 20, 4, 8
        else:
            offset = int.from_bytes(data[4:8], order)
            entries = int.from_bytes(data[offset : offset + 2], order)
            first, entry_size, count_at, count_size = offset + 2, 12, 4, 4
        blocks = 0
        for index in range(min(entries, 4096)):
            entry = first + index * entry_size
            tag = int.from_bytes(data[entry : entry + 2], order)
            if tag in (273, 324):  # StripOffsets, TileOffsets
                at = entry + count_at
                blocks = max(blocks, int.from_bytes(data[at : at + count_size], order))
        return blocks
    except (IndexError, ValueError):
        return 0


def _unidentified(data: bytes) -> ImageError:
    """Name the format of a file Pillow could open but we do not decode, from its magic
    bytes only (the format plugins' ``accept`` checks; no foreign decoder runs)."""

    Image.init()
    prefix = data[:16]
    for name, (_factory, accept) in Image.OPEN.items():
        if name in SUPPORTED_FORMATS or name == "MPO" or accept is None:
            continue
        try:
            if accept(prefix):
                return ImageError(
                    f"not a supported image format ({name}; decoded: {SUPPORTED_NAMES})"
                )
        except Exception:  # a plugin's check on a short prefix: not conclusive
            continue
    return ImageError("not a recognised image format")


def _pillow_bytes_per_pixel(mode: str) -> int:
    """What Pillow allocates per pixel for an image in `mode`."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def decode_bytes_needed(image: Image.Image, data: bytes) -> int:
    """About how many bytes decoding `image` (opened lazily) to RGB takes at its peak."""
    width, height = image.size
    pixels = width * height
    if _is_png16(image, data):
        channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(data[25], 4)
        return pixels * (2 * channels + 3)
    decoder = _pillow_bytes_per_pixel(image.mode)
    needed = pixels * (decoder + 3)
    if _orientation(image, data) in (5, 6, 7, 8, 2, 3, 4):  # transposed in place: two buffers
        needed = max(needed, pixels * 2 * decoder)
    return needed


def _orientation(image: Image.Image, data: bytes) -> int:
    """The EXIF orientation (1 when there is none), read without decoding any pixel.

    Pillow's ``getexif`` on a PNG whose eXIf chunk was not met before the image data
    decodes the whole image to look for one after it (and a failure there would leave a
    half-decoded image behind): the eXIf chunk is found here by walking the chunks instead.
    """
    try:
        if image.format == "PNG" and "exif" not in image.info:
            raw = png_exif_chunk(data)
            if raw is None:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = image.getexif()
        value = int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def png_exif_chunk(data: bytes) -> bytes | None:
    """The data of a PNG's eXIf chunk, wherever it is, or None (chunk lengths walked; the
    structure check has already bounded how many chunks there are)."""
    position, size = 8, len(data)
    while position + 8 <= size:
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if kind == b"eXIf":
            return data[position + 8 : position + 8 + length]
        if kind == b"IEND":
            break
        position += 12 + length
    return None


_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")  # not stuffing (00), RSTn or fill (ff)


def count_jpeg_scans(data: bytes, stop_after: int) -> int:
    """How many scans (SOS segments) the first image of a JPEG has, counting at most
    ``stop_after + 1``.  Walks the segment lengths; entropy-coded data is skipped with a
    regular-expression search for the next marker, so a 256 MiB file takes well under a second."""
    scans = 0
    position = 2  # after SOI
    size = len(data)
    while position + 4 <= size:
        if data[position] != 0xFF:
            found = _JPEG_MARKER.search(data, position)
            if found is None:
                break
            position = found.start()
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stand-alone markers
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        end = position + 2 + length
        if marker == 0xDA:
            scans += 1
            if scans > stop_after:
                break
            found = _JPEG_MARKER.search(data, end)
            if found is None:
                break
            position = found.start()
        else:
            position = end
    return scans


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
    """16-bit PNG: torchvision keeps all 16 bits, which are then scaled to 8 (v / 257, rounded),
    a strip of rows at a time (no full-size float copy)."""

    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with no_deprecation_warning():
            raw = io_ops.decode_png(
                buffer, mode=io_ops.ImageReadMode.UNCHANGED, apply_exif_orientation=True
            )
    except RuntimeError as exc:
        raise ImageError(f"cannot decode PNG: {_torchvision_reason(exc)}") from exc
    del buffer
    _, height, width = raw.shape
    out = torch.empty((height, width, 3), dtype=torch.uint8)
    rows = max(1, STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        strip = raw[:, top : top + rows].to(torch.float32)
        if raw.dtype != torch.uint8:
            strip = strip.div_(257.0).round_()
        out[top : top + rows] = _to_rgb(strip).permute(1, 2, 0)
    return out.permute(2, 0, 1)  # (3, H, W), channels-last memory


def _to_rgb(pixels: torch.Tensor) -> torch.Tensor:
    """(C, H, W) float in 0..255 with C = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA) -> RGB uint8."""

    channels = pixels.shape[0]
    if channels in (2, 4):
        color, alpha = pixels[:-1], pixels[-1:] / 255.0
        pixels = (color * alpha + 255.0 * (1.0 - alpha)).round()
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return pixels.clamp(0, 255).to(torch.uint8).contiguous()


def _decode_with_pillow(image: Image.Image) -> torch.Tensor:

    if ImageFile.LOAD_TRUNCATED_IMAGES:  # set by someone else: a truncated image is an error
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image.seek(0)  # first frame of an animation
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        rgb = rgb_array(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"cannot decode image: {pillow_words(exc)}") from exc
    # (H, W, 3) -> (3, H, W) as a view: channels-last memory, which the resize kernels prefer
    return torch.from_numpy(rgb).permute(2, 0, 1)


def rgb_array(image: Image.Image) -> np.ndarray:
    """A decoded image as an (H, W, 3) uint8 array, converted a strip of rows at a time
    (:data:`STRIP_PIXELS`): the only full-size buffers are Pillow's own and the result."""

    width, height = image.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, STRIP_PIXELS // width)
    if rows >= height:
        out[...] = np.asarray(pil_to_rgb(image))
        return out
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = np.asarray(pil_to_rgb(image.crop((0, top, width, bottom))))
    return out


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB per the decoding policy."""

    mode = image.mode
    if mode == "RGB":
        image.load()
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) greyscale: value / 257, rounded, clipped to 0..255.

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
