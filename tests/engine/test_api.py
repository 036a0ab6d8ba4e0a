"""The Python API: one path is one input; PIL images, NumPy arrays and uint8 tensors are
inputs beside paths, decoded by the same policy and preprocessed the same way."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from convnext_cli import ImageModel
from convnext_cli.engine.job import Plan, Report
from convnext_cli.results import Result


@pytest.fixture(scope="module")
def model(v1_checkpoint: Path) -> ImageModel:
    return ImageModel(str(v1_checkpoint), device="cpu", dtype="float32", workers=0)


def scores(result) -> list[tuple[int, float]]:
    assert result.error is None, result.error
    return [(p.index, p.score) for p in result.predictions]


def same(a, b) -> None:
    got, expected = scores(a), scores(b)
    assert [i for i, _ in got] == [i for i, _ in expected]
    for (_, s), (_, t) in zip(got, expected, strict=True):
        assert s == pytest.approx(t, abs=1e-6)


def test_one_string_is_one_input(model: ImageModel, photos: list[Path]) -> None:
    for one in (str(photos[0]), photos[0]):
        results = model.classify(one, top_k=3)
        assert [r.path for r in results] == [str(photos[0])]
        assert len(results[0].predictions) == 3
        embedded = model.embed(one)
        assert len(embedded) == 1 and embedded[0].path == str(photos[0])
    # a list of one string is the same thing; a missing file is one error record
    assert [r.path for r in model.classify([str(photos[1])])] == [str(photos[1])]
    (missing,) = model.classify("no-such-file.jpg")
    assert missing.path == "no-such-file.jpg" and missing.error


def test_pil_image_gives_the_same_probabilities_as_its_path(
    model: ImageModel, photos: list[Path]
) -> None:
    for photo in photos:
        with Image.open(photo) as image:
            (from_pil,) = model.classify(image)
        (from_path,) = model.classify(str(photo))
        assert from_pil.path == "<image 0>"
        same(from_pil, from_path)


def test_arrays_and_tensors_match_the_same_photo_as_a_path(
    model: ImageModel, photos: list[Path]
) -> None:
    photo = photos[-1]
    rgb = np.asarray(ImageOps.exif_transpose(Image.open(photo)).convert("RGB"))
    (expected,) = model.classify(str(photo))
    tensor = torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    results = model.classify([rgb, tensor, str(photo), Image.fromarray(rgb)])
    assert [r.path for r in results] == ["<image 0>", "<image 1>", str(photo), "<image 3>"]
    for result in results:
        same(result, expected)
    # a 4-D array is a batch of images
    batch = model.classify(np.stack([rgb, rgb]))
    assert [r.path for r in batch] == ["<image 0>", "<image 1>"]
    same(batch[1], expected)


def test_grey_and_alpha_follow_the_decoding_policy(
    model: ImageModel, photos: list[Path], tmp_path: Path
) -> None:
    """HxW grey and HxWx4 RGBA arrays give what the same pixels saved as PNG files give
    (grey to RGB, alpha composited over white)."""
    image = Image.open(photos[0]).convert("RGB").resize((96, 64))
    grey = image.convert("L")
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba).copy()
    alpha[:, :48, 3] = 40  # half the image mostly transparent
    rgba = Image.fromarray(alpha, "RGBA")
    grey.save(tmp_path / "grey.png")
    rgba.save(tmp_path / "rgba.png")
    got = model.classify([np.asarray(grey), np.asarray(grey)[:, :, None], alpha, rgba])
    files = model.classify([tmp_path / "grey.png", tmp_path / "rgba.png"])
    same(got[0], files[0])
    same(got[1], files[0])
    same(got[2], files[1])
    same(got[3], files[1])
    grey_tensor = torch.from_numpy(np.asarray(grey).copy())
    same(model.classify(grey_tensor)[0], files[0])
    same(model.classify(grey_tensor[None])[0], files[0])


def test_unusable_arrays_get_error_records_and_other_objects_raise(
    model: ImageModel, photos: list[Path]
) -> None:
    results = model.classify(
        [np.zeros((8, 8, 3), np.float32), torch.zeros(5, 8, 8, dtype=torch.uint8), photos[0]]
    )
    assert len(results) == 3
    assert results[0].path == "<image 0>" and "unsupported array" in (results[0].error or "")
    assert results[1].path == "<image 1>" and "unsupported tensor" in (results[1].error or "")
    assert results[2].error is None
    with pytest.raises(TypeError, match="not int"):
        model.classify(5)
    with pytest.raises(TypeError, match="input 1: .* not dict"):
        model.classify([photos[0], {}])


def test_in_memory_images_with_decode_workers(v1_checkpoint: Path, photos: list[Path]) -> None:
    """In-memory images are resized in the main process, files in the workers; the order
    and the numbers stay the same."""
    model = ImageModel(str(v1_checkpoint), device="cpu", dtype="float32", batch_size=2, workers=2)
    inputs = [Image.open(p) if n % 2 else str(p) for n, p in enumerate(photos)]
    got = model.classify(inputs)
    expected = model.classify([str(p) for p in photos])
    assert [r.path for r in got] == [
        f"<image {n}>" if n % 2 else str(p) for n, p in enumerate(photos)
    ]
    for a, b in zip(got, expected, strict=True):
        same(a, b)


class Counting(Report):
    """The library's report, noting which inputs a run computed."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.computed: list[str] = []

    def track(self, batches: Iterable[list[Result]], plan: Plan) -> int:
        def counted() -> Iterator[list[Result]]:
            for results in batches:
                self.computed.extend(r.path for r in results)
                yield results

        return super().track(counted(), plan)


def test_run_resumable_job_to_a_file(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    """convnext_cli.run is what the CLI runs: 3 photos to x.jsonl, then --resume on 5
    computes only the 2 not done yet; 5 records, one per photo, the first 3 kept as written."""
    import convnext_cli

    output = tmp_path / "x.jsonl"
    options: dict[str, Any] = {
        "model": v1_checkpoint,
        "device": "cpu",
        "dtype": "float32",
        "workers": 0,
    }
    first = [str(p) for p in photos[:3]]
    assert convnext_cli.run("classify", first, output=output, top_k=3, **options) == 0
    before = output.read_bytes()
    assert len(before.splitlines()) == 3
    every = [str(p) for p in photos[:5]]
    report = Counting()
    code = convnext_cli.run(
        "classify", every, output=str(output), resume=True, top_k=3, report=report, **options
    )
    assert code == 0
    assert sorted(report.computed) == every[3:]  # only the inputs not done yet
    assert output.read_bytes().startswith(before)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["path"] for r in records) == sorted(every)
    assert all(len(r["predictions"]) == 3 for r in records)


def test_classifier_is_the_earlier_name_of_image_model(
    model: ImageModel, photos: list[Path]
) -> None:
    """Code written against ``Classifier`` keeps working: the same class, exported lazily."""
    import convnext_cli
    from convnext_cli import Classifier

    assert Classifier is ImageModel is convnext_cli.ImageModel
    assert {"Classifier", "ImageModel"} <= set(convnext_cli.__all__)
    assert isinstance(model, Classifier)
    (result,) = Classifier.classify(model, str(photos[0]), top_k=2)
    assert len(result.predictions) == 2


def test_import_is_light_until_image_model_is_used() -> None:
    code = (
        "import sys, convnext_cli\n"
        "assert 'torch' not in sys.modules\n"
        "convnext_cli.ImageModel, convnext_cli.Classifier\n"
        "assert 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("size", [0, -1, 4097])
def test_a_batch_size_outside_the_clis_range_is_a_usage_error(size: int) -> None:
    """The Python API's jobs take -b's range (limits.MAX_BATCH_SIZE), not a looser one."""
    from convnext_cli.engine.task import Task
    from convnext_cli.errors import UsageError

    with pytest.raises(UsageError, match="--batch-size"):
        Task("classify", batch_size=size)
    assert Task("classify", batch_size=4096).batch_size == 4096
