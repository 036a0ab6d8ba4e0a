"""``--decode gpu``: JPEGs decoded and resized on the device, off the main thread.

The decode workers only read a JPEG's header and pass its bytes on (an ``EncodedJpeg``).
:func:`in_thread` runs :class:`DeviceDecoder` on each batch in one background thread per
run, at most ``ahead`` batches in front of the one the model runs, so that decoding batch
i+1 overlaps the model on batch i.  The decoder

- decodes the batch's JPEGs in one call (nvjpeg through torchvision; on the CPU, where it is
  tested, torchvision's libjpeg-turbo decoder), on its own CUDA stream;
- resizes and centre-crops them as one batched operation
  (:meth:`~convnext_cli.imaging.preprocess.PreprocessSpec.resize_and_crop_batch`; image by
  image for the filters and specs that has not);
- records a CUDA event on its stream once that is done (and waits for it in the thread:
  torchvision orders its own decoder stream before ours, the host buffers it reads stay
  alive until then); the main thread's compute stream waits for that event
  (:meth:`DeviceBatch.take`) and the tensors are marked as used by it (``record_stream``),
  so no device-wide synchronisation is needed anywhere;
- sends what the device decoder rejects (and a batch that ran out of device memory) back
  to decode worker processes, with their deadline and crash isolation: one small pool for
  the whole run, started from the main thread as the run starts (``rejects``, see
  :class:`RejectDecoder`).

An exception in the thread reaches the caller with the batch it was for; the thread is
stopped and joined when the run ends or the caller stops early.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from convnext_cli.engine.decode_pool import (
    DecodePool,
    Task,
    decode_timeout,
    failure,
    group_by_shape,
)
from convnext_cli.engine.decoded import DecodedBatch, Groups, PendingBatch
from convnext_cli.imaging import gpu_jpeg
from convnext_cli.imaging.gpu_jpeg import EncodedJpeg
from convnext_cli.imaging.preprocess import PreprocessSpec
from convnext_cli.inputs.expand import InputRef

# (position in the batch, input) pairs -> their pixels by shape; errors go into the list given
Rejects = Callable[[list[tuple[int, Any]], list[str | None]], Groups]

AHEAD = 2  # batches the decode thread may hold in front of the one the model runs
T = TypeVar("T")
U = TypeVar("U")


class Cancelled(Exception):
    """The run stopped while the thread was waiting for something (rejected JPEGs)."""


@dataclass
class DeviceBatch:
    """A batch whose JPEGs are decoded: `decoded` with the device path's errors filled in and
    only host pixels in its groups (CPU-decoded, rejects included), `on_device` the device
    decoded ones, resized, ready once `ready` (a CUDA event, None elsewhere) has fired."""

    decoded: DecodedBatch
    on_device: Groups
    ready: Any = None

    def take(self, device: torch.device) -> Groups:
        """`on_device`, ordered after the decoding: the current (compute) stream waits for
        the decode stream's event, and each tensor is marked as used by it, so that the
        caching allocator does not hand its memory to the decode stream too early."""
        if self.ready is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_event(self.ready)
            for _, pixels in self.on_device:
                pixels.record_stream(compute)
        return self.on_device


def _no_rejects(items: list[tuple[int, Any]], errors: list[str | None]) -> Groups:
    for position, _ in items:
        errors[position] = "the device JPEG decoder rejected this image"
    return []


class DeviceDecoder:
    """Decodes a :class:`DecodedBatch`'s JPEGs on `device` and resizes them there; called in
    the decode thread only.  `fatal` tells a device error that must end the run (it is
    raised, never an image's error record)."""

    def __init__(
        self,
        spec: PreprocessSpec,
        device: torch.device,
        rejects: Rejects = _no_rejects,
        fatal: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        gpu_jpeg.quiet_codec_warnings()  # here, in the main thread (see there)
        self.spec = spec
        self.device = device
        self.rejects = rejects
        self.fatal = fatal
        self.stream: Any = None

    def __call__(self, batch: DecodedBatch) -> DeviceBatch:
        if not batch.encoded:
            return DeviceBatch(batch, [])
        errors = list(batch.errors)
        ready = None
        with self._on_stream(), torch.inference_mode():
            on_device, rejected = self._decode(batch.encoded, errors)
            if self.stream is not None:
                ready = torch.cuda.Event()
                ready.record(self.stream)
                ready.synchronize()  # in this thread: the main thread never waits here
        again = [(position, batch.inputs[position]) for position, _ in rejected]
        host = list(batch.groups) + (self.rejects(again, errors) if again else [])
        return DeviceBatch(replace(batch, errors=errors, groups=host, encoded=[]), on_device, ready)

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self.stream)

    def _decode(
        self, encoded: list[tuple[int, EncodedJpeg]], errors: list[str | None]
    ) -> tuple[Groups, list[tuple[int, EncodedJpeg]]]:
        """(the resized device groups, the JPEGs to decode on the CPU): out of device
        memory, the whole batch goes to the CPU decoders instead."""
        try:
            return self._decode_and_resize(encoded, errors)
        except torch.OutOfMemoryError:
            pass  # out of this block, the batch's device tensors are freed
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for position, _ in encoded:
            errors[position] = None
        return [], list(encoded)

    def _decode_and_resize(
        self, encoded: list[tuple[int, EncodedJpeg]], errors: list[str | None]
    ) -> tuple[Groups, list[tuple[int, EncodedJpeg]]]:
        images = gpu_jpeg.decode([jpeg for _, jpeg in encoded], self.device)
        pairs = list(zip(encoded, images, strict=True))
        del images
        kept = [(p, image) for (p, _), image in pairs if image is not None]
        rejected = [item for item, image in pairs if image is None]
        del pairs
        return self._resize(kept, errors), rejected

    def _resize(self, kept: list[tuple[int, torch.Tensor]], errors: list[str | None]) -> Groups:
        """One batched resize and crop; image by image where that does not apply."""
        if not kept:
            return []
        batch = self.spec.resize_and_crop_batch([image for _, image in kept])
        if batch is not None:
            return [([p for p, _ in kept], batch)]
        done = []
        for position, image in kept:
            try:
                done.append((position, self.spec.resize_and_crop(image)))
            except Exception as exc:
                if isinstance(exc, torch.OutOfMemoryError) or self.fatal(exc):
                    raise
                errors[position] = failure(exc)
        groups = group_by_shape(done, lambda item: tuple(item[1].shape))
        return [([p for p, _ in group], torch.stack([t for _, t in group])) for group in groups]


class RejectDecoder:
    """What the device decoder rejected (CMYK, corrupt, unsupported...), decoded on the CPU
    by decode worker processes, with their deadline and crash isolation (never Pillow in
    this process): one small :class:`DecodePool` for the whole run, started from the main
    thread when the run starts (:meth:`start`), used from one thread (the device-decode
    thread), closed by :meth:`close`."""

    def __init__(self, spec: PreprocessSpec, workers: int = 2, timeout: float | None = None):
        self.spec = spec
        self.workers = workers
        self.timeout = timeout
        self.pool: DecodePool | None = None
        self.pending: PendingBatch | None = None
        self.cancelled = threading.Event()

    def __call__(self, items: list[tuple[int, InputRef]], errors: list[str | None]) -> Groups:
        """Decode `items` ((position in the batch, input) pairs): their pixels by shape,
        with their positions; an input that fails gets its error in `errors`."""
        if not items:
            return []
        pending = self.pending = PendingBatch(0, [item for _, item in items])
        if self.pool is None:
            self.start()
        assert self.pool is not None
        numbered = list(enumerate(item for _, item in items))
        share = -(-len(numbered) // max(1, self.workers))  # one task per worker
        for start in range(0, len(numbered), share):
            self.pool.submit(0, numbered[start : start + share])
        while pending.waiting > 0:
            if self.cancelled.is_set():
                raise Cancelled("stopped while decoding rejected JPEGs")
            self.pool.poll()
        redone = pending.finish()
        positions = [position for position, _ in items]
        for n, error in enumerate(redone.errors):
            if error is not None:
                errors[positions[n]] = error
        return [([positions[n] for n in group], pixels) for group, pixels in redone.groups]

    def start(self) -> None:
        """Start the pool's workers: called from the main thread when the run starts, so
        that they are forked from it (never from the decode thread of a process whose CUDA
        context is up); a pool not started then starts at the first reject."""
        if self.pool is None:
            wait = decode_timeout() if self.timeout is None else self.timeout
            self.pool = DecodePool(self.workers, self.spec, False, wait, self._done, self._error)
            self.pool.start()

    def _done(self, task: Task, packed: dict[str, Any]) -> None:
        if self.pending is not None:
            self.pending.add_packed(packed)

    def _error(self, task: Task, position: int, message: str) -> None:
        if self.pending is not None:
            self.pending.add(position, message)

    def cancel(self) -> None:
        """Cut a wait for the workers short (from another thread: the run is stopping)."""
        self.cancelled.set()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


_END = object()


def _serve(
    todo: queue.Queue[Any],
    done: queue.Queue[tuple[bool, Any]],
    stop: threading.Event,
    work: Callable[[Any], Any],
    on_exit: Callable[[], None] | None,
) -> None:
    """The thread of :func:`in_thread`: (True, result) or (False, exception) per item."""
    try:
        while (item := todo.get()) is not _END and not stop.is_set():
            try:
                done.put((True, work(item)))
            except BaseException as exc:  # handed to the caller
                done.put((False, exc))
                return
    finally:
        if on_exit is not None:
            on_exit()


def in_thread(
    items: Iterable[T],
    work: Callable[[T], U],
    ahead: int = AHEAD,
    on_stop: Callable[[], None] | None = None,
    on_exit: Callable[[], None] | None = None,
    name: str = "convnext-device-decode",
) -> Generator[U, None, None]:
    """``work(item)`` for each of `items`, in order, computed in one background thread at
    most `ahead` items in front of the one the caller has.

    The caller's thread takes `items` (a generator that keeps its own state, the decode
    pool, in this thread) and hands them over.  An exception in `work` is raised here, for
    its item.  Closing this generator (the run ended, the caller stopped early) calls
    `on_stop` here (to cut short a wait in `work`), ends the thread and joins it;
    `on_exit` runs in the thread as it ends (to close what it owns).
    """
    todo: queue.Queue[Any] = queue.Queue()
    done: queue.Queue[tuple[bool, Any]] = queue.Queue()
    stop = threading.Event()
    serve = (todo, done, stop, work, on_exit)
    thread = threading.Thread(target=_serve, args=serve, name=name, daemon=True)
    thread.start()
    waiting = 0

    def take() -> U:
        nonlocal waiting
        ok, value = done.get()
        waiting -= 1
        if not ok:
            raise value
        return value

    source: Iterator[T] = iter(items)
    try:
        for item in source:
            todo.put(item)
            waiting += 1
            if waiting > ahead:
                yield take()
        while waiting:
            yield take()
    finally:
        stop.set()
        if on_stop is not None:
            on_stop()
        todo.put(_END)
        thread.join()
        close = getattr(source, "close", None)
        if close is not None:
            close()
