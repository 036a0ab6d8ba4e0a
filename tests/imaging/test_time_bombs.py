"""Decoder time bombs are refused from the file's structure, before any decoder runs.

Each bomb is built here and checked to be a file the decoder accepts (a smaller dose
decodes), then refused within a generous timeout, through the CLI for the JPEG one.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import run_with_peak
from PIL import Image

from convnext_cli.errors import ImageError
from convnext_cli.imaging import decoding as images
from convnext_cli.imaging.decoding import decode_bytes

REPO = Path(__file__).resolve().parents[2]


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG; a scan's end includes its data."""
    position, out = 2, []
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xD9:
            out.append((marker, position, position + 2))
            break
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        out.append((marker, position, end))
        position = end
    return out


def many_scans_jpeg(extra_scans: int, side: int = 4000) -> bytes:
    """A flat progressive JPEG whose last (tiny) scan is repeated `extra_scans` times: libjpeg
    decodes every scan over the whole image, so time grows with scans x pixels, not bytes
    (4000x4000 with 2,000 extra scans: 150 KB, 20 s in Pillow before this check)."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (128, 90, 40)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    _, start, end = [s for s in jpeg_segments(data) if s[0] == 0xDA][-1]
    return data[:end] + data[start:end] * extra_scans + data[end:]


def test_scan_counter_counts_real_scans() -> None:
    data = many_scans_jpeg(0, side=64)
    scans = sum(1 for m, _, _ in jpeg_segments(data) if m == 0xDA)
    assert scans >= 6  # libjpeg's progressive script
    assert images.count_jpeg_scans(data, 1000) == scans
    assert images.count_jpeg_scans(many_scans_jpeg(40, side=64), 1000) == scans + 40


def test_a_few_repeated_scans_still_decode() -> None:
    """The construction yields a JPEG libjpeg decodes (so the bomb below is a real one)."""
    data = many_scans_jpeg(20, side=256)
    pixels = decode_bytes(data)
    assert tuple(pixels.shape) == (3, 256, 256)
    np.testing.assert_array_equal(
        pixels.permute(1, 2, 0).numpy(), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    )


def test_progressive_photo_is_not_refused(photos: list[Path]) -> None:
    photo = Image.open(photos[-1]).convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", progressive=True, quality=95)
    data = buffer.getvalue()
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode_bytes(data).permute(1, 2, 0).numpy(), expected)


def test_many_scans_refused_in_process() -> None:
    with pytest.raises(ImageError, match="more than 100 scans"):
        decode_bytes(many_scans_jpeg(images.MAX_JPEG_SCANS, side=64))
    from convnext_cli.imaging.gpu_jpeg import device_decodable

    with pytest.raises(ImageError, match="scans"):  # the device path reads the same header
        device_decodable(many_scans_jpeg(images.MAX_JPEG_SCANS, side=64))


def test_many_scans_jpeg_gets_an_error_record_through_the_cli(
    tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    """10,000 scans of a 4000x4000 image: minutes of libjpeg work, refused at once."""
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(many_scans_jpeg(10_000))
    good = photos[0]
    run = run_with_peak(
        "classify", bomb, good, "-m", v1_checkpoint, "--format", "jsonl", "--device", "cpu",
        timeout=90, cwd=REPO,
    )  # fmt: skip
    records = run.records()
    assert [r["path"] for r in records] == [str(bomb), str(good)]
    assert "scans" in records[0]["error"] and "predictions" in records[1]
    assert run.code == 1
    assert "Traceback" not in run.stderr


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_with_chunks(empty_chunks: int, idat_size: int | None = None) -> bytes:
    width = height = 64
    raw = b"".join(b"\x00" + bytes(width * 3) for _ in range(height))
    compressed = zlib.compress(raw)
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if idat_size:
        idats = b"".join(
            png_chunk(b"IDAT", compressed[i : i + idat_size])
            for i in range(0, len(compressed), idat_size)
        )
    else:
        idats = png_chunk(b"IDAT", compressed)
    junk = png_chunk(b"abCd", b"") * empty_chunks
    return b"\x89PNG\r\n\x1a\n" + header + junk + idats + png_chunk(b"IEND", b"")


def test_png_with_a_million_chunks_refused_quickly() -> None:
    """A million empty ancillary chunks (12 MB) cost Pillow 4 s of Python; refused here."""
    assert tuple(decode_bytes(png_with_chunks(1000)).shape) == (3, 64, 64)  # a real PNG
    assert tuple(decode_bytes(png_with_chunks(0, idat_size=1)).shape) == (3, 64, 64)
    data = png_with_chunks(1_000_000)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="chunks"):
        decode_bytes(data)
    assert time.perf_counter() - start < 10  # generous: the refusal walks ~30k headers


def tiff_with_strips(strips: int) -> bytes:
    """An uncompressed 1 x `strips` greyscale TIFF with one row per strip."""
    first_offset = 8
    data_at = first_offset + 8 * strips
    offsets = np.arange(data_at, data_at + strips, dtype="<u4").tobytes()
    counts = np.ones(strips, dtype="<u4").tobytes()
    ifd_at = data_at + strips
    entries = [
        (256, 4, 1, 1),
        (257, 4, 1, strips),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, strips, first_offset),
        (277, 3, 1, 1),
        (278, 4, 1, 1),
        (279, 4, strips, first_offset + 4 * strips),
    ]
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHII", *entry) for entry in entries) + struct.pack("<I", 0)
    pixels = bytes(i % 251 for i in range(strips))
    return b"II*\x00" + struct.pack("<I", ifd_at) + offsets + counts + pixels + ifd


def test_tiff_with_a_million_strips_refused_quickly() -> None:
    """Pillow builds a Python tile per strip: a million one-row strips take 9 s."""
    small = tiff_with_strips(1000)
    got = decode_bytes(small)
    assert tuple(got.shape) == (3, 1000, 1)
    assert images.count_tiff_blocks(small) == 1000
    start = time.perf_counter()
    with pytest.raises(ImageError, match="strips or tiles"):
        decode_bytes(tiff_with_strips(1_000_000))
    assert time.perf_counter() - start < 10


def test_later_frames_are_never_decoded() -> None:
    """An animation whose second frame is garbage decodes: only the first frame is read."""
    frames = [Image.new("RGB", (32, 32), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    broken = data[:-6] + b"\xff" * 64  # the second frame's data and the trailer: garbage
    with pytest.raises((OSError, EOFError, ValueError, SyntaxError)):
        animation = Image.open(io.BytesIO(broken))
        animation.seek(1)
        animation.load()
    got = decode_bytes(broken)
    assert tuple(got[:, 16, 16].tolist()) == (255, 0, 0)
