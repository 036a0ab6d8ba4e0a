"""``--decode gpu`` off the main thread, tested on the CPU (torchvision's libjpeg-turbo decoder
stands in for nvjpeg): the batched resize against the per-image one, records against the CPU
decoding path on photos and hard JPEGs, the decode thread (where it runs, how it stops, how
its errors surface), rejects sent to one small decode pool, and the stream/event hand-over
(with fake CUDA streams and events)."""

from __future__ import annotations

import dataclasses
import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint
from convnext_cli.engine import decode_pool
from convnext_cli.engine.gpu import device_decode
from convnext_cli.engine.gpu.device_decode import DeviceBatch, DeviceDecoder, in_thread
from convnext_cli.engine.pipeline import DecodedBatch, Runner
from convnext_cli.errors import DeviceFailure
from convnext_cli.imaging import gpu_jpeg
from convnext_cli.imaging import resize as resize_kernels
from convnext_cli.imaging.decoding import decode_file, torchvision_io
from convnext_cli.imaging.gpu_jpeg import EncodedJpeg
from convnext_cli.imaging.preprocess import PreprocessSpec

pytestmark = pytest.mark.skipif(torchvision_io() is None, reason="torchvision has no decoders")

CPU = torch.device("cpu")
THREAD = "convnext-device-decode"


def jpeg(image: Image.Image, orientation: int = 1, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(buffer, format="JPEG", quality=kwargs.pop("quality", 90), exif=exif.tobytes(),
               **kwargs)  # fmt: skip
    return buffer.getvalue()


# --- the batched resize -------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(photos: list[Path]) -> list[torch.Tensor]:
    """Decoded photos in many sizes: the photos, EXIF-rotated (transposed) and flipped ones,
    odd sizes, small ones that are upscaled, extreme aspect ratios."""
    decoded = [decode_file(p) for p in photos]
    out = list(decoded)
    out += [
        gpu_jpeg.upright(image, o) for image, o in zip(decoded, (5, 6, 7, 8, 2, 3), strict=False)
    ]
    first = decoded[0]
    out += [first[:, :37, :53], first[:, 101:250, 3:202], first[:, :255, :257]]
    out += [first[:, :3, :], first[:, :, :4], first[:, :2, :300]]  # extreme aspect ratios
    out += [decoded[2][:, ::2, ::3].contiguous()]
    return out


SPECS = {
    "bicubic-224": PreprocessSpec.imagenet(224, 0.875, 3),
    "bilinear-224": PreprocessSpec.imagenet(224, 0.875, 2),
    "bicubic-odd": PreprocessSpec.imagenet(97, 0.9, 3),
    "bicubic-384-warp": PreprocessSpec.imagenet(384, 1.0, 3),
    "bilinear-crop": dataclasses.replace(
        PreprocessSpec.imagenet(160, 0.8, 2), do_center_crop=True, crop_size=(150, 131)
    ),
}


def _differences(spec: PreprocessSpec, images: list[torch.Tensor]) -> list[tuple[bool, int]]:
    """(whether the resize stretches an axis, the largest difference) per image, between
    the batched resize and the per-image one."""
    batch = spec.resize_and_crop_batch(images)
    assert batch is not None and batch.dtype == torch.uint8
    out = []
    for n, image in enumerate(images):
        one = spec.resize_and_crop(image)
        assert batch[n].shape == one.shape
        height, width = spec.resize_size(*image.shape[-2:])
        stretched = height > image.shape[-2] or width > image.shape[-1]
        out.append((stretched, int((batch[n].int() - one.int()).abs().max())))
    return out


@pytest.mark.parametrize("name", SPECS)
def test_the_batched_resize_is_the_per_image_float_resize_within_a_grey_level(
    name: str, images: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA both resize in float (no uint8 kernels there): forced here on the CPU."""
    monkeypatch.setattr(resize_kernels, "uint8_kernel", lambda resample, device: False)
    # the windowed path (past the pixel limit) rounds between its passes: keep it out
    monkeypatch.setattr(resize_kernels, "RESIZE_PIXEL_LIMIT", 1 << 40)
    assert max(worst for _, worst in _differences(SPECS[name], images)) <= 1


@pytest.mark.parametrize("name", SPECS)
def test_the_batched_resize_on_the_cpu_follows_the_uint8_kernels(
    name: str, images: list[torch.Tensor]
) -> None:
    """On the CPU, rounding between passes as torch's uint8 kernels (and Pillow) do: a grey
    level off where their fixed-point weights round otherwise, two where an axis is
    stretched or the aspect ratio changes (the 384 warp: coarser fixed-point weights there;
    torch's uint8 kernel is itself further from Pillow's in those cases)."""
    for stretched, worst in _differences(SPECS[name], images):
        assert worst <= (2 if stretched or "warp" in name else 1)


def test_the_batched_resize_is_chunked_under_its_memory_budget(
    images: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = SPECS["bicubic-224"]
    sizes = [spec.resize_size(*image.shape[-2:]) for image in images]
    whole = resize_kernels.resize_crop_batch(images, sizes, 3, (224, 224))
    chunks = []
    real = resize_kernels.resize_chunk

    def chunk(part: list[torch.Tensor], *args: Any) -> torch.Tensor:
        chunks.append(len(part))
        return real(part, *args)

    monkeypatch.setattr(resize_kernels, "resize_chunk", chunk)
    small = resize_kernels.resize_crop_batch(images, sizes, 3, (224, 224), budget=8 << 20)
    assert len(chunks) > 1 and sum(chunks) == len(images)
    assert torch.equal(whole, small)  # chunks sorted by size, put back in order


def test_filters_and_specs_the_batched_resize_leaves_to_the_per_image_path(
    images: list[torch.Tensor],
) -> None:
    for resample in (0, 1, 4, 5):  # nearest, lanczos, box, hamming
        assert PreprocessSpec.imagenet(224, 0.875, resample).resize_and_crop_batch(images) is None
    no_resize = dataclasses.replace(SPECS["bicubic-224"], do_resize=False)
    assert no_resize.resize_and_crop_batch(images) is None


# --- runs: the device path against the CPU path -------------------------------------------


@pytest.fixture(scope="module")
def hard_jpegs(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> list[Path]:
    """Progressive, 4:4:4, 4:2:2, grey, CMYK, EXIF orientations 2-8, corrupt and truncated
    JPEGs, between photos."""
    folder = tmp_path_factory.mktemp("hard-jpegs")
    image = Image.open(photos[2]).convert("RGB")
    files: dict[str, bytes] = {
        "progressive.jpg": jpeg(image, progressive=True),
        "444.jpg": jpeg(image, subsampling=0),
        "422.jpg": jpeg(image, subsampling=1),
        "grey.jpg": jpeg(image.convert("L")),
    }
    cmyk = io.BytesIO()
    image.convert("CMYK").save(cmyk, format="JPEG", quality=90)
    files["cmyk.jpg"] = cmyk.getvalue()
    for orientation in range(2, 9):
        files[f"exif{orientation}.jpg"] = jpeg(image, orientation)
    good = files["444.jpg"]
    middle = len(good) // 2
    files["corrupt.jpg"] = (
        good[:middle] + bytes(b ^ 0x5A for b in good[middle : middle + 64]) + (good[middle + 64 :])
    )
    files["truncated.jpg"] = good[: len(good) // 3]
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return [*paths, *photos]


@pytest.fixture(scope="module")
def model_parts(v1_checkpoint: Path) -> tuple[Any, PreprocessSpec]:
    checkpoint = load_checkpoint(str(v1_checkpoint))
    return build_model(checkpoint, CPU, torch.float32), checkpoint.preprocess


def classify(runner: Runner, paths: list[Path], workers: int = 0, batch: int = 4) -> list:
    return [
        r for got in runner.classify([str(p) for p in paths], top_k=5, batch_size=batch,
                                     workers=workers)
        for r in got
    ]  # fmt: skip


def assert_same_records(got: list, want: list) -> None:
    assert [r.path for r in got] == [r.path for r in want]
    assert [r.error for r in got] == [r.error for r in want]
    for a, b in zip(got, want, strict=True):
        assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
        for p, q in zip(a.predictions, b.predictions, strict=True):
            assert p.score == pytest.approx(q.score, abs=1e-4)


@pytest.mark.parametrize("workers", [0, 2])
def test_records_equal_the_cpu_decoding_path(
    model_parts: tuple[Any, PreprocessSpec], hard_jpegs: list[Path], workers: int
) -> None:
    model, spec = model_parts
    want = classify(Runner(model, spec, CPU, torch.float32), hard_jpegs)
    got = classify(Runner(model, spec, CPU, torch.float32, jpeg_on_device=True), hard_jpegs,
                   workers)  # fmt: skip
    assert len(got) == len(hard_jpegs)
    assert_same_records(got, want)
    assert next(r for r in got if r.path.endswith("truncated.jpg")).error is not None
    assert not [t for t in threading.enumerate() if t.name == THREAD]


def test_a_spec_without_resizing_groups_by_shape(
    model_parts: tuple[Any, PreprocessSpec], photos: list[Path]
) -> None:
    model, spec = model_parts
    spec = dataclasses.replace(spec, do_resize=False)
    want = classify(Runner(model, spec, CPU, torch.float32), photos)
    got = classify(Runner(model, spec, CPU, torch.float32, jpeg_on_device=True), photos)
    assert_same_records(got, want)


def test_decoding_runs_in_the_thread_and_resizes_once_per_batch(
    model_parts: tuple[Any, PreprocessSpec], photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, spec = model_parts
    jpegs = [p for p in photos if p.suffix == ".jpg"] * 4  # 8 JPEGs: 2 batches of 4
    decoders: list[int] = []
    resizes: list[tuple[int, int]] = []
    per_image: list[int] = []
    real_decode = gpu_jpeg.decode
    real_batch = PreprocessSpec.resize_and_crop_batch
    real_one = PreprocessSpec.resize_and_crop

    def decode(encoded: list[EncodedJpeg], device: torch.device) -> list:
        decoders.append(threading.get_ident())
        return real_decode(encoded, device)

    def batched(self: PreprocessSpec, images: list[torch.Tensor]) -> torch.Tensor | None:
        resizes.append((threading.get_ident(), len(images)))
        return real_batch(self, images)

    def one(self: PreprocessSpec, image: torch.Tensor) -> torch.Tensor:
        per_image.append(threading.get_ident())
        return real_one(self, image)

    monkeypatch.setattr(gpu_jpeg, "decode", decode)
    monkeypatch.setattr(PreprocessSpec, "resize_and_crop_batch", batched)
    monkeypatch.setattr(PreprocessSpec, "resize_and_crop", one)
    runner = Runner(model, spec, CPU, torch.float32, jpeg_on_device=True)
    got = classify(runner, jpegs)
    assert len(got) == 8 and all(r.error is None for r in got)
    main = threading.get_ident()
    assert len(decoders) == 2 and main not in decoders
    assert [count for _, count in resizes] == [4, 4]  # one batched call per batch
    assert {ident for ident, _ in resizes} == set(decoders)
    assert not set(per_image) & set(decoders)  # never image by image in the thread


def test_rejects_go_to_one_small_pool_for_the_run(
    model_parts: tuple[Any, PreprocessSpec],
    photos: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A device decoder that rejects everything: every record is still right, decoded by
    the pool's worker processes (never this one), and 5 batches start 1 pool, not 5."""
    model, spec = model_parts
    jpegs = [p for p in photos if p.suffix == ".jpg"] * 10  # 20 inputs: 5 batches of 4
    want = classify(Runner(model, spec, CPU, torch.float32), jpegs)
    real = torchvision_io()

    class Rejecting:
        ImageReadMode = real.ImageReadMode

        @staticmethod
        def decode_jpeg(data: Any, mode: Any, device: Any) -> Any:
            raise RuntimeError("nvjpeg: unsupported")

    where = tmp_path / "decoded-in"
    real_decode_one = decode_pool.decode_one

    def decode_one(ref: Any, spec: PreprocessSpec, jpeg_on_device: bool) -> Any:
        with open(where, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real_decode_one(ref, spec, jpeg_on_device)

    monkeypatch.setattr(gpu_jpeg, "torchvision_io", lambda: Rejecting)
    monkeypatch.setattr(decode_pool, "decode_one", decode_one)
    runner = Runner(model, spec, CPU, torch.float32, jpeg_on_device=True)
    got = classify(runner, jpegs)
    assert_same_records(got, want)
    pids = where.read_text().split()
    assert len(pids) == len(jpegs)  # each one decoded again by a worker
    assert str(os.getpid()) not in pids
    assert len(set(pids)) <= 2  # RejectDecoder's two workers, kept for the run


def test_the_reject_pool_is_forked_from_the_main_thread_and_no_warnings_state_is_swapped(
    model_parts: tuple[Any, PreprocessSpec],
    photos: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every reject worker is forked from the main thread (never from the decode thread of
    a process with a CUDA context), and the decode thread never enters
    ``warnings.catch_warnings`` (process-wide state, not thread-safe before Python 3.14)."""
    import warnings

    model, spec = model_parts
    jpegs = [p for p in photos if p.suffix == ".jpg"] * 4
    real = torchvision_io()

    class Rejecting:
        ImageReadMode = real.ImageReadMode

        @staticmethod
        def decode_jpeg(data: Any, mode: Any, device: Any) -> Any:
            raise RuntimeError("nvjpeg: unsupported")

    forked_in: list[str] = []
    real_fork = os.fork

    def fork() -> int:
        forked_in.append(threading.current_thread().name)
        return real_fork()

    swapped_in: list[str] = []
    real_catch = warnings.catch_warnings

    def catch_warnings(*args: Any, **kwargs: Any) -> Any:
        swapped_in.append(threading.current_thread().name)
        return real_catch(*args, **kwargs)

    monkeypatch.setattr(gpu_jpeg, "torchvision_io", lambda: Rejecting)
    monkeypatch.setattr(os, "fork", fork)
    monkeypatch.setattr(warnings, "catch_warnings", catch_warnings)
    runner = Runner(model, spec, CPU, torch.float32, jpeg_on_device=True)
    got = classify(runner, jpegs)
    assert len(got) == len(jpegs) and all(r.error is None for r in got)
    assert forked_in and set(forked_in) == {threading.main_thread().name}
    assert THREAD not in swapped_in


def test_stopping_early_leaves_no_thread_and_no_worker(
    model_parts: tuple[Any, PreprocessSpec], photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import multiprocessing

    model, spec = model_parts
    jpegs = [p for p in photos if p.suffix == ".jpg"] * 10
    real = torchvision_io()

    class Rejecting:
        ImageReadMode = real.ImageReadMode

        @staticmethod
        def decode_jpeg(data: Any, mode: Any, device: Any) -> Any:
            raise RuntimeError("nvjpeg: unsupported")

    monkeypatch.setattr(gpu_jpeg, "torchvision_io", lambda: Rejecting)  # so the pool starts
    runner = Runner(model, spec, CPU, torch.float32, jpeg_on_device=True)
    batches = runner.classify([str(p) for p in jpegs], top_k=1, batch_size=4, workers=0)
    first = next(batches)
    assert len(first) == 4 and all(r.error is None for r in first)
    assert [t for t in threading.enumerate() if t.name == THREAD]
    batches.close()  # type: ignore[attr-defined]  # the caller stops after the first batch
    assert not [t for t in threading.enumerate() if t.name == THREAD]
    assert not [p for p in multiprocessing.active_children() if p.name == "convnext-decode"]


@pytest.mark.parametrize(
    "error,raised",
    [
        (ValueError("a bug in the decode thread"), ValueError),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), DeviceFailure),
    ],
)
def test_an_exception_in_the_decode_thread_reaches_the_caller(
    model_parts: tuple[Any, PreprocessSpec],
    photos: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    raised: type,
) -> None:
    model, spec = model_parts
    jpegs = [p for p in photos if p.suffix == ".jpg"] * 6
    calls = []
    real_decode = gpu_jpeg.decode

    def decode(encoded: list[EncodedJpeg], device: torch.device) -> list:
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real_decode(encoded, device)

    monkeypatch.setattr(gpu_jpeg, "decode", decode)
    runner = Runner(model, spec, CPU, torch.float32, jpeg_on_device=True)
    done = []
    with pytest.raises(raised):
        for batch in runner.classify([str(p) for p in jpegs], top_k=1, batch_size=4, workers=0):
            done.append(batch)
    assert len(done) == 1  # the first batch came before the failing one
    assert not [t for t in threading.enumerate() if t.name == THREAD]


def test_a_batch_out_of_device_memory_is_decoded_by_the_workers(
    model_parts: tuple[Any, PreprocessSpec], photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, spec = model_parts
    jpegs = [p for p in photos if p.suffix == ".jpg"] * 4
    want = classify(Runner(model, spec, CPU, torch.float32), jpegs)
    calls = []
    real_decode = gpu_jpeg.decode

    def decode(encoded: list[EncodedJpeg], device: torch.device) -> list:
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(encoded, device)

    monkeypatch.setattr(gpu_jpeg, "decode", decode)
    got = classify(Runner(model, spec, CPU, torch.float32, jpeg_on_device=True), jpegs)
    assert len(calls) == 2
    assert_same_records(got, want)


def test_in_thread_keeps_order_and_stays_at_most_ahead() -> None:
    taken: list[int] = []

    def items():
        for n in range(10):
            taken.append(n)
            yield n

    seen = []
    for n, value in enumerate(in_thread(items(), lambda x: x * x, ahead=2)):
        seen.append(value)
        assert len(taken) <= n + 3  # the one handed over and at most 2 in the thread
    assert seen == [n * n for n in range(10)]


# --- streams and events (fake CUDA) -------------------------------------------------------


class FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_event(self, event: FakeEvent) -> None:
        self.log.append(("wait_event", self.name, event.number, threading.get_ident()))


class FakeEvent:
    count = 0

    def __init__(self, log: list) -> None:
        FakeEvent.count += 1
        self.number, self.log = FakeEvent.count, log

    def record(self, stream: FakeStream) -> None:
        self.log.append(("record", stream.name, self.number, threading.get_ident()))

    def synchronize(self) -> None:
        self.log.append(("event_sync", None, self.number, threading.get_ident()))


def test_the_compute_stream_waits_for_the_decode_streams_event(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fake CUDA: decoding runs on the decode stream in the thread, an event is recorded
    there after it, and the compute stream waits on that event (and the tensors are marked
    as used by it) before the batch is handed to the model; nothing synchronises the whole
    device."""
    log: list[tuple[Any, ...]] = []
    current: list[FakeStream] = []
    compute = FakeStream("compute", log)

    class StreamContext:
        def __init__(self, stream: FakeStream) -> None:
            self.stream = stream

        def __enter__(self) -> None:
            current.append(self.stream)

        def __exit__(self, *exc: object) -> None:
            current.pop()

    def decode(encoded: list[EncodedJpeg], device: torch.device) -> list:
        log.append(("decode", current[-1].name if current else None, None, threading.get_ident()))
        return [decode_file_bytes(e.data) for e in encoded]

    def decode_file_bytes(data: bytes) -> torch.Tensor:
        from convnext_cli.imaging.decoding import decode_bytes

        return decode_bytes(data)

    def record_stream(self: torch.Tensor, stream: FakeStream) -> None:
        log.append(("record_stream", stream.name, tuple(self.shape), threading.get_ident()))

    def no_device_sync(*args: object) -> None:
        raise AssertionError("a device-wide synchronize")

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: FakeStream("decode", log))
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "Event", lambda: FakeEvent(log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "synchronize", no_device_sync)
    monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
    monkeypatch.setattr(gpu_jpeg, "decode", decode)

    data = [p.read_bytes() for p in photos if p.suffix == ".jpg"]
    batches = [
        DecodedBatch([2 * n, 2 * n + 1], ["a.jpg", "b.jpg"], [None, None], [],
                     [(0, EncodedJpeg(data[0])), (1, EncodedJpeg(data[1]))])
        for n in range(3)
    ]  # fmt: skip
    decoder = DeviceDecoder(PreprocessSpec.imagenet(224), torch.device("cuda"))
    main = threading.get_ident()
    for ready in in_thread(batches, decoder):
        assert isinstance(ready, DeviceBatch) and ready.ready is not None
        log.append(("handed", None, ready.ready.number, main))
        groups = ready.take(torch.device("cuda"))
        log.append(("model", None, ready.ready.number, main))
        assert [positions for positions, _ in groups] == [[0, 1]]
    for number in range(FakeEvent.count - 2, FakeEvent.count + 1):
        mine = [(kind, stream, ident) for kind, stream, n, ident in log if n == number]
        assert [k for k, _, _ in mine] == ["record", "event_sync", "handed", "wait_event", "model"]
        assert mine[0][1] == "decode" and mine[0][2] != main  # recorded in the thread
        assert mine[3][1] == "compute" and mine[3][2] == main  # waited for by the compute stream
    decodes = [entry for entry in log if entry[0] == "decode"]
    assert len(decodes) == 3 and all(s == "decode" and i != main for _, s, _, i in decodes)
    marks = [entry for entry in log if entry[0] == "record_stream"]
    assert len(marks) == 3 and all(s == "compute" and i == main for _, s, _, i in marks)
    # each batch's tensors are marked right after its compute stream waits on its event
    for n, entry in enumerate(log):
        if entry[0] == "record_stream":
            assert log[n - 1][0] == "wait_event"


def test_the_runner_takes_device_groups_before_the_model_runs(
    model_parts: tuple[Any, PreprocessSpec], photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, spec = model_parts
    order: list[str] = []
    real_take = DeviceBatch.take

    def take(self: DeviceBatch, device: torch.device) -> Any:
        order.append("take")
        return real_take(self, device)

    monkeypatch.setattr(device_decode.DeviceBatch, "take", take)
    runner = Runner(model, spec, CPU, torch.float32, jpeg_on_device=True)
    forward = runner.logits_fn

    def model_call(batch: torch.Tensor) -> Any:
        order.append("model")
        return forward(batch)

    runner.logits_fn = model_call
    jpegs = [p for p in photos if p.suffix == ".jpg"] * 4
    classify(runner, jpegs)
    assert order == ["take", "model", "take", "model"]


def test_one_bad_jpeg_costs_a_few_halvings_not_a_call_per_image(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of 16 with one JPEG the device decoder fails on: the batch is halved until
    the bad one is alone (9 calls, not 1 + 16); the other 15 are decoded, the bad one is
    None (decoded again on the CPU by a worker)."""
    real = torchvision_io()
    jpeg = next(p for p in photos if p.suffix == ".jpg").read_bytes()
    bad = jpeg[:-2] + b"\x00\xff\xd9"  # marked for the stand-in below
    calls: list[int] = []

    class OneBad:
        ImageReadMode = real.ImageReadMode

        @staticmethod
        def decode_jpeg(data: Any, mode: Any, device: Any) -> Any:
            batch = data if isinstance(data, list) else [data]
            calls.append(len(batch))
            if any(bytes(b.numpy()) == bad for b in batch):
                raise RuntimeError("nvjpeg: unsupported")
            return real.decode_jpeg(data, mode=mode, device=device)

    monkeypatch.setattr(gpu_jpeg, "torchvision_io", lambda: OneBad)
    encoded = [EncodedJpeg(bad if n == 11 else jpeg) for n in range(16)]
    images = gpu_jpeg.decode(encoded, CPU)
    assert [n for n, image in enumerate(images) if image is None] == [11]
    assert calls == [16, 8, 8, 4, 2, 2, 1, 1, 4]
    assert gpu_jpeg.decode([], CPU) == []
