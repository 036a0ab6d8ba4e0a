"""The decoding policy: orientation, modes, transparency, 16-bit, animations, bombs, bad files."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bomb_png, composite_over_white, png_bytes
from PIL import Image, ImageOps

from convnext_cli.errors import ImageError
from convnext_cli.imaging.decoding import MAX_PIXELS, decode_bytes, decode_file


def as_array(tensor: torch.Tensor) -> np.ndarray:
    assert tensor.dtype == torch.uint8 and tensor.ndim == 3 and tensor.shape[0] == 3
    return tensor.permute(1, 2, 0).numpy()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo(photos: list[Path]) -> Image.Image:
    return Image.open(photos[-1]).convert("RGB")  # rocket.jpg, 640x427


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_applied(photo: Image.Image, orientation: int, fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo.resize((64, 40)), fmt, exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = as_array(decode_bytes(data))
    if orientation >= 5:
        assert got.shape[:2] == (64, 40)  # rotated by 90 degrees
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("L", "JPEG"),
        ("L", "PNG"),
        ("P", "PNG"),
        ("CMYK", "JPEG"),
        ("1", "PNG"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("RGB", "TIFF"),
        ("P", "GIF"),
        ("YCbCr", "JPEG"),
    ],
)
def test_modes_convert_to_rgb(photo: Image.Image, mode: str, fmt: str) -> None:
    source = photo.resize((80, 60)).convert(mode)
    data = encode(source, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(as_array(decode_bytes(data)), expected)


def test_transparency_composited_over_white() -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(20, 30, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent row: white
    rgba[1, :, 3] = 255  # opaque row: unchanged
    got = as_array(decode_bytes(encode(Image.fromarray(rgba, "RGBA"), "PNG"))).astype(int)
    assert (got[0] == 255).all()
    np.testing.assert_array_equal(got[1], rgba[1, :, :3])
    np.testing.assert_allclose(got, composite_over_white(rgba), atol=1)


def test_grey_alpha_and_palette_transparency() -> None:
    la = np.zeros((10, 10, 2), dtype=np.uint8)
    la[..., 0] = 40
    la[:5, :, 1] = 0
    la[5:, :, 1] = 255
    got = as_array(decode_bytes(encode(Image.fromarray(la, "LA"), "PNG")))
    assert (got[:5] == 255).all() and (got[5:] == 40).all()

    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.paste(0, (0, 0, 5, 10))
    got = as_array(decode_bytes(encode(palette, "GIF", transparency=0)))
    assert (got[:, :5] == 255).all()
    np.testing.assert_array_equal(got[:, 5:], np.broadcast_to([200, 10, 10], (10, 5, 3)))


@pytest.mark.parametrize("color_type,channels", [(0, 1), (2, 3), (4, 2), (6, 4)])
def test_sixteen_bit_png_scaled_by_257(color_type: int, channels: int) -> None:
    rng = np.random.default_rng(color_type)
    values = rng.integers(0, 65536, size=(12, 9, channels)).astype(np.uint16)
    values[0, 0] = 65535
    values[0, 1] = 128  # 128 / 257 = 0.498 -> 0; 129 / 257 = 0.502 -> 1
    values[0, 2] = 129
    got = as_array(decode_bytes(png_bytes(values, color_type))).astype(int)
    scaled = np.rint(values.astype(np.float64) / 257.0)
    if channels in (2, 4):
        scaled = composite_over_white(
            np.concatenate([scaled[..., :-1], scaled[..., -1:]], -1)
            if channels == 4
            else np.concatenate([scaled[..., :1].repeat(3, -1), scaled[..., 1:]], -1)
        )
    elif channels == 1:
        scaled = scaled.repeat(3, -1)
    np.testing.assert_allclose(got, scaled, atol=1 if channels in (2, 4) else 0)
    if channels == 1:
        assert got[0, 1, 0] == 0 and got[0, 2, 0] == 1 and got[0, 0, 0] == 255


def test_sixteen_bit_tiff_greyscale() -> None:
    values = np.array([[0, 128, 129, 65535], [257, 514, 30000, 1000]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "TIFF")
    got = as_array(decode_bytes(data))[..., 0].astype(int)
    np.testing.assert_array_equal(got, np.rint(values / 257.0))


def test_animation_uses_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    for fmt, kwargs in (("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})):
        buffer = io.BytesIO()
        frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], **kwargs)
        got = as_array(decode_bytes(buffer.getvalue()))
        assert tuple(got[8, 8]) == (255, 0, 0), fmt


def test_decompression_bomb_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(40_000, 40_000))
    start = time.perf_counter()
    with pytest.raises(ImageError, match="refused"):
        decode_file(path)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ImageError, match="refused"):
        decode_bytes(bomb_png(MAX_PIXELS + 1, 1))
    with pytest.raises(ImageError) as info:  # at the limit: allowed, then fails on the data
        decode_bytes(bomb_png(MAX_PIXELS, 1))
    assert "refused" not in str(info.value)


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "empty file"),
        (b"hello, not an image\n", "not a recognised image format"),
        ("truncated-jpeg", "truncated"),
        ("truncated-png", "truncated"),
    ],
)
def test_broken_files_raise_one_line_errors(
    tmp_path: Path, photos: list[Path], content: object, reason: str
) -> None:
    if content == "truncated-jpeg":
        data = photos[-1].read_bytes()
        content = data[: len(data) // 2]
    elif content == "truncated-png":
        data = photos[0].read_bytes()
        content = data[: len(data) // 2]
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match=reason) as info:
        decode_file(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        decode_file(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        decode_file(tmp_path)


def test_jpeg_fast_path_equals_pillow(photos: list[Path]) -> None:
    for photo in photos:
        expected = np.asarray(ImageOps.exif_transpose(Image.open(photo)).convert("RGB"))
        np.testing.assert_array_equal(as_array(decode_file(photo)), expected)
