"""A member or image that cannot be read exactly gets an error record, never a prediction:
GNU and PAX sparse tar members (their stored bytes are not the file's), PNGs whose zlib
stream breaks in the middle of IDAT or is cut short.  EXIF orientation is read without
decoding the image (a late eXIf chunk included), so nothing is decoded before the budget."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

CLI = [sys.executable, "-m", "convnext_cli"]


def classify(checkpoint: Path, *inputs: object) -> tuple[int, list[dict], str]:
    start = time.monotonic()
    out = subprocess.run(
        [*CLI, "classify", *map(str, inputs), "-m", checkpoint, "-k", "3", "--format", "jsonl"],
        capture_output=True,
        timeout=300,
    )
    assert time.monotonic() - start < 120
    err = out.stderr.decode()
    assert "Traceback" not in err, err
    return out.returncode, [json.loads(line) for line in out.stdout.splitlines()], err


# ------------------------------------------------------------------------------ PNG


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, position = [], 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        chunks.append(
            (data[position + 4 : position + 8], data[position + 8 : position + 8 + length])
        )
        position += 12 + length
    return chunks


def build_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        out.append(len(body).to_bytes(4, "big") + kind + body + crc)  # CRCs right: only zlib fails
    return b"".join(out)


def noisy_png() -> tuple[bytes, list[tuple[bytes, bytes]], bytes, int]:
    """A 256x256 noisy RGB PNG: (bytes, its chunks but IDAT, the zlib stream, raw size)."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((256, 256, 3)) * 64).astype(np.uint8) * 4
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
    chunks = png_chunks(data)
    stream = b"".join(body for kind, body in chunks if kind == b"IDAT")
    return data, chunks, stream, 256 * (1 + 256 * 3)


def breaks_early(stream: bytes, raw_size: int) -> bool:
    """Whether inflating ``stream`` fails before it gives all the image's rows."""
    inflate, produced = zlib.decompressobj(), 0
    try:
        for start in range(0, len(stream), 256):
            produced += len(inflate.decompress(stream[start : start + 256]))
    except zlib.error:
        return produced < raw_size
    return False


def corrupt_middle(chunks: list, stream: bytes, raw_size: int) -> bytes:
    for shift in range(0, 4000, 97):
        at = len(stream) // 2 + shift
        broken = stream[:at] + bytes(b ^ 0xFF for b in stream[at : at + 16]) + stream[at + 16 :]
        if breaks_early(broken, raw_size):
            return replace_idat(chunks, broken)
    raise AssertionError("no corruption broke the zlib stream")


def replace_idat(chunks: list, stream: bytes) -> bytes:
    head = [c for c in chunks if c[0] not in (b"IDAT", b"IEND")]
    return build_png([*head, (b"IDAT", stream), (b"IEND", b"")])


@pytest.fixture(scope="module")
def broken_pngs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("broken_png")
    good, chunks, stream, raw_size = noisy_png()
    made = {
        "good.png": good,
        "corrupt_idat.png": corrupt_middle(chunks, stream, raw_size),
        "truncated_idat.png": replace_idat(chunks, stream[: len(stream) // 2]),
        "cut_file.png": good[: len(good) // 2],
    }
    for name, data in made.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in made}


@pytest.mark.parametrize("name", ["corrupt_idat.png", "truncated_idat.png", "cut_file.png"])
def test_a_broken_png_is_an_error_record(
    name: str, broken_pngs: dict[str, Path], v1_checkpoint: Path
) -> None:
    code, records, _ = classify(v1_checkpoint, broken_pngs[name], broken_pngs["good.png"])
    assert code == 1
    assert len(records) == 2
    assert "error" in records[0] and "predictions" not in records[0], records[0]
    assert "predictions" in records[1]


def test_a_broken_png_is_an_error_even_with_load_truncated_images(
    broken_pngs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import ImageFile

    from convnext_cli.errors import ImageError
    from convnext_cli.imaging.decoding import decode_bytes

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for name in ("corrupt_idat.png", "truncated_idat.png"):
        with pytest.raises(ImageError):
            decode_bytes(broken_pngs[name].read_bytes())


def test_orientation_is_read_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A late eXIf chunk (after IDAT) still turns the image; finding it decodes nothing, so
    the budget is checked before any pixel is."""
    from PIL import PngImagePlugin

    from convnext_cli.imaging.decoding import decode_bytes, open_header

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: 90 degrees clockwise to show
    _good, chunks, stream, _raw = noisy_png()
    head = [c for c in chunks if c[0] not in (b"IDAT", b"IEND")]
    wide = Image.new("RGB", (40, 20), (200, 10, 10))
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    wide_chunks = png_chunks(buffer.getvalue())
    late = build_png(
        [
            *[c for c in wide_chunks if c[0] != b"IEND"],
            (b"eXIf", exif.tobytes()),
            (b"IEND", b""),
        ]
    )
    loads: list[str] = []
    original = PngImagePlugin.PngImageFile.load

    def counting_load(self: Any) -> Any:
        loads.append("load")
        return original(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counting_load)
    open_header(late)
    open_header(build_png([*head, (b"IDAT", stream), (b"IEND", b"")]))
    assert loads == []  # the header only
    assert tuple(decode_bytes(late).shape) == (3, 40, 20)  # turned: 20 wide, 40 high


# ------------------------------------------------------------------------------ sparse tar


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def pax_sparse_member(name: str, data: bytes, version: str) -> bytes:
    """A PAX sparse member (format 0.0, 0.1 or 1.0) of ``data`` followed by a 64 KiB hole,
    written as GNU tar writes one."""
    real = len(data) + 65536
    if version == "0.0":
        records = [("GNU.sparse.size", str(real)), ("GNU.sparse.numblocks", "1")]
        records += [("GNU.sparse.offset", "0"), ("GNU.sparse.numbytes", str(len(data)))]
        stored, member_name = data, name
    elif version == "0.1":
        records = [("GNU.sparse.size", str(real)), ("GNU.sparse.numblocks", "1")]
        records += [("GNU.sparse.map", f"0,{len(data)}")]
        stored, member_name = data, name
    else:
        records = [("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0")]
        records += [("GNU.sparse.name", name), ("GNU.sparse.realsize", str(real))]
        sparse_map = f"1\n0\n{len(data)}\n".encode()
        sparse_map += b"\0" * (-len(sparse_map) % 512)
        stored, member_name = sparse_map + data, f"GNUSparseFile.0/{name}"
    body = b"".join(pax_record(k, v) for k, v in records)
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = len(body)
    out = header.tobuf(format=tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512)
    info = tarfile.TarInfo(member_name)
    info.size = len(stored)
    out += info.tobuf(format=tarfile.USTAR_FORMAT) + stored + b"\0" * (-len(stored) % 512)
    return out


def plain_member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


@pytest.mark.parametrize("version", ["0.0", "0.1", "1.0"])
def test_pax_sparse_members_are_error_records(
    version: str, photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    png = photos[0].read_bytes()
    shard = tmp_path / "sparse.tar"
    shard.write_bytes(
        pax_sparse_member("a.png", png, version) + plain_member("b.png", png) + b"\0" * 1024
    )
    with tarfile.open(shard) as archive:  # what tarfile itself reads there
        assert any(m.sparse is not None for m in archive.getmembers()), version
    code, records, _ = classify(v1_checkpoint, shard)
    assert code == 1
    assert [r["path"] for r in records] == [f"{shard}#a.png", f"{shard}#b.png"]
    assert "sparse" in records[0]["error"] and "predictions" not in records[0]
    assert "predictions" in records[1]


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar")
def test_gnu_sparse_members_are_error_records(
    photos: list[Path], v1_checkpoint: Path, tmp_path: Path
) -> None:
    version = subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout
    if "GNU tar" not in version:
        pytest.skip("not GNU tar")
    folder = tmp_path / "files"
    folder.mkdir()
    png = photos[0].read_bytes()
    with open(folder / "a.png", "wb") as handle:  # the image, then a 1 MiB hole
        handle.write(png)
        handle.truncate(len(png) + (1 << 20))
    (folder / "b.png").write_bytes(png)
    shard = tmp_path / "gnu.tar"
    for fmt, name in (("gnu", "gnu.tar"), ("posix", "pax.tar")):
        shard = tmp_path / name
        subprocess.run(
            ["tar", f"--format={fmt}", "--sparse", "-cf", str(shard), "a.png", "b.png"],
            cwd=folder,
            check=True,
        )
        code, records, _ = classify(v1_checkpoint, shard)
        assert code == 1, fmt
        assert len(records) == 2, records
        assert "sparse" in records[0].get("error", ""), (fmt, records[0])
        assert "predictions" in records[1]
    assert os.path.getsize(folder / "a.png") == len(png) + (1 << 20)


# ------------------------------------------------------------------------------ HTML report


def test_the_report_embeds_the_rows_own_image_never_a_file_an_id_names(
    v1_checkpoint: Path, tmp_path: Path
) -> None:
    """A Parquet id holding a local path: the page shows the row's bytes, not that file."""
    import base64
    import re

    import pyarrow as pa
    import pyarrow.parquet as pq

    def solid(color: tuple[int, int, int]) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
        return buffer.getvalue()

    secret = tmp_path / "home" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(solid((255, 0, 0)))  # red: must never be shown
    secret_text = tmp_path / "home" / "secret.txt"
    secret_text.write_text("TOP-SECRET-CONTENT-1234")
    data = tmp_path / "rows.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [str(secret), str(secret_text), f"{tmp_path}/shard.tar#x.png"],
                "image": [solid((0, 0, 255))] * 3,  # blue: each row's own image
            }
        ),
        data,
    )
    page_path = tmp_path / "report.html"
    start = time.monotonic()
    out = subprocess.run(
        [*CLI, "classify", str(data), "-m", str(v1_checkpoint), "-o", str(page_path)],
        capture_output=True,
        timeout=300,
    )
    assert time.monotonic() - start < 120
    assert out.returncode == 0, out.stderr.decode()
    assert "Traceback" not in out.stderr.decode()
    page = page_path.read_text()
    assert "TOP-SECRET-CONTENT-1234" not in page
    uris = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", page)
    assert len(uris) == 3  # each row's own bytes, thumbnailed
    for uri in uris:
        thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB"))
        red, _green, blue = thumb.reshape(-1, 3).mean(axis=0)
        assert blue > 200 and red < 50, (red, blue)
