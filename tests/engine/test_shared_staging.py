"""The shared-memory staging ring (engine/staging.py): decoded crops reach the main process
as views of a slot the decode workers wrote, never a copy; a slot is reused only after the
batch that used it is released (and its event has completed); crash isolation, /dev/shm
and memory stay as they were.

The reference everywhere is the pickle path (``staging=False`` / ``CONVNEXT_STAGING=0``).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import HOSTILE_DECODER
from PIL import Image

from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint
from convnext_cli.engine import staging
from convnext_cli.engine.pipeline import DecodedBatch, Runner, decoded_batches
from convnext_cli.imaging.preprocess import PreprocessSpec

REPO = Path(__file__).resolve().parents[2]
SPEC = PreprocessSpec(shortest_edge=224)
linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")


def pixels_by_input(batch: DecodedBatch) -> dict[int, torch.Tensor]:
    """Each decoded input's crop (a copy), by its number in the run."""
    return {
        batch.indices[p]: row.clone()
        for positions, group in batch.groups
        for p, row in zip(positions, group, strict=True)
    }


def reference(paths: list[str], batch_size: int) -> tuple[dict[int, torch.Tensor], list[Any]]:
    """Crops and errors by the pickle path."""
    crops: dict[int, torch.Tensor] = {}
    errors: list[Any] = []
    for batch in decoded_batches(paths, SPEC, batch_size, workers=2, staging=False):
        assert batch.ring is None
        crops.update(pixels_by_input(batch))
        errors += batch.errors
    return crops, errors


def assert_same(got: dict[int, torch.Tensor], want: dict[int, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for n, crop in want.items():
        assert torch.equal(got[n], crop), f"input {n}: pixels differ from the pickle path"


@pytest.fixture()
def mixed_inputs(tmp_path: Path, photos: list[Path]) -> list[str]:
    """Photos with a broken file in between (a hole in its batch's slot)."""
    paths = [str(p) for p in photos * 2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    paths.insert(4, str(broken))
    return paths


def test_records_with_the_ring_equal_records_without(
    v1_checkpoint: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = load_checkpoint(str(v1_checkpoint))
    model = build_model(checkpoint, torch.device("cpu"), torch.float32)
    runner = Runner(model, checkpoint.preprocess, torch.device("cpu"), torch.float32)
    paths = [str(p) for p in photos * 2]

    def run() -> list[Any]:
        return [r for b in runner.classify(paths, top_k=5, batch_size=3, workers=2) for r in b]

    monkeypatch.delenv(staging.STAGING_ENV, raising=False)
    staged = run()
    monkeypatch.setenv(staging.STAGING_ENV, "0")
    pickled = run()
    assert [r.path for r in staged] == [r.path for r in pickled] == paths
    for a, b in zip(staged, pickled, strict=True):
        assert a.error is None and b.error is None
        assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
        assert [p.score for p in a.predictions] == pytest.approx(
            [p.score for p in b.predictions], rel=1e-5, abs=1e-7
        )


def test_the_runner_releases_every_batch(
    v1_checkpoint: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a ring of two slots every batch of a run still goes through the ring: the Runner
    releases each one once its model is queued (else the third would take the pickle path)."""
    from convnext_cli.engine import pipeline

    monkeypatch.setattr(pipeline, "ring_slots", lambda *args: 2)
    released: list[bool] = []
    real_release = DecodedBatch.release

    def release(self: DecodedBatch, after: Any = None) -> None:
        released.append(self.slot is not None)
        real_release(self, after)

    monkeypatch.setattr(DecodedBatch, "release", release)
    checkpoint = load_checkpoint(str(v1_checkpoint))
    model = build_model(checkpoint, torch.device("cpu"), torch.float32)
    runner = Runner(model, checkpoint.preprocess, torch.device("cpu"), torch.float32)
    paths = [str(p) for p in photos * 2]
    got = [r for b in runner.classify(paths, batch_size=2, workers=2) for r in b]
    assert [r.path for r in got] == paths and all(r.error is None for r in got)
    assert released == [True] * (len(paths) // 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_is_a_view_of_the_ring(mixed_inputs: list[str], workers: int) -> None:
    """No copy: the pixels' data lie inside the ring's mapping, also for a batch with a hole
    (the broken file), and they equal the pickle path's."""
    want, want_errors = reference(mixed_inputs, 4)
    got: dict[int, torch.Tensor] = {}
    errors: list[Any] = []
    for batch in decoded_batches(mixed_inputs, SPEC, 4, workers=workers):
        ring = batch.ring
        assert ring is not None and batch.slot is not None
        ((positions, pixels),) = batch.groups
        start = pixels.data_ptr()
        assert ring.address <= start and start + pixels.numel() <= ring.address + ring.nbytes
        assert ring.holds(pixels)
        assert pixels.shape[1:] == (3, 224, 224)
        got.update(pixels_by_input(batch))
        errors += batch.errors
        batch.release()
    assert errors == want_errors and errors[4] is not None
    assert_same(got, want)


class FakeEvent:
    """A copy still in flight until the consumer says it is done (or the ring waits for it)."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


@pytest.mark.parametrize("workers", [0, 2])
def test_tiny_ring_and_a_slow_consumer_corrupt_nothing(
    tmp_path: Path, photos: list[Path], workers: int
) -> None:
    """Two slots, batches released with an event that completes two batches later, a
    consumer that sleeps while holding them: every batch it still holds keeps its pixels,
    and every crop equals the pickle path's."""
    paths = [str(p) for p in photos * 4]
    want, _ = reference(paths, 2)
    held: list[tuple[DecodedBatch, FakeEvent, dict[int, torch.Tensor]]] = []
    got: dict[int, torch.Tensor] = {}
    in_ring = 0
    for batch in decoded_batches(paths, SPEC, 2, workers=workers, prefetch=4, slots=2):
        crops = pixels_by_input(batch)
        got.update(crops)
        in_ring += batch.ring is not None and batch.slot is not None
        event = FakeEvent()
        held.append((batch, event, crops))
        time.sleep(0.05)  # the workers go on meanwhile
        for old, old_event, old_crops in held:
            if not old_event.done:  # its copy may still read the slot: it must be intact
                assert_same(pixels_by_input(old), old_crops)
        batch.release(event)
        if len(held) > 2:
            held.pop(0)[1].done = True
    assert_same(got, want)
    assert in_ring == len(paths) // 2  # every batch went through the ring


def test_a_consumer_that_never_releases_gets_the_pickle_path(photos: list[Path]) -> None:
    paths = [str(p) for p in photos * 2]
    want, _ = reference(paths, 2)
    batches = list(decoded_batches(paths, SPEC, 2, workers=2, prefetch=2, slots=2))
    assert [b.slot is not None for b in batches] == [True, True] + [False] * (len(batches) - 2)
    got: dict[int, torch.Tensor] = {}
    for batch in batches:
        got.update(pixels_by_input(batch))
    assert_same(got, want)  # the two slots were never rewritten


def test_a_worker_killed_mid_batch_is_retried_into_the_same_slot(
    tmp_path: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL in a worker after it wrote part of a batch into its slot: the retry rewrites
    those positions, one outcome per input, every crop right."""
    from convnext_cli.imaging import decoding

    namespace: dict[str, Any] = {}
    exec(HOSTILE_DECODER, namespace)  # noqa: S102 - the hostile decoder, inherited by the forked workers
    monkeypatch.setattr(decoding, "decode_bytes", namespace["hostile"])
    paths = [str(p) for p in photos * 2]
    clean = list(paths)
    once = tmp_path / "once.jpg"
    once.write_bytes(f"ONCE:{tmp_path / 'died'}\n".encode() + photos[0].read_bytes())
    paths[2] = str(once)
    clean[2] = str(photos[0])
    kill = tmp_path / "kill.jpg"
    kill.write_bytes(b"KILL")
    paths.insert(5, str(kill))
    clean.insert(5, str(kill))
    want, want_errors = reference(clean, 4)
    got: dict[int, torch.Tensor] = {}
    errors: list[Any] = []
    for batch in decoded_batches(paths, SPEC, 4, workers=2, slots=2):
        assert batch.ring is not None
        got.update(pixels_by_input(batch))
        errors += batch.errors
        batch.release()
    assert len(errors) == len(paths)
    assert [e is None for e in errors] == [n != 5 for n in range(len(paths))]
    assert errors[5].startswith("the decoding process died on this image")
    assert want_errors[5] is not None
    assert_same(got, want)


class FakeCudart:
    def __init__(self, code: int = 0) -> None:
        self.code = code
        self.calls: list[tuple[Any, ...]] = []

    def cudaHostRegister(self, address: int, size: int, flags: int) -> int:  # noqa: N802
        self.calls.append(("register", address, size, flags))
        return self.code

    def cudaHostUnregister(self, address: int) -> int:  # noqa: N802
        self.calls.append(("unregister", address))
        return 0


def mock_cuda(monkeypatch: pytest.MonkeyPatch, cudart: FakeCudart) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)


def test_the_ring_is_pinned_once_and_unpinned_at_the_end(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a (mocked) CUDA, one cudaHostRegister of the whole ring, no pin_memory copy of
    its batches, one cudaHostUnregister when the run ends."""
    cudart = FakeCudart()
    mock_cuda(monkeypatch, cudart)

    def no_copy(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("a batch in the pinned ring was pinned again (a copy)")

    monkeypatch.setattr(torch.Tensor, "pin_memory", no_copy)
    paths = [str(p) for p in photos * 2]
    rings = set()
    for batch in decoded_batches(paths, SPEC, 3, workers=2, pin_memory=True):
        assert batch.ring is not None and batch.ring.pinned
        rings.add(id(batch.ring))
        address, nbytes = batch.ring.address, batch.ring.nbytes
        assert cudart.calls == [("register", address, nbytes, 1)]
        batch.release()
    assert len(rings) == 1
    assert cudart.calls == [("register", address, nbytes, 1), ("unregister", address)]


def test_in_process_decoding_is_not_page_locked(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--workers 0`` (and the Ray actors' short calls): the ring is not registered, its
    batches are pinned one by one as before."""
    cudart = FakeCudart()
    mock_cuda(monkeypatch, cudart)
    pinned: list[bool] = []

    def pin(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        pinned.append(True)
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    paths = [str(p) for p in photos]
    batches = 0
    for batch in decoded_batches(paths, SPEC, 3, workers=0, pin_memory=True):
        assert batch.ring is not None and not batch.ring.pinned
        batch.release()
        batches += 1
    assert cudart.calls == [] and pinned == [True] * batches


def test_no_cuda_or_a_refused_registration_leaves_the_ring_unpinned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ring = staging.StagingRing(2, 4, (3, 8, 8), pin=True)  # the CPU: nothing to pin
    assert not ring.pinned
    ring.close()
    cudart = FakeCudart(code=2)  # cudaErrorMemoryAllocation
    mock_cuda(monkeypatch, cudart)
    ring = staging.StagingRing(2, 4, (3, 8, 8), pin=True)
    assert not ring.pinned
    ring.close()
    assert [call[0] for call in cudart.calls] == ["register"]  # nothing to unregister


def test_a_worker_without_the_mapping_falls_back_to_the_pipe(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver could keep a pinned range from being inherited: the worker then sends its
    crops through the pipe, and they still end up in the slot, right."""
    monkeypatch.setattr(staging.StagingRing, "mapped_here", lambda self: False)
    paths = [str(p) for p in photos]
    want, _ = reference(paths, 3)
    got: dict[int, torch.Tensor] = {}
    for batch in decoded_batches(paths, SPEC, 3, workers=2):
        assert batch.ring is not None and batch.ring.holds(batch.groups[0][1])
        got.update(pixels_by_input(batch))
        batch.release()
    assert_same(got, want)


def test_odd_shapes_keep_the_pickle_path(photos: list[Path]) -> None:
    """Resizing off: crops have the images' own shapes, so there is no ring."""
    spec = PreprocessSpec(do_resize=False)
    assert staging.fixed_shape(spec) is None
    for batch in decoded_batches([str(p) for p in photos], spec, 3, workers=2):
        assert batch.ring is None
    assert staging.fixed_shape(PreprocessSpec(do_center_crop=True, crop_size=(5, 7))) == (3, 5, 7)


# --- subprocesses: /dev/shm, leaked workers, memory ----------------------------------------

SCRIPT = """
import os, resource, sys, time
from pathlib import Path
from convnext_cli.engine.pipeline import decoded_batches
from convnext_cli.imaging.preprocess import PreprocessSpec

def children():
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            found.append(entry)
    return found

paths = sys.argv[2:]
nap = float(sys.argv[1])
for n, batch in enumerate(decoded_batches(paths, PreprocessSpec(shortest_edge=224), 8, workers=2)):
    if n == 0:
        print("ring", hex(batch.ring.address), ",".join(children()), flush=True)
    batch.release()
    time.sleep(nap)
print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def start_script(tmp_path: Path, paths: list[str], nap: float) -> subprocess.Popen[str]:
    script = tmp_path / "stage.py"
    script.write_text(SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), str(nap), *paths],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def small_jpegs(folder: Path, count: int) -> list[str]:
    folder.mkdir(exist_ok=True)
    buffer = io.BytesIO()
    torch.manual_seed(0)
    noise = torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8).numpy()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=80)
    paths = []
    for n in range(count):
        path = folder / f"{n:05d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(str(path))
    return paths


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if Path("/dev/shm").is_dir() else set()


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def shm_references(pid: int) -> list[str]:
    """Named shared memory a process maps or holds open: files under /dev/shm that still
    exist (multiprocessing's small arena for the workers' progress is unlinked at once)."""
    found = [
        line.split(None, 5)[-1]
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if "/dev/shm/" in line
    ]
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/dev/shm/"):
            found.append(target)
    return [path for path in found if not path.endswith("(deleted)")]


def ring_mapping(pid: int, address: int) -> str:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= address < end:
            return line
    return ""


@linux_only
def test_no_named_shared_memory_and_nothing_left_after_a_sigkill(tmp_path: Path) -> None:
    """The ring is an anonymous shared mapping (``/dev/zero (deleted)``, ``rw-s``) in the main
    process and its workers: no /dev/shm file, none after the main process is SIGKILLed,
    and its workers go with it."""
    before = shm_entries()
    paths = small_jpegs(tmp_path / "in", 400)
    proc = start_script(tmp_path, paths, nap=0.2)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ring "), proc.stderr.read() if proc.stderr else ""
        address = int(line.split()[1], 16)
        workers = children_of(proc.pid)
        assert workers, "no decode worker found"
        for pid in [proc.pid, *workers]:
            mapping = ring_mapping(pid, address)
            assert mapping.split()[1] == "rw-s" and "/dev/zero (deleted)" in mapping, mapping
            assert shm_references(pid) == []
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "a decode worker outlived the main process"
        time.sleep(0.1)
    assert shm_entries() - before == set()


@linux_only
def test_peak_memory_does_not_grow_with_the_input_count(tmp_path: Path) -> None:
    """2,000 small JPEGs take no more memory than 400: the ring is fixed, nothing piles up;
    and a finished run leaves no /dev/shm file and no worker behind."""
    before = shm_entries()
    paths = small_jpegs(tmp_path / "in", 2000)
    peaks = []
    for count in (400, 2000):
        proc = start_script(tmp_path, paths[:count], nap=0.0)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert err == ""  # nothing new on stderr
        peaks.append(int(out.split("peak ")[1]) / 1024)  # MiB
        workers = [int(pid) for pid in out.split()[2].split(",")]
        assert workers, "no decode worker found"
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            assert time.monotonic() < deadline, "a decode worker outlived the run"
            time.sleep(0.1)
    assert peaks[1] - peaks[0] < 24, peaks
    assert shm_entries() - before == set()


def test_ring_sizes() -> None:
    shape = (3, 224, 224)
    assert staging.ring_slots(8, 8, shape) == 8 + staging.SPARE_SLOTS
    assert staging.ring_slots(0, 8, shape) == staging.SPARE_SLOTS
    huge = staging.ring_slots(64, 4096, shape)  # 600 MB a slot: bounded by MAX_RING_BYTES
    assert huge == max(2, staging.MAX_RING_BYTES // (4096 * 3 * 224 * 224))
    ring = staging.StagingRing(2, 2, (3, 4, 4))
    first, second = ring.acquire(), ring.acquire()
    assert first is not None and second is not None and ring.acquire() is None
    event = FakeEvent()
    ring.release(*first, event)
    ring.release(*first)  # a second release changes nothing
    assert ring.acquire() is None  # the event is pending
    again = ring.acquire(wait=True)  # nothing else can go on: waited for
    assert event.done and again is not None and again[0] == first[0]
    ring.close()


def test_staging_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(staging.STAGING_ENV, raising=False)
    assert staging.staging_enabled()
    for off in ("0", "false", "off"):
        monkeypatch.setenv(staging.STAGING_ENV, off)
        assert not staging.staging_enabled()
    monkeypatch.setenv(staging.STAGING_ENV, "1")
    assert staging.staging_enabled()


def test_the_ring_is_registered_portable_with_the_runs_device_current(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cudaHostRegister with flags 1 (portable, as torch's own pinning), made while the
    run's device is the current one (cuda:1 here), so that the registration belongs to the
    context the copies run in."""
    cudart = FakeCudart()
    mock_cuda(monkeypatch, cudart)
    current: list[Any] = []

    class Device:
        def __init__(self, device: Any) -> None:
            self.device = device

        def __enter__(self) -> None:
            current.append(self.device)
            cudart.calls.append(("device", str(self.device)))

        def __exit__(self, *args: object) -> None:
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", Device)
    ring = staging.StagingRing(2, 4, (3, 8, 8), pin=True, device=torch.device("cuda", 1))
    assert ring.pinned
    assert cudart.calls == [("device", "cuda:1"), ("register", ring.address, ring.nbytes, 1)]
    ring.close()
    assert cudart.calls[-1] == ("unregister", ring.address)
