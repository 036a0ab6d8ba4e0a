"""Inputs that are not regular image files: nothing blocks, nothing reads without end, and
each gets exactly one record (named explicitly) or a record/warning (met in a folder).

End to end through the CLI in a subprocess with a timeout, as they fail in the field.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import assert_records_close
from PIL import Image

from convnext_cli import reading as image_files
from convnext_cli.errors import ImageError, UsageError
from convnext_cli.imaging.decoding import decode_bytes
from convnext_cli.inputs.expand import expand_inputs
from convnext_cli.reading import read_file

REPO = Path(__file__).resolve().parents[2]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def classify(
    *args: str, checkpoint: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    run = subprocess.run(
        [sys.executable, "-m", "convnext_cli", "classify", *args]
        + ["-m", str(checkpoint), "--format", "jsonl", "--device", "cpu", "-k", "1"],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in run.stderr, run.stderr
    return run, [json.loads(line) for line in run.stdout.splitlines()]


@pytest.fixture
def good(tmp_path: Path, photos: list[Path]) -> Path:
    path = tmp_path / "good.png"
    path.write_bytes(photos[0].read_bytes())
    return path


def make_hostile(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """Create one hostile input named like an image."""
    path = tmp_path / f"{kind}.jpg"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "fifo-with-silent-writer":
        os.mkfifo(path)
        # a writer that holds the pipe open and never writes: a blocking read waits forever
        writer = threading.Thread(target=lambda: open(path, "wb").close(), daemon=True)
        writer.start()
        request.addfinalizer(lambda: _unblock_fifo(path))
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.listen(1)
        request.addfinalizer(server.close)
    elif kind == "directory":
        path.mkdir()
        (path / "notes.txt").write_text("no image in here")
    elif kind == "symlink-loop":
        path.symlink_to(path.name)
    elif kind == "dangling-symlink":
        path.symlink_to(tmp_path / "nowhere.jpg")
    elif kind == "unreadable":
        Image.new("RGB", (8, 8)).save(path, "JPEG")
        path.chmod(0)
    elif kind == "too-big":
        Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(path, "PNG")
    return path


def _unblock_fifo(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


KINDS = {
    "fifo": "named pipe",
    "fifo-with-silent-writer": "named pipe",
    "dev-zero": "character device",
    "socket": "socket",
    "directory": "directory",
    "symlink-loop": "symlink loop",
    "dangling-symlink": "broken symlink",
    "unreadable": "Permission denied",
    "too-big": "over the 1000-byte limit",
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_named_explicitly_gets_one_error_record(
    kind: str,
    tmp_path: Path,
    good: Path,
    v1_checkpoint: Path,
    request: pytest.FixtureRequest,
) -> None:
    if kind == "unreadable" and IS_ROOT:
        pytest.skip("root reads files whatever their permissions")
    hostile = make_hostile(kind, tmp_path, request)
    env = {image_files.MAX_FILE_BYTES_ENV: "1000"} if kind == "too-big" else None
    run, records = classify(str(hostile), str(good), checkpoint=v1_checkpoint, env=env)
    assert [r["path"] for r in records] == [str(hostile), str(good)]
    assert KINDS[kind] in records[0]["error"]
    assert "\n" not in records[0]["error"]
    assert "predictions" in records[1] if kind != "too-big" else "error" in records[1]
    assert run.returncode == 1


def test_folder_listing_same_with_and_without_recursion(
    tmp_path: Path, v1_checkpoint: Path, photos: list[Path], request: pytest.FixtureRequest
) -> None:
    """Entries named like images that are not regular files get error records, with or
    without -r; a folder named like an image is a folder (a warning without -r)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.png").write_bytes(photos[0].read_bytes())
    hostile = ["fifo", "dev-zero", "socket", "symlink-loop", "dangling-symlink"]
    for kind in hostile:
        make_hostile(kind, folder, request)
    (folder / "album.jpg").mkdir()
    (folder / "album.jpg" / "inner.png").write_bytes(photos[1].read_bytes())
    (folder / "notes.txt").write_text("not an image")

    flat, flat_records = classify(str(folder), checkpoint=v1_checkpoint)
    expected = sorted([f"{k}.jpg" for k in hostile] + ["ok.png"])
    assert [Path(r["path"]).name for r in flat_records] == expected
    assert sum("error" in r for r in flat_records) == len(hostile)
    assert flat.returncode == 1
    assert "album.jpg" in flat.stderr and "not descended" in flat.stderr

    deep, deep_records = classify(str(folder), "-r", checkpoint=v1_checkpoint)
    # inner.png joins a batch with -r: scores may change in their last float32 digits
    assert_records_close([r for r in deep_records if "inner.png" not in r["path"]], flat_records)
    assert [Path(r["path"]).name for r in deep_records if "inner" in r["path"]] == ["inner.png"]
    assert deep.returncode == 1


@pytest.mark.skipif(IS_ROOT, reason="root lists folders whatever their permissions")
def test_unreadable_sub_folder_is_a_warning(
    tmp_path: Path, v1_checkpoint: Path, photos: list[Path]
) -> None:
    folder = tmp_path / "photos"
    (folder / "locked").mkdir(parents=True)
    (folder / "locked" / "x.png").write_bytes(photos[0].read_bytes())
    (folder / "ok.png").write_bytes(photos[0].read_bytes())
    (folder / "locked").chmod(0)
    try:
        run, records = classify(str(folder), "-r", checkpoint=v1_checkpoint)
    finally:
        (folder / "locked").chmod(0o755)
    assert [Path(r["path"]).name for r in records] == ["ok.png"]
    assert "locked" in run.stderr and "cannot list" in run.stderr
    assert run.returncode == 0


def test_unreadable_sub_folder_warning_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same policy, simulated (root can read anything): a warning, the rest listed."""
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "x.png").write_bytes(b"x")
    (tmp_path / "ok.png").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path: str | os.PathLike[str] = ".") -> object:
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    warnings: list[str] = []
    assert expand_inputs([str(tmp_path)], recursive=True, warn=warnings.append) == [
        str(tmp_path / "ok.png")
    ]
    assert any("locked" in w and "Permission denied" in w for w in warnings)


def test_unreadable_file_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(b"\xff\xd8\xff")
    real_open = os.open

    def deny(name: object, *args: object, **kwargs: object) -> int:
        if str(name) == str(path):
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ImageError, match="cannot read file: Permission denied"):
        read_file(path)


def test_read_cap_and_its_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"\x00" * 5000)
    assert image_files.max_file_bytes() == 256 * 1024**2
    monkeypatch.setenv(image_files.MAX_FILE_BYTES_ENV, "4K")
    assert image_files.max_file_bytes() == 4096
    with pytest.raises(ImageError, match="over the 4096-byte limit"):
        read_file(path)
    monkeypatch.setenv(image_files.MAX_FILE_BYTES_ENV, "5000")
    assert len(read_file(path)) == 5000
    monkeypatch.setenv(image_files.MAX_FILE_BYTES_ENV, "lots")
    with pytest.raises(UsageError, match="CONVNEXT_MAX_FILE_BYTES"):
        image_files.check_limits()
    with pytest.raises(ImageError, match="CONVNEXT_MAX_FILE_BYTES"):
        read_file(path)


def test_proc_files_and_growing_files_are_read_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("no /proc")
    assert os.stat(status).st_size == 0 and b"VmRSS" in read_file(status)
    monkeypatch.setenv(image_files.MAX_FILE_BYTES_ENV, "64")
    with pytest.raises(ImageError, match="over the 64-byte limit"):
        read_file(status)


def test_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    """No writer: a blocking open or read would wait forever; refused from its stat."""
    path = tmp_path / "feed.jpg"
    os.mkfifo(path)
    with pytest.raises(ImageError, match="named pipe"):
        read_file(path)


# -- only the advertised formats (item 6) ---------------------------------------------------

EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)


def pillow_encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (16, 16), (10, 200, 30, 255)).convert(
        "RGBA" if fmt in ("ICO", "QOI", "DDS") else "RGB"
    ).save(buffer, fmt)
    return buffer.getvalue()


OTHER_FORMATS = ["ICO", "PPM", "TGA", "PCX", "SGI", "QOI", "DDS", "JPEG2000"]


def test_eps_is_refused_and_never_reaches_ghostscript(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import EpsImagePlugin

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the EPS plugin must not run")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", forbidden)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", forbidden)
    with pytest.raises(ImageError, match="not a supported image format") as info:
        decode_bytes(EPS)
    assert "EPS" in str(info.value)


@pytest.mark.parametrize("fmt", OTHER_FORMATS)
def test_other_pillow_formats_are_refused(fmt: str) -> None:
    from PIL import features

    if fmt == "JPEG2000" and not features.check_codec("jpg_2000"):
        pytest.skip("Pillow built without OpenJPEG")
    Image.init()
    if fmt not in Image.SAVE:
        pytest.skip(f"this Pillow cannot write {fmt}")
    data = pillow_encoded(fmt)
    Image.open(io.BytesIO(data)).load()  # Pillow itself reads it
    with pytest.raises(ImageError, match="not a (supported|recognised) image format"):
        decode_bytes(data)


def test_unsupported_format_through_the_cli(
    tmp_path: Path, good: Path, v1_checkpoint: Path
) -> None:
    eps = tmp_path / "drawing.jpg"  # the extension lies
    eps.write_bytes(EPS)
    ico = tmp_path / "icon.png"
    ico.write_bytes(pillow_encoded("ICO"))
    run, records = classify(str(eps), str(ico), str(good), checkpoint=v1_checkpoint)
    assert [r["path"] for r in records] == [str(eps), str(ico), str(good)]
    assert "not a supported image format" in records[0]["error"]
    assert "not a supported image format" in records[1]["error"]
    assert "predictions" in records[2]
    assert run.returncode == 1


def test_advertised_formats_still_decode() -> None:
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 8), (10, 200, 30)).save(buffer, fmt)
        assert tuple(decode_bytes(buffer.getvalue()).shape) == (3, 8, 16), fmt
