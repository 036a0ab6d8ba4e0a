"""JPEG decoding on the model's device, exercised on the CPU (torchvision's libjpeg-turbo
decoder takes nvjpeg's place), against the Pillow path that matches transformers."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint
from convnext_cli.cli import app
from convnext_cli.engine import decode_pool
from convnext_cli.engine.pipeline import Runner
from convnext_cli.errors import ImageError, UsageError
from convnext_cli.imaging import gpu_jpeg
from convnext_cli.imaging.decoding import decode_file, torchvision_io

pytestmark = pytest.mark.skipif(torchvision_io() is None, reason="torchvision has no decoders")

CPU = torch.device("cpu")


def jpeg(image: Image.Image, orientation: int = 1, **kwargs) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(buffer, format="JPEG", quality=92, exif=exif.tobytes(), **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo(photos: list[Path]) -> Image.Image:
    """A non-square photo, so that every orientation gives a distinct result."""
    image = Image.open(photos[2]).convert("RGB")
    return image.crop((0, 0, image.width, image.height * 2 // 3))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_matches_pillow_exif_transpose(
    photo: Image.Image, orientation: int, tmp_path: Path
) -> None:
    path = tmp_path / f"o{orientation}.jpg"
    path.write_bytes(jpeg(photo, orientation))
    encoded = gpu_jpeg.device_decodable(path.read_bytes())
    assert encoded is not None and encoded.orientation == orientation
    (ours,) = gpu_jpeg.decode([encoded], CPU)
    expected = decode_file(path)  # Pillow: exif_transpose, convert("RGB")
    assert ours is not None and ours.shape == expected.shape
    assert torch.equal(ours, expected)


def test_which_files_go_to_the_device(photo: Image.Image) -> None:
    data = jpeg(photo)
    assert gpu_jpeg.device_decodable(data) == gpu_jpeg.EncodedJpeg(data, 1)
    grey = jpeg(photo.convert("L"))
    assert gpu_jpeg.device_decodable(grey) is not None
    png = io.BytesIO()
    photo.save(png, format="PNG")
    assert gpu_jpeg.device_decodable(png.getvalue()) is None
    cmyk = io.BytesIO()
    photo.convert("CMYK").save(cmyk, format="JPEG")
    assert gpu_jpeg.device_decodable(cmyk.getvalue()) is None
    # truncated: the CPU path decodes it and reports the error
    assert gpu_jpeg.device_decodable(data[: len(data) // 2]) is None


def test_a_bomb_is_refused_from_the_header_before_the_device() -> None:
    big = jpeg(Image.new("L", (16, 16)))
    # patch the SOF0 frame size to 20000 x 20000 (4e8 pixels), keeping the bytes valid JPEG
    sof = big.index(b"\xff\xc0")
    patched = big[: sof + 5] + (20000).to_bytes(2, "big") * 2 + big[sof + 9 :]
    with pytest.raises(ImageError, match="^refused: image too large"):
        gpu_jpeg.device_decodable(patched)


def test_resolve_decode() -> None:
    assert gpu_jpeg.resolve_decode("auto", CPU) is False
    assert gpu_jpeg.resolve_decode("cpu", CPU) is False
    assert gpu_jpeg.resolve_decode("CPU", torch.device("cuda")) is False
    # auto is exact: CPU decoding on every device, unless the user asks for gpu
    assert gpu_jpeg.resolve_decode("auto", torch.device("cuda")) is False
    with pytest.raises(UsageError, match="needs a CUDA device"):
        gpu_jpeg.resolve_decode("gpu", CPU)
    with pytest.raises(UsageError, match="unknown --decode"):
        gpu_jpeg.resolve_decode("nvjpeg", CPU)


def test_the_probe_decodes_a_tiny_jpeg() -> None:
    assert gpu_jpeg.probe(CPU) is None  # torchvision's CPU decoder stands in for nvjpeg


def test_a_failing_device_decoder_falls_back_to_cpu_decoding_with_one_note(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = torchvision_io()

    class Broken:
        ImageReadMode = real.ImageReadMode

        @staticmethod
        def decode_jpeg(data, mode, device):
            raise RuntimeError("nvjpeg: library not initialised\n(status 5)")

    monkeypatch.setattr(gpu_jpeg, "torchvision_io", lambda: Broken)
    notes: list[str] = []
    assert gpu_jpeg.resolve_decode("gpu", torch.device("cuda"), notes.append) is False
    assert notes == [
        "--decode gpu: the device JPEG decoder failed a test image (nvjpeg: library not "
        "initialised (status 5)); decoding JPEGs on the CPU instead"
    ]
    monkeypatch.setattr(gpu_jpeg, "torchvision_io", lambda: None)
    notes.clear()
    assert gpu_jpeg.resolve_decode("gpu", torch.device("cuda"), notes.append) is False
    assert notes == [
        "--decode gpu: torchvision's JPEG decoder is absent; decoding JPEGs on the CPU instead"
    ]
    monkeypatch.setattr(gpu_jpeg, "torchvision_io", lambda: real)
    monkeypatch.setattr(gpu_jpeg, "probe", lambda device: None)
    assert gpu_jpeg.resolve_decode("gpu", torch.device("cuda"), notes.append) is True


def test_cli_refuses_gpu_decoding_without_cuda(v1_checkpoint: Path, photos: list[Path]) -> None:
    result = CliRunner().invoke(
        app, ["classify", str(photos[0]), "-m", str(v1_checkpoint), "--device", "cpu",
              "--decode", "gpu"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--decode gpu needs a CUDA device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> list[Path]:
    """JPEGs the device takes (several orientations, grey), ones it leaves to the CPU (CMYK,
    truncated), other formats and broken files, in one run."""
    folder = tmp_path_factory.mktemp("mixed-jpegs")
    files: dict[str, bytes] = {}
    for n, path in enumerate(photos):
        image = Image.open(path).convert("RGB")
        files[f"{n}-photo.jpg"] = jpeg(image, orientation=(1, 6, 3, 8, 1, 1)[n % 6])
    image = Image.open(photos[0]).convert("RGB")
    files["grey.jpg"] = jpeg(image.convert("L"))
    cmyk = io.BytesIO()
    image.convert("CMYK").save(cmyk, format="JPEG", quality=92)
    files["cmyk.jpg"] = cmyk.getvalue()
    files["truncated.jpg"] = files["0-photo.jpg"][:2000]
    files["empty.jpg"] = b""
    files["text.jpg"] = b"not an image at all"
    files["copy.png"] = photos[2].read_bytes()
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def run(runner: Runner, paths: list[Path], workers: int) -> list:
    return [
        r for batch in runner.classify([str(p) for p in paths], top_k=3, batch_size=4,
                                       workers=workers)
        for r in batch
    ]  # fmt: skip


@pytest.mark.parametrize("workers", [0, 1])
def test_device_path_matches_the_cpu_path(
    v1_checkpoint: Path, mixed_folder: list[Path], workers: int
) -> None:
    checkpoint = load_checkpoint(str(v1_checkpoint))
    model = build_model(checkpoint, CPU, torch.float32)
    plain = Runner(model, checkpoint.preprocess, CPU, torch.float32)
    device = Runner(model, checkpoint.preprocess, CPU, torch.float32, jpeg_on_device=True)
    expected = run(plain, mixed_folder, 0)
    got = run(device, mixed_folder, workers)
    assert [r.path for r in got] == [str(p) for p in mixed_folder]
    assert [r.error for r in got] == [r.error for r in expected]
    assert sum(r.error is None for r in got) == len(mixed_folder) - 3  # truncated, empty, text
    for a, b in zip(got, expected, strict=True):
        assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
        # the device path resizes a batch at once (float matmuls): a grey level off here and
        # there, so the scores agree to float tolerance, not bit for bit
        for p, q in zip(a.predictions, b.predictions, strict=True):
            assert p.score == pytest.approx(q.score, abs=1e-4)


def test_rejected_by_the_device_decoder_falls_back_to_the_cpu(
    v1_checkpoint: Path,
    mixed_folder: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A batch the device decoder fails is retried image by image; the images it still
    rejects go to a decode worker (Pillow there), so nothing is
    lost and the results are the same."""
    real = torchvision_io()
    rejected = mixed_folder[1].read_bytes()
    calls = []

    class Flaky:
        ImageReadMode = real.ImageReadMode

        @staticmethod
        def decode_jpeg(data, mode, device):
            calls.append(type(data).__name__)
            if isinstance(data, list) or bytes(data.numpy()) == rejected:
                raise RuntimeError("nvjpeg: unsupported")
            return real.decode_jpeg(data, mode=mode, device=device)

    checkpoint = load_checkpoint(str(v1_checkpoint))
    model = build_model(checkpoint, CPU, torch.float32)
    expected = run(Runner(model, checkpoint.preprocess, CPU, torch.float32), mixed_folder, 0)
    monkeypatch.setattr(gpu_jpeg, "torchvision_io", lambda: Flaky)
    # where the rejected JPEG is decoded again: a decode worker, not this process
    where = tmp_path / "decoded-in"
    real_decode_one = decode_pool.decode_one

    def decode_one(ref, spec, jpeg_on_device):
        with open(where, "a") as f:
            f.write(f"{os.getpid()} {ref}\n")
        return real_decode_one(ref, spec, jpeg_on_device)

    monkeypatch.setattr(decode_pool, "decode_one", decode_one)
    runner = Runner(model, checkpoint.preprocess, CPU, torch.float32, jpeg_on_device=True)
    got = run(runner, mixed_folder, 0)
    assert "list" in calls and "Tensor" in calls
    (line,) = where.read_text().splitlines()
    pid, ref = line.split(" ", 1)
    assert int(pid) != os.getpid() and ref == str(mixed_folder[1])
    assert [r.error for r in got] == [r.error for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert [p.index for p in a.predictions] == [p.index for p in b.predictions]


def test_benchmark_reports_the_decoder(v1_checkpoint: Path, photos: list[Path]) -> None:
    result = CliRunner().invoke(
        app,
        ["benchmark", "-m", str(v1_checkpoint), "--device", "cpu", "--dtype", "float32",
         "-b", "2", "--iters", "1", "--warmup", "0", "--images", str(photos[0].parent),
         "--format", "json", "--decode", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["header"]["decode"] == "cpu"
    assert {r["mode"] for r in report["rows"]} >= {"end-to-end"}
