"""The Python API: one path is one input; PIL images, NumPy arrays and uint8 tensors are
inputs beside paths, decoded by the same policy and preprocessed the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import convnext_cli
from convnext_cli import ImageModel, Job, load_model
from convnext_cli.engine.job import Plan, Report
from convnext_cli.errors import EXIT_USAGE, UsageError
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
    with pytest.raises(UsageError, match="not int"):
        model.classify(5)
    with pytest.raises(UsageError, match="input 1: .* not dict"):
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


# ------------------------------------------------- the API's arguments (issue 29, item 10)


def test_one_path_in_any_form_is_one_input(
    model: ImageModel, v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    """str, bytes and Path are one input each, never one per character or byte; bytes are
    decoded as the file system does (os.fsdecode), in run(), Job and ImageModel alike."""
    odd = b"/p/\xff cat.bmp"  # not UTF-8: kept whole, as an escape
    cases: list[tuple[Any, list[str]]] = [
        (b"/p/cat.bmp", ["/p/cat.bmp"]),
        ("/p/cat.bmp", ["/p/cat.bmp"]),
        (Path("/p/cat.bmp"), ["/p/cat.bmp"]),
        ([b"/p/cat.bmp", Path("/q")], ["/p/cat.bmp", "/q"]),
        (odd, [os.fsdecode(odd)]),
        ((p for p in ["/a", "/b"]), ["/a", "/b"]),
    ]
    for given, expected in cases:
        job = Job("classify", given, "m", None, None)
        assert job.inputs == expected, given
    assert os.fsencode(Job("classify", cast(Any, odd), "m", None, None).inputs[0]) == odd
    output = tmp_path / "one.jsonl"
    options: dict[str, Any] = {"model": v1_checkpoint, "device": "cpu", "workers": 0}
    for given in (os.fsencode(photos[0]), str(photos[0]), [os.fsencode(photos[0])]):
        assert convnext_cli.run("classify", given, output=output, quiet=True, **options) == 0
        records = [json.loads(line) for line in output.read_text().splitlines()]
        assert [r["path"] for r in records] == [str(photos[0])], given
    (result,) = model.classify(os.fsencode(photos[0]), top_k=1)
    assert result.path == str(photos[0]) and result.error is None


BAD_RUN_ARGUMENTS = [
    {"top_k": 2.5},
    {"top_k": float("nan")},
    {"top_k": True},
    {"top_k": -1},
    {"top_k": 100_001},
    {"top_k": "three"},
    {"shard": 3},
    {"shard": "4/4"},
    {"shard": (0, 4)},
    {"batch_size": 2.5},
    {"batch_size": True},
    {"batch_size": 0},
    {"workers": -1},
    {"replicas": 0},
    {"device": 5},
    {"dtype": "float8"},
    {"decode": "fast"},
    {"scores": "odds"},
    {"pool": "max"},
    {"engine": "spark"},
    {"resume": "no"},
    {"quiet": 1},
    {"recursive": None},
    {"output": 5},
    {"labels": 3.0},
    {"fmt": 4},
    {"stages": [1]},
    {"model": 7},
    {"no_such_option": 1},
]


@pytest.mark.parametrize("bad", BAD_RUN_ARGUMENTS, ids=lambda bad: repr(bad)[1:-1])
def test_run_refuses_bad_arguments_before_anything_runs(
    bad: dict[str, Any], photos: list[Path], tmp_path: Path
) -> None:
    """Each is a UsageError (exit code 2), raised before a file is opened or written
    (top_k=nan used to land in .run.json)."""
    output = tmp_path / "x.jsonl"
    arguments: dict[str, Any] = {"output": output, "device": "cpu", **bad}
    with pytest.raises(UsageError) as raised:
        convnext_cli.run("classify", photos[0], **arguments)
    assert raised.value.exit_code == EXIT_USAGE
    assert "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("inputs", [5, None, [5], ["x", 2.0], {"a": 1}])
def test_inputs_that_are_not_paths_are_usage_errors(inputs: Any) -> None:
    with pytest.raises(UsageError, match="inputs"):
        convnext_cli.run("classify", inputs, model="m")
    with pytest.raises(UsageError, match="inputs"):
        Job("classify", inputs, "m", None, None)


def test_the_cli_and_the_api_share_the_top_k_check() -> None:
    """``-k`` goes through limits.parse_top_k, as ``top_k=`` does."""
    from helpers import invoke

    for text in ("2.5", "nan", "-1", "100001", "x"):
        out = invoke("classify", "x.jpg", "-k", text)
        assert out.exit_code == EXIT_USAGE, out.output
        text = " ".join(line.strip("│╭╰─ ") for line in out.output.splitlines())
        assert "not a number from 1 to 100000, or all" in text, out.output
    one: Any = "x"
    assert Job("classify", one, "m", None, None, top_k=cast(Any, "all")).top_k == 0
    assert Job("classify", one, "m", None, None, top_k=cast(Any, np.int64(3))).top_k == 3
    assert Job("classify", one, "m", None, None, shard="1/4").shard == "1/4"


def test_image_model_arguments(v1_checkpoint: Path, photos: list[Path]) -> None:
    """None for device, dtype and decode is auto; bad types and ranges are UsageErrors
    before the checkpoint is read; classify's top_k and embed's normalize are checked."""
    auto = ImageModel(v1_checkpoint, device=None, dtype=None, decode=None, workers=0)
    (result,) = auto.classify(photos[0], top_k="all")
    assert len(result.predictions) == 1000
    bad_model: list[dict[str, Any]] = [
        {"model": 5},
        {"device": 0},
        {"dtype": "float8"},
        {"decode": "fast"},
        {"batch_size": 0},
        {"batch_size": 2.5},
        {"workers": -1},
        {"workers": True},
        {"compile": "yes"},
        {"revision": 1},
        {"cache_dir": 1},
        {"labels": 2},
    ]
    for bad in bad_model:
        arguments = {"model": v1_checkpoint, **bad}
        with pytest.raises(UsageError):
            ImageModel(**arguments)
    bad_top_k: list[Any] = [2.5, float("nan"), True, -1, None]
    for top_k in bad_top_k:
        with pytest.raises(UsageError, match="--top-k"):
            auto.classify(photos[0], top_k=top_k)
    with pytest.raises(UsageError, match="normalize"):
        auto.embed(photos[0], normalize=cast(Any, "yes"))
    net = load_model(str(v1_checkpoint), device=None)
    assert next(net.parameters()).dtype == torch.float32
    with pytest.raises(UsageError):
        load_model(cast(Any, 5))
    with pytest.raises(UsageError, match="dtype"):
        load_model(str(v1_checkpoint), dtype=torch.int8)


BROADCAST = r"""
import resource, sys
import numpy as np
import torch
from convnext_cli.api import as_inputs

side = int(sys.argv[1])
images = [
    np.broadcast_to(np.uint8(7), (side, side, 3)),
    np.broadcast_to(np.uint8(7), (2, side, side, 3)),  # a batch of two
    torch.zeros(1, 1, 1, dtype=torch.uint8).expand(3, side, side),
]
for image in images:
    for item in as_inputs(image):
        print(item.error)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_a_broadcast_image_is_refused_before_any_copy() -> None:
    """A 30000x30000x3 view of one byte (np.broadcast_to, Tensor.expand) is over the pixel
    limit: refused from its shape, the process's peak memory that of a 300x300 image (a
    copy would be 2.7 GB)."""

    def peak(side: int) -> tuple[list[str], float]:
        done = subprocess.run(
            [sys.executable, "-c", BROADCAST, str(side)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        *errors, rss = done.stdout.splitlines()
        return errors, float(rss)

    small_errors, small_peak = peak(300)
    assert small_errors == ["None"] * 4
    errors, big_peak = peak(30000)
    assert len(errors) == 4 and all("pixel limit" in e for e in errors), errors
    assert big_peak < small_peak + 256 * 1024**2, (big_peak, small_peak)
