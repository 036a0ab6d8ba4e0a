"""The streaming pipeline shared by classify and embed.

Decode worker processes (:mod:`convnext_cli.engine.decode_pool`) read, decode and resize (uint8)
while the model runs on the previous batch; the main process normalises on the target
device, runs the model and yields one list of results per batch, in input order.  Memory
is bounded by the batches in flight (``workers x 2``), never by the number of inputs.

Inputs may be a stream (a listing still going on): they are taken a batch at a time, as
the batches in flight make room, so the first results come before the stream ends.  Only
a few batches are read ahead, to choose the number of workers (see :func:`plan_workers`).

Every input yields exactly one result: its predictions or embedding, or the one-line
reason it has none.  A decoder that crashes or hangs costs one input (see decode_pool); an
image the model cannot run on (too small with resizing off) gets its own error, the rest
of its batch is run without it; a row whose outputs are not all finite (broken weights,
``image_std`` 0) gets ``model produced non-finite values``, never a NaN in the output.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from convnext_cli.choices import SCORES
from convnext_cli.engine.decode_pool import (
    TASKS_PER_WORKER,
    DecodePool,
    PoolKeeper,
    Task,
    close_pool,
    decode_one,
    failure,
    group_by_shape,
    open_pool,
)
from convnext_cli.engine.decoded import DecodedBatch, PendingBatch
from convnext_cli.engine.gpu.device_decode import (
    DeviceBatch,
    DeviceDecoder,
    RejectDecoder,
    in_thread,
)
from convnext_cli.engine.gpu.readback import Readback
from convnext_cli.engine.staging import StagingRing, fixed_shape, ring_slots, staging_enabled
from convnext_cli.engine.thread_tuner import ThreadTuner
from convnext_cli.errors import DeviceFailure, one_line
from convnext_cli.imaging.preprocess import PreprocessSpec
from convnext_cli.model.convnext import ConvNeXtForClassification
from convnext_cli.results import (
    InMemoryImage,
    Input,
    Prediction,
    Result,
    input_name,
    source_of,
)

MIN_TASK_FILES = 4  # a decode task is at least this many files (a message per task)
T = TypeVar("T")
READ_BEHIND = 2  # on CUDA, batches queued on the device while an earlier one is read back
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # a thread count the user chose
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice (the physical cores)


def _prepare(item: Input, spec: PreprocessSpec, jpeg_on_device: bool) -> Any:
    """One input, decoded (or not) in this process: pixels, an EncodedJpeg, or an error."""
    if isinstance(item, InMemoryImage):
        if item.pixels is None:
            return item.error or "not an image"
        try:
            return spec.resize_and_crop(item.pixels)
        except Exception as exc:
            return failure(exc)
    return decode_one(item, spec, jpeg_on_device)


def default_batch_size(
    device_type: str, image_size: int = 224, device: torch.device | None = None
) -> int:
    """The batch a run uses without ``-b``: see
    :func:`convnext_cli.engine.device.default_batch_size`
    (8 on the CPU, 256 on a data-centre GPU at 224 pixels)."""
    from convnext_cli.engine.device import default_batch_size as for_device

    return for_device(device or torch.device(device_type), image_size)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_workers(num_inputs: int, batch_size: int, device_type: str = "cpu") -> int:
    """Decoding processes that overlap the model: none for a single batch; on a GPU, every
    usable core (CPU affinity) but what the main process keeps (one core, and one more per
    16: it queues batches, copies them and writes the results); on the CPU one per four
    cores.  No fixed cap: a 64-core machine feeding a GPU decodes on 60.

    On the CPU the model's threads already use every core, and a decoder process fighting
    them for cores costs more than it overlaps (measured: ``benchmarks/README.md``,
    "Decoding workers on the CPU"), so only one in four cores decodes.
    When this is 0, :class:`Runner` still decodes in one guard process, batch by batch
    without overlap (see :func:`plan_workers`).
    """
    if num_inputs <= batch_size:
        return 0
    cores = usable_cores()
    if device_type == "cpu":
        return cores // 4
    return max(1, cores - 1 - cores // 16)


def cap_workers(requested: int, num_inputs: int, batch_size: int) -> int:
    """``--workers N`` is lowered to what can run at once: at most one worker per batch
    (ceil(inputs / batch size)) and at most the usable cores (CPU affinity)."""
    batches = max(1, -(-num_inputs // max(1, batch_size)))
    return max(0, min(requested, batches, usable_cores()))


def plan_workers(
    requested: int | None,
    num_inputs: int,
    batch_size: int,
    device_type: str,
    tuned: bool = False,
) -> tuple[int, int]:
    """(worker processes, batches decoded ahead) for a run.

    - ``None`` (the default): :func:`default_workers`, each prefetching 2 batches; where
      that is 0, one guard process decoding one batch at a time while the model waits,
      so that a decoder crash or time bomb costs one input, not the run, at the price of
      a pipe copy per batch and of resizing on one thread (a forked process cannot use
      the OpenMP pool it inherits).  With `tuned` (the model's CPU threads are chosen by
      measuring, see :mod:`convnext_cli.engine.thread_tuner`) and more than one batch, the guard
      process decodes the next batch while the model runs: the tuner gives it a core
      when decoding is what the run waits for.
    - ``0``: decode in the main process (no crash isolation, no deadline: only the
      structural checks in images.py guard it).
    - ``N``: :func:`cap_workers`, each prefetching 2 batches.

    With a stream of inputs, `num_inputs` need only be counted up to
    :func:`planning_lookahead`: any larger count gives the same plan.
    """
    if requested is None:
        workers = default_workers(num_inputs, batch_size, device_type)
        if workers == 0:
            return 1, (TASKS_PER_WORKER if tuned and num_inputs > batch_size else 1)
        return workers, workers * TASKS_PER_WORKER
    workers = cap_workers(requested, num_inputs, batch_size)
    return workers, workers * TASKS_PER_WORKER


def planning_lookahead(requested: int | None, batch_size: int) -> int:
    """How many inputs :func:`plan_workers` needs to see: a count this large decides the
    plan as the full count would (the default looks at whether there is more than one
    batch; ``--workers N`` at whether there are more batches than it can use)."""
    usable = min(requested, usable_cores()) if requested is not None else 1
    return max(1, batch_size) * max(1, usable) + 1


def lookahead(items: Iterable[Input], count: int) -> tuple[int, Iterable[Input]]:
    """(how many inputs there are, up to `count`; the same inputs, none lost): a list is
    counted as it is, a stream is read `count` inputs ahead."""
    if isinstance(items, Sized):
        return len(items), items
    stream = iter(items)
    ahead = list(itertools.islice(stream, count))
    return len(ahead), itertools.chain(ahead, stream)


def _chunks(items: Iterable[Input], size: int) -> Iterator[list[Input]]:
    """Consecutive batches of `size` inputs (the last one shorter), taken when asked for."""
    stream = iter(items)
    while chunk := list(itertools.islice(stream, max(1, size))):
        yield chunk


def decoded_batches(
    items: Iterable[Input],
    spec: PreprocessSpec,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    jpeg_on_device: bool = False,
    prefetch: int | None = None,
    timeout: float | None = None,
    staging: bool | None = None,
    slots: int | None = None,
    device: torch.device | None = None,
    keeper: PoolKeeper | None = None,
) -> Generator[DecodedBatch, None, None]:
    """Batches of decoded inputs, in order, from `workers` processes (0: in this process).

    At most `prefetch` batches (default ``workers x 2``) are decoded ahead of the one the
    caller is using, and no more inputs are taken from `items` than those batches hold: a
    stream is read as the run goes.  Inputs already in memory are resized here; only files
    go to workers.

    `staging` (default: on unless ``CONVNEXT_STAGING=0``): when every crop has one shape,
    the crops are written into a shared staging ring of `slots` batches (default: those in
    flight plus :data:`~convnext_cli.engine.staging.SPARE_SLOTS`), page-locked once with
    `pin_memory` and workers (in-process, its batches are pinned one by one).  The caller
    calls ``DecodedBatch.release`` when done with each batch (a batch it keeps unreleased
    keeps its slot: later batches then take the pickle path).  `keeper`: see :func:`open_pool`.
    """
    chunks = _chunks(items, batch_size)
    shape = fixed_shape(spec)
    ahead = max(1, prefetch if prefetch is not None else workers * TASKS_PER_WORKER)
    ring = None
    if (
        shape is not None
        and (staging_enabled() if staging is None else staging)
        and (workers <= 0 or DecodePool.shares_memory())
    ):
        count = slots or ring_slots(ahead if workers > 0 else 0, batch_size, shape)
        # page-locked for worker runs only: in-process decoding also serves short calls (the
        # Ray actors' batches), where a registration per call would cost more than it saves
        try:
            pinned = pin_memory and workers > 0
            ring = StagingRing(count, batch_size, shape, pin=pinned, device=device)
        except (OSError, ValueError):  # no such mapping to be had: the pickle path
            ring = None
    try:
        if workers <= 0:
            batches = _decoded_here(chunks, spec, jpeg_on_device, ring)
        else:
            batches = _decoded_by_workers(
                chunks, spec, workers, jpeg_on_device, ahead, timeout, ring, keeper
            )
        try:
            for decoded in batches:
                yield decoded.pin_memory() if pin_memory else decoded
        finally:
            batches.close()  # stops the decode workers at once when the caller stops early
    finally:
        if ring is not None:
            ring.close()


def _decoded_here(
    chunks: Iterator[list[Input]],
    spec: PreprocessSpec,
    jpeg_on_device: bool,
    ring: StagingRing | None = None,
) -> Generator[DecodedBatch, None, None]:
    """Each chunk decoded in this process, one after the other."""
    start = 0
    for chunk in chunks:
        slot = ring.acquire(wait=True) if ring is not None else None
        pending = PendingBatch(start, chunk, ring, slot)
        for position, item in enumerate(chunk):
            pending.add(position, _prepare(item, spec, jpeg_on_device))
        start += len(chunk)
        yield pending.finish()


def split_tasks(files: list[T], workers: int) -> list[list[T]]:
    """A batch's files as one decode task per worker (at least :data:`MIN_TASK_FILES`
    files each): every worker starts on the first batches and a batch is decoded by all of
    them at once, instead of one worker decoding a whole batch of 256."""
    if not files:
        return []
    size = max(MIN_TASK_FILES, -(-len(files) // max(1, workers)))
    return [files[start : start + size] for start in range(0, len(files), size)]


def _decoded_by_workers(
    chunks: Iterator[list[Input]],
    spec: PreprocessSpec,
    workers: int,
    jpeg_on_device: bool,
    ahead: int,
    timeout: float | None,
    ring: StagingRing | None = None,
    keeper: PoolKeeper | None = None,
) -> Generator[DecodedBatch, None, None]:
    """Chunks decoded by a :class:`DecodePool` (`keeper`'s: see :func:`open_pool`), at most
    ``ahead`` batches in flight, handed over in order.  With a `ring`, a batch is sent to the
    workers only once it has a slot (while other batches are in flight it waits for one;
    with none in flight it goes without, by the pickle path)."""
    batches: dict[int, PendingBatch] = {}

    def done(task: Task, packed: dict[str, Any]) -> None:
        batches[task.batch].add_packed(packed)

    def error(task: Task, position: int, message: str) -> None:
        batches[task.batch].add(position, message)

    pool = open_pool(keeper, workers, spec, jpeg_on_device, timeout, done, error, ring)
    submitted = 0  # batches taken from the inputs
    start = 0  # the number of the next input
    number = 0  # the batch the caller gets next
    try:
        while True:
            while len(batches) < ahead:
                slot = ring.acquire() if ring is not None else None
                if ring is not None and slot is None and batches:
                    break  # every slot is in use: the batches in flight come first
                taken = next(chunks, None)
                if taken is None:
                    if ring is not None and slot is not None:
                        ring.release(*slot)
                    break
                if ring is not None and slot is None:
                    # nothing in flight: wait for the device's copy, or go without a slot
                    slot = ring.acquire(wait=True)
                pending = batches[submitted] = PendingBatch(start, taken, ring, slot)
                start += len(taken)
                files = []
                for position, item in enumerate(taken):
                    if isinstance(item, InMemoryImage):
                        pending.add(position, _prepare(item, spec, jpeg_on_device))
                    else:
                        files.append((position, item))
                for task in split_tasks(files, workers):
                    pool.submit(submitted, task, slot=pending.slot_index)
                submitted += 1
            if number not in batches:
                return  # the inputs have ended and every batch was handed over
            while batches[number].waiting > 0:
                pool.poll()
            decoded = batches.pop(number).finish()
            number += 1
            yield decoded
    finally:
        close_pool(keeper, pool)


NON_FINITE = "model produced non-finite values"
OUT_OF_MEMORY = "out of device memory even alone"
SCORE_KINDS = SCORES  # what classify's scores are (--scores): choices.py's table


def _model_failed(result: Result, pixels: torch.Tensor, exc: Exception) -> None:
    """One image the model could not run on: its own error record."""
    shape = "x".join(str(n) for n in pixels.shape)
    result.error = (
        f"the model cannot run on this image ({shape} after preprocessing): {one_line(exc)}"
    )
    result.predictions = []
    result.embedding = None
    result.features = None


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error: the batch is halved, the run goes on."""
    return isinstance(exc, torch.OutOfMemoryError)


# Words in a CUDA runtime error that no later batch survives (the context is poisoned).
_STICKY = ("cuda error", "illegal memory access", "device-side assert", "cublas_status",
           "cudnn_status", "cuda driver", "unspecified launch failure")  # fmt: skip


def is_device_failure(exc: BaseException) -> bool:
    """A device error other than out of memory (torch.AcceleratorError, or a RuntimeError
    reporting a CUDA error): every later batch would fail too, so the run stops."""
    if is_out_of_memory(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(word in text for word in _STICKY)


def device_failure(exc: BaseException) -> DeviceFailure:
    return DeviceFailure(
        f"the device failed, stopping (finished records kept): {one_line(exc)[:300]}"
    )


@dataclass
class Head:
    """What a command computes from a batch: `launch` runs the model on the device and
    returns its outputs (float32, one row per image); `store` puts those rows, once on the
    host, into the results."""

    launch: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    store: Callable[[tuple[torch.Tensor, ...], list[Result]], None]


@dataclass
class RunTimes:
    """Where a runner's time went, over every input it was given (for the CLI's summary)."""

    images: int = 0
    decode: float = 0.0  # seconds decoding (the decode processes' own, summed; else waited)
    # seconds in the model, results on the host: on CUDA the device's own time per batch (its
    # events), elsewhere the host's
    model: float = 0.0


@dataclass
class _RunPlan:
    """How one run goes: its inputs, batch size, decoding processes, model threads."""

    paths: Iterable[Input]
    batch_size: int
    workers: int
    prefetch: int
    threads: int  # the model's CPU threads when the tuner may change them, else 0
    tuner: ThreadTuner | None


def _device_errors(
    stage: Generator[DeviceBatch, None, None],
) -> Generator[DeviceBatch, None, None]:
    """`stage`, a device error raised in the decode thread as :class:`DeviceFailure`."""
    try:
        yield from stage
    except Exception as exc:
        if is_device_failure(exc):
            raise device_failure(exc) from exc
        raise


class Runner:
    """A loaded model on a device, turning paths into results batch by batch.

    On CUDA a batch is copied to the device on a side stream from pinned memory, runs on
    the compute stream, and its results are read back `read_behind` (2) batches behind
    (batches i+1 and i+2 are queued before batch i's outputs are waited for, so that a fast
    compiled model never waits for the host): `overlap` is on for CUDA, off on the CPU,
    where there is nothing to overlap and results come as soon as they are computed.
    A CUDA out-of-memory error halves the batch for the rest of the run (one note); any
    other CUDA error raises :class:`DeviceFailure` (exit 70, finished records kept).
    With ``--compile``, and on CUDA always, every group is padded to the run's batch size
    and the padding rows dropped, so the compiled model sees one shape and compiles once,
    and cuDNN's autotuner sees one shape (a last, short batch or one shrunk by errors is no
    new shape).  On CUDA ``times.model`` is the device's own time per batch, from an event
    where its work begins to the event after its outputs' copy to the host.
    """

    def __init__(
        self,
        model: ConvNeXtForClassification,
        spec: PreprocessSpec,
        device: torch.device,
        dtype: torch.dtype,
        channels_last: bool = True,
        jpeg_on_device: bool = False,
    ) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last
        self.jpeg_on_device = jpeg_on_device  # decode JPEGs on `device` (see gpu_jpeg)
        self.labels = model.config.labels
        # what runs a batch: the model itself, or torch.compile'd versions of it
        self.logits_fn: Any = model
        self.embed_fn: Any = model.embed
        self.compiled = False
        self.overlap = device.type == "cuda"  # read results back behind the batches queued
        self.read_behind = READ_BEHIND  # with overlap: batches queued ahead of the one read
        self.on_note: Callable[[str], None] | None = None  # hears the out-of-memory note
        self.max_rows: int | None = None  # the batch after an out-of-memory error
        self.pad_rows: int | None = None  # compiled: the one batch shape (set per run)
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stats_ready = False
        self._copy_stream: Any = None
        self.times = RunTimes()
        # decode pools kept between runs (convnext serve sets one); None: forked per run
        self.decode_pools: PoolKeeper | None = None

    def compile(self, mode: str = "default") -> None:
        """torch.compile the model (on the plain path: Inductor does its own fusion).

        ``mode`` is one of :data:`~convnext_cli.choices.COMPILE_MODES`.  ``reduce-overhead``
        (CUDA graphs) needs CUDA: elsewhere torch would skip the graphs without a word, so
        it compiles as ``default`` with a note.  ``max-autotune`` off CUDA is the same as
        ``max-autotune-no-cudagraphs``.  The mode used is kept in ``compile_mode``."""
        from convnext_cli.choices import COMPILE_MODES
        from convnext_cli.model.cpu_fusion import unfuse_blocks

        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {mode!r}: choose from {', '.join(COMPILE_MODES)}")
        if mode == "reduce-overhead" and self.device.type != "cuda":
            if self.on_note is not None:
                self.on_note(
                    f"--compile-mode reduce-overhead uses CUDA graphs, which need a CUDA "
                    f"device: compiling as default on {self.device.type}"
                )
            mode = "default"
        unfuse_blocks(self.model)
        # dynamic=False: one static shape, which the padding in _to_input keeps constant
        # (CUDA graphs need exactly that: reduce-overhead records one graph per shape)
        self.logits_fn = torch.compile(self.model, dynamic=False, mode=mode)
        self.embed_fn = torch.compile(self.model.embed, dynamic=False, mode=mode)
        self.compiled = True
        self.compile_mode = mode

    @property
    def pads_batches(self) -> bool:
        """Whether every batch is padded to the run's batch size: compiled (one shape for the
        graph) and on CUDA (one shape for cuDNN's autotuner, eager too)."""
        return self.compiled or self.device.type == "cuda"

    def _begin_event(self) -> Any:
        """On CUDA, a timing event on the compute stream where a batch's work begins (after
        its device decoding, before its copy is waited for): the batch's model time is from
        it to its readback's event, the device's own time, waits for the copy included."""
        if self.device.type != "cuda":
            return None
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
        return begin

    def copy_stream(self) -> Any:
        """The CUDA side stream the host-to-device copies run on (created once)."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        return self._copy_stream

    def _normalization(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """mean/std on the device, built once (see PreprocessSpec.normalization)."""
        if not self._stats_ready:
            self._stats = self.spec.normalization(self.device)
            self._stats_ready = True
        return self._stats

    def _to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels on the device: on CUDA, copied on a side stream (from pinned memory
        the copy overlaps the model), which the compute stream then waits for."""
        if pixels.device == self.device or self.device.type != "cuda":
            return pixels.to(self.device, non_blocking=True)
        copy_stream = self.copy_stream()
        compute = torch.cuda.current_stream(self.device)
        # no wait on the compute stream: the copy of batch i+1 runs while batch i computes
        # (its pinned source is held by the caching host allocator until the copy is done;
        # its device block is marked used by the compute stream below)
        with torch.cuda.stream(copy_stream):
            batch = pixels.to(self.device, non_blocking=True)
        compute.wait_stream(copy_stream)
        batch.record_stream(compute)
        return batch

    def _to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, h, w) on the host -> normalised model input on the device, padded
        with zero rows to the compiled batch shape when there is one."""
        batch = self._to_device(pixels)
        batch = self.spec.normalize(batch, self.dtype, self._normalization())
        rows = self.pad_rows
        if rows is not None and batch.shape[0] < rows:
            padding = batch.new_zeros((rows - batch.shape[0], *batch.shape[1:]))
            batch = torch.cat([batch, padding])
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _run(
        self, paths: Iterable[Input], batch_size: int | None, workers: int | None, head: Head
    ) -> Iterator[list[Result]]:
        plan = self._plan(paths, batch_size, workers)
        batches = self._batches(plan)
        # batches queued on the device whose results are not read yet (CUDA: read_behind)
        queued: deque[tuple[list[Result], Readback, float]] = deque()
        depth = self.read_behind if self.overlap else 0
        times = self.times
        try:
            waited = time.perf_counter()
            for batch in batches:
                got = time.perf_counter()
                decoded = batch.decoded if isinstance(batch, DeviceBatch) else batch
                times.decode += decoded.decoding if plan.workers > 0 else got - waited
                results = [
                    Result(path=input_name(item), error=err, source=source_of(item))
                    for item, err in zip(decoded.inputs, decoded.errors, strict=True)
                ]
                readback = self._queue(head, batch, results)
                decoded.release(readback.event)  # its slot is reused once the copy is consumed
                if readback.begin is None:  # else the device's own time, read at _finish
                    times.model += time.perf_counter() - got
                times.images += len(results)
                # the decoders' load: their seconds on this batch, per decoding process
                load = decoded.decoding / plan.workers if plan.workers > 0 else 0.0
                queued.append((results, readback, load))
                while len(queued) > depth:
                    yield self._finish(queued.popleft(), plan.tuner)
                waited = time.perf_counter()
            while queued:
                yield self._finish(queued.popleft(), plan.tuner)
        finally:
            batches.close()  # stops the decode workers at once when the caller stops early
            self.pad_rows = None  # the compiled shape is this run's
            if plan.tuner is not None and torch.get_num_threads() != plan.threads:
                torch.set_num_threads(plan.threads)

    def _plan(
        self, paths: Iterable[Input], batch_size: int | None, workers: int | None
    ) -> _RunPlan:
        """The batch size, decoding processes and thread tuning of one run."""
        if batch_size is None:
            batch_size = default_batch_size(self.device.type, self._image_size(), self.device)
        known, paths = lookahead(paths, planning_lookahead(workers, batch_size))
        threads = self._tunable_threads()
        workers, prefetch = plan_workers(
            workers, known, batch_size, self.device.type, tuned=threads > 1
        )
        tuner = None
        if threads > 1 and workers > 0 and prefetch > 1 and known > batch_size:
            # every core for the model, or the decoders' cores left to them: measured
            tuner = ThreadTuner([threads, max(1, threads - workers)], settle=prefetch)
        if self.pads_batches:
            self.pad_rows = min(batch_size, self.max_rows or batch_size)
        return _RunPlan(paths, batch_size, workers, prefetch, threads, tuner)

    def _batches(self, plan: _RunPlan) -> Generator[DecodedBatch | DeviceBatch, None, None]:
        """The run's decoded batches; with ``jpeg_on_device``, their JPEGs decoded and
        resized on the device in a background thread (:mod:`.gpu.device_decode`), what the
        device decoder rejects decoded again by a small pool of decode workers."""
        pin = self.device.type == "cuda"
        batches = decoded_batches(
            plan.paths,
            self.spec,
            plan.batch_size,
            plan.workers,
            pin,
            jpeg_on_device=self.jpeg_on_device,
            prefetch=plan.prefetch,
            device=self.device,
            staging=False if self.decode_pools is not None else None,  # see PoolKeeper
            keeper=self.decode_pools,
        )
        if not self.jpeg_on_device:
            return batches
        rejects = RejectDecoder(self.spec)
        rejects.start()  # its workers forked here, from the main thread
        decoder = DeviceDecoder(self.spec, self.device, rejects, is_device_failure)
        stage = in_thread(batches, decoder, on_stop=rejects.cancel, on_exit=rejects.close)
        return _device_errors(stage)

    def _queue(
        self, head: Head, batch: DecodedBatch | DeviceBatch, results: list[Result]
    ) -> Readback:
        """Queue the model on a batch's groups (the device-decoded ones merged with the host
        groups of their shape); its outputs are on their way to the host."""
        parts: list[tuple[list[Result], tuple[torch.Tensor, ...]]] = []
        with torch.inference_mode():
            if isinstance(batch, DeviceBatch):
                groups = self._merged(batch.decoded.groups, batch.take(self.device))
            else:
                groups = batch.groups
            begin = self._begin_event()
            for positions, pixels in groups:
                self._launch(head, pixels, [results[p] for p in positions], parts)
            return Readback(parts, head, begin)

    def _merged(
        self,
        host: list[tuple[list[int], torch.Tensor]],
        on_device: list[tuple[list[int], torch.Tensor]],
    ) -> list[tuple[list[int], torch.Tensor]]:
        """Host and device groups, one per shape (host pixels copied where they join)."""
        merged = []
        for members in group_by_shape([*host, *on_device], lambda g: tuple(g[1].shape[1:])):
            if len(members) == 1:
                merged.append(members[0])
                continue
            positions = [p for group, _ in members for p in group]
            merged.append((positions, torch.cat([self._to_device(t) for _, t in members])))
        return merged

    def _finish(
        self, done: tuple[list[Result], Readback, float], tuner: ThreadTuner | None
    ) -> list[Result]:
        """A batch's results, once its outputs are on the host."""
        results, readback, load = done
        try:
            readback.finish()
        except Exception as exc:
            if is_device_failure(exc):
                raise device_failure(exc) from exc
            raise
        if readback.seconds is not None:
            self.times.model += readback.seconds
        if tuner is not None and (changed := tuner.batch_done(len(results), load)):
            torch.set_num_threads(changed)
        return results

    def _image_size(self) -> int:
        crop = self.spec.crop_size
        if self.spec.do_center_crop and crop:
            return max(crop)
        return int(self.spec.shortest_edge) if self.spec.do_resize else 224

    def _tunable_threads(self) -> int:
        """The model's CPU threads when :class:`ThreadTuner` may change them during a run,
        else 0: a float32, eager run on the CPU whose thread count the user did not set
        (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, or ``torch.set_num_threads`` before the
        run, which the tuner would not know to keep)."""
        if self.device.type != "cpu" or self.dtype != torch.float32 or self.compiled:
            return 0
        if any(os.environ.get(name) for name in THREAD_ENV):
            return 0
        threads = torch.get_num_threads()
        return threads if threads == DEFAULT_THREADS else 0

    def _outputs(self, head: Head, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = pixels.shape[0]
        return tuple(out[:rows] for out in head.launch(self._to_input(pixels)))

    def _out_of_memory(self, rows: int) -> None:
        """Halve the batch for the rest of the run, with one note."""
        smaller = max(1, rows // 2)
        if self.max_rows is None and self.on_note is not None:
            self.on_note(
                f"the device ran out of memory at batch {rows}; going on with batch {smaller} "
                "(-b sets it)"
            )
        self.max_rows = smaller
        if self.pad_rows is not None:
            self.pad_rows = smaller
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _launch(
        self,
        head: Head,
        pixels: torch.Tensor,
        results: list[Result],
        parts: list[tuple[list[Result], tuple[torch.Tensor, ...]]],
    ) -> None:
        """Queue `head` on a group (in slices of at most `max_rows`); if it raises, run its
        images one by one, so that only the image the model cannot take (say, too small with
        resizing off) gets the error.  Out of memory: halve and retry; another device error:
        :class:`DeviceFailure`."""
        rows = len(results)
        limit = self.max_rows
        if limit is not None and rows > limit:
            for start in range(0, rows, limit):
                part = results[start : start + limit]
                self._launch(head, pixels[start : start + limit], part, parts)
            return
        try:
            parts.append((results, self._outputs(head, pixels)))
            return
        except Exception as exc:
            if is_device_failure(exc):
                raise device_failure(exc) from exc
            if is_out_of_memory(exc) and rows > 1:
                self._out_of_memory(rows)
                self._launch(head, pixels, results, parts)
                return
            if rows == 1:
                _model_failed(results[0], pixels[0], exc)
                return
        for one, result in zip(pixels, results, strict=True):
            try:
                parts.append(([result], self._outputs(head, one[None])))
            except Exception as exc:
                if is_device_failure(exc):
                    raise device_failure(exc) from exc
                _model_failed(result, one, exc)

    def classify(
        self,
        paths: Iterable[Input],
        top_k: int = 5,
        batch_size: int | None = None,
        workers: int | None = None,
        scores: str = "probs",
    ) -> Iterator[list[Result]]:
        """Top-k predictions for every path, one list of results per batch (`paths` may be a
        stream: it is read as the batches go).  `scores`: ``probs`` (softmax), ``logits``
        or ``log-probs`` (log-softmax); the ranking is the same for all three.  A `top_k` of
        0 or more than the classes gives every class."""
        if scores not in SCORE_KINDS:
            from convnext_cli.errors import UsageError

            raise UsageError(f"--scores {scores!r}: use {', '.join(SCORE_KINDS)}")
        if not self.labels:
            from convnext_cli.errors import UsageError

            raise UsageError(
                "this checkpoint has no classification head (a feature model): use `convnext embed`"
            )
        k = len(self.labels) if top_k <= 0 else max(1, min(top_k, len(self.labels)))

        def launch_top_k(batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
            logits = self.logits_fn(batch).float()
            if scores == "logits":
                values = logits
            elif scores == "log-probs":
                values = logits.log_softmax(dim=-1)
            else:
                values = logits.softmax(dim=-1)
            finite = (torch.isfinite(logits) & torch.isfinite(values)).all(dim=-1)
            top, indices = values.topk(k, dim=-1)
            return finite, top, indices

        def put_top_k(outputs: tuple[torch.Tensor, ...], results: list[Result]) -> None:
            finite, top, indices = (out.tolist() for out in outputs)
            for result, ok, row_scores, row_indices in zip(
                results, finite, top, indices, strict=True
            ):
                if not ok:
                    result.error = NON_FINITE
                    continue
                result.predictions = [
                    Prediction(self.labels[i], i, s)
                    for s, i in zip(row_scores, row_indices, strict=True)
                ]

        return self._run(paths, batch_size, workers, Head(launch_top_k, put_top_k))

    def embed(
        self,
        paths: Iterable[Input],
        normalize: bool = False,
        batch_size: int | None = None,
        workers: int | None = None,
        stages: list[str] | None = None,
        pool: str = "avg",
        backbone: bool = False,
    ) -> Iterator[list[Result]]:
        """The pooled feature (transformers' pooler_output) for every path, per batch.

        With `stages` (``stem``, ``stage1`` ..) or `backbone`, each result's ``features``
        holds those stages' outputs instead (see :func:`stage_request`): globally
        average-pooled to (C,) (`pool` ``avg``) or the whole (C, H, W) map (``none``).
        """
        if stages or backbone:
            chosen = stage_request(self.model.config, stages, backbone)
            return self._run(
                paths, batch_size, workers, self._put_stages(chosen, pool, backbone, normalize)
            )

        def features(batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.embed_fn(batch).float()
            if normalize:
                out = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return torch.isfinite(out).all(dim=-1), out

        def put_embeddings(outputs: tuple[torch.Tensor, ...], results: list[Result]) -> None:
            finite, rows = outputs
            for result, ok, row in zip(results, finite.tolist(), rows, strict=True):
                if ok:
                    result.embedding = row
                else:
                    result.error = NON_FINITE

        return self._run(paths, batch_size, workers, Head(features, put_embeddings))

    def _put_stages(self, stages: list[str], pool: str, backbone: bool, normalize: bool) -> Head:
        body = self.model.backbone

        def launch_stages(batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
            maps = [m.float() for m in body.stage_maps(batch, stages, backbone)]
            if pool == "avg":
                maps = [m.mean(dim=(-2, -1)) for m in maps]
                if normalize:
                    maps = [m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12) for m in maps]
            finite = torch.stack([torch.isfinite(m.flatten(1)).all(dim=1) for m in maps]).all(0)
            return (finite, *maps)

        def put_stages(outputs: tuple[torch.Tensor, ...], results: list[Result]) -> None:
            finite, *rows = outputs
            for n, (result, ok) in enumerate(zip(results, finite.tolist(), strict=True)):
                if ok:
                    result.features = {name: m[n] for name, m in zip(stages, rows, strict=True)}
                else:
                    result.error = NON_FINITE

        return Head(launch_stages, put_stages)


def stage_request(config: Any, stages: list[str] | None, backbone: bool) -> list[str]:
    """The stages ``embed --stage`` / ``--backbone`` gives, checked against the model.

    Without `stages`, ``--backbone`` gives the config.json's ``out_features`` (else every
    stage whose LayerNorm the checkpoint holds); with `backbone` every stage must have
    its LayerNorm in the checkpoint, as transformers' ``ConvNextBackbone`` has.
    """
    from convnext_cli.errors import UsageError

    names = config.stage_names
    if backbone and not config.backbone_norms:
        raise UsageError(
            "--backbone: this checkpoint holds no backbone LayerNorms "
            "(hidden_states_norms.*, as transformers' ConvNextBackbone saves); "
            "use --stage NAME for the plain stage outputs"
        )
    if not stages:  # --backbone alone
        stages = list(config.out_features or config.backbone_norms)
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise UsageError(f"--stage {unknown[0]}: this model's stages are {', '.join(names)}")
    stages = list(dict.fromkeys(stages))
    missing = [s for s in stages if s not in config.backbone_norms]
    if backbone and missing:
        held = ", ".join(config.backbone_norms) or "none"
        raise UsageError(
            f"--backbone: the checkpoint has no LayerNorm for {', '.join(missing)} "
            f"(hidden_states_norms.*; it has: {held}); drop --backbone for the plain stage output"
        )
    return stages
