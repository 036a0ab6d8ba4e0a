"""CUDA paths: run where a GPU is present, skipped elsewhere (float16 checks run on CPU too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from convnext_cli.cli import app

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def classify(
    checkpoint: Path, photos: list[Path], device: str, dtype: str, *extra: str
) -> list[dict]:
    result = CliRunner().invoke(
        app,
        [
            "classify",
            *map(str, photos),
            "-m",
            str(checkpoint),
            "--device",
            device,
            "--dtype",
            dtype,
            "-k",
            "5",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize(
    "dtype,tolerance", [("float32", 2e-3), ("float16", 2e-2), ("bfloat16", 5e-2)]
)
def test_cuda_matches_cpu(
    v2_checkpoint: Path, photos: list[Path], dtype: str, tolerance: float
) -> None:
    cpu = classify(v2_checkpoint, photos, "cpu", "float32")
    gpu = classify(v2_checkpoint, photos, "cuda", dtype)
    for a, b in zip(cpu, gpu, strict=True):
        scores = {p["index"]: p["score"] for p in b["predictions"]}
        for p in a["predictions"][:3]:
            assert abs(scores.get(p["index"], 0.0) - p["score"]) <= tolerance


def test_cuda_benchmark(v1_checkpoint: Path, photos: list[Path]) -> None:
    result = CliRunner().invoke(
        app,
        [
            "benchmark",
            "-m",
            str(v1_checkpoint),
            "--device",
            "cuda",
            "-b",
            "1,4",
            "--dtype",
            "float32,float16",
            "--iters",
            "3",
            "--images",
            str(photos[0].parent),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert all(r["memory_kind"] == "cuda max allocated" and r["images_per_s"] > 0 for r in rows)
    # per-batch latency from CUDA events; the device's used memory covers what torch allocated
    assert {r["latency_clock"] for r in rows if r["mode"] != "end-to-end"} == {"cuda events"}
    assert all(r["device_peak_mb"] >= r["peak_memory_mb"] for r in rows)


def test_gpu_jpeg_decoding_matches_pillow(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    """nvjpeg's pixels may differ from libjpeg-turbo's by a grey level: the probabilities
    must still agree within the product's tolerance, top-1 included, for every JPEG kind
    the device takes (upright, EXIF-rotated, greyscale) and the ones it hands back."""
    from PIL import Image

    inputs = []
    for n, photo in enumerate(photos):
        image = Image.open(photo).convert("RGB")
        exif = Image.Exif()
        exif[0x0112] = (1, 6, 3, 8, 1, 1)[n % 6]
        path = tmp_path / f"{n}.jpg"
        image.save(path, format="JPEG", quality=92, exif=exif.tobytes())
        inputs.append(path)
    grey = tmp_path / "grey.jpg"
    Image.open(photos[0]).convert("L").save(grey, format="JPEG")
    cmyk = tmp_path / "cmyk.jpg"
    Image.open(photos[0]).convert("CMYK").save(cmyk, format="JPEG")
    inputs += [grey, cmyk, photos[2]]

    by_cpu = classify(v1_checkpoint, inputs, "cuda", "float32", "--decode", "cpu")
    by_gpu = classify(v1_checkpoint, inputs, "cuda", "float32", "--decode", "gpu")
    for a, b in zip(by_cpu, by_gpu, strict=True):
        assert a["path"] == b["path"]
        assert a["predictions"][0]["index"] == b["predictions"][0]["index"], a["path"]
        scores = {p["index"]: p["score"] for p in b["predictions"]}
        for p in a["predictions"][:3]:
            assert abs(scores.get(p["index"], 0.0) - p["score"]) <= 2e-3, a["path"]


def test_cuda_overlapped_batches_match_cpu(v1_checkpoint: Path, photos: list[Path]) -> None:
    """Several batches through the side-stream copy and the one-batch-behind readback, and
    the embeddings too: float32 on CUDA (TF32 off) equals the CPU within float rounding."""
    cpu = classify(v1_checkpoint, photos, "cpu", "float32", "-b", "2")
    gpu = classify(v1_checkpoint, photos, "cuda", "float32", "-b", "2")
    assert [r["path"] for r in gpu] == [r["path"] for r in cpu]
    for a, b in zip(cpu, gpu, strict=True):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]


def test_cuda_auto_dtype_is_native(v1_checkpoint: Path, photos: list[Path]) -> None:
    from convnext_cli.engine.device import resolve

    placement = resolve("cuda", "auto")
    major, _ = torch.cuda.get_device_capability()
    assert placement.dtype == (torch.bfloat16 if major >= 8 else torch.float16)
    assert torch.backends.cudnn.benchmark is True


def test_cuda_results_are_unpinned_padded_and_timed_on_the_device(
    v1_checkpoint: Path, photos: list[Path]
) -> None:
    """On CUDA: every batch is padded to the run's shape (the last, short one too), the
    embeddings kept by the results hold no pinned memory, and the model time is the
    device's (events), positive and below the run's wall clock."""
    import time

    from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint
    from convnext_cli.engine.pipeline import Runner

    checkpoint = load_checkpoint(str(v1_checkpoint))
    cuda = torch.device("cuda")
    runner = Runner(build_model(checkpoint, cuda, torch.float32), checkpoint.preprocess, cuda,
                    torch.float32)  # fmt: skip
    seen: list[int] = []
    embed_fn = runner.embed_fn

    def counted(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape[0])
        return embed_fn(batch)

    runner.embed_fn = counted
    paths = ([str(p) for p in photos] * 3)[:9]  # batches of 4, 4 and 1
    start = time.perf_counter()
    results = [r for batch in runner.embed(paths, batch_size=4, workers=0) for r in batch]
    wall = time.perf_counter() - start
    assert len(results) == len(paths) and set(seen) == {4}
    for result in results:
        assert result.embedding is not None and not result.embedding.is_pinned()
    assert 0 < runner.times.model < wall
