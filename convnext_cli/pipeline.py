"""The streaming pipeline shared by classify and embed.

Decode worker processes (:mod:`convnext_cli.decode_pool`) read, decode and resize (uint8)
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
from collections.abc import Generator, Iterable, Iterator, Sized
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from convnext_cli.decode_pool import (
    TASKS_PER_WORKER,
    DecodePool,
    Task,
    decode_one,
    decode_timeout,
    failure,
    unpack_groups,
)
from convnext_cli.errors import one_line
from convnext_cli.gpu_jpeg import EncodedJpeg
from convnext_cli.images import decode_bytes
from convnext_cli.inputs import InputRef, input_id
from convnext_cli.model import ConvNeXtForClassification
from convnext_cli.preprocess import PreprocessSpec
from convnext_cli.thread_tuner import ThreadTuner

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # a thread count the user chose
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice (the physical cores)


@dataclass
class Prediction:
    label: str
    index: int
    score: float


@dataclass
class Result:
    """The outcome for one input: predictions (classify) or an embedding (embed), or an error."""

    path: str
    error: str | None = None
    predictions: list[Prediction] = field(default_factory=list)
    embedding: torch.Tensor | None = None  # 1-D float32 on the CPU
    # the input it is for (a file path, a tar member or Parquet row), when known: the HTML
    # report embeds its bytes, never a file that the path (a dataset's id) may name
    source: InputRef | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class InMemoryImage:
    """An input that is already pixels (from the Python API): nothing to read or decode.

    `pixels` is an RGB uint8 (3, H, W) tensor, already converted per the decoding policy,
    or None with `error` saying why it could not be; `name` is what its result's ``path``
    says (``<image N>``).
    """

    name: str
    pixels: torch.Tensor | None
    error: str | None = None


Input = InputRef | InMemoryImage  # a file path, a dataset member or row, or pixels


def _source(item: Input) -> InputRef | None:
    return None if isinstance(item, InMemoryImage) else item


def input_name(item: Input) -> str:
    """What the input's record says as ``path``."""
    return item.name if isinstance(item, InMemoryImage) else input_id(item)


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


@dataclass
class DecodedBatch:
    """One batch as the decoders hand it over: per-input errors, and the pixels stacked by
    shape (one group unless resizing is off); with ``pin_memory`` the whole uint8 group is
    pinned once, so that its host-to-device copy can run asynchronously."""

    indices: list[int]  # the inputs' numbers in the whole run
    inputs: list[Input]
    errors: list[str | None]
    groups: list[tuple[list[int], torch.Tensor]]  # positions in the batch, (n, 3, h, w) uint8
    encoded: list[tuple[int, EncodedJpeg]] = field(default_factory=list)  # for the device
    decoding: float = 0.0  # seconds the decoding processes spent on it (reading included)

    def pin_memory(self) -> DecodedBatch:
        groups = [(positions, pixels.pin_memory()) for positions, pixels in self.groups]
        return replace(self, groups=groups)


class _PendingBatch:
    """A batch being assembled from what the decoders return, in any order."""

    def __init__(self, start: int, inputs: list[Input]) -> None:
        self.indices = list(range(start, start + len(inputs)))
        self.inputs = inputs
        self.errors: list[str | None] = [None] * len(inputs)
        self.waiting = len(inputs)
        self.parts: list[tuple[list[int], torch.Tensor]] = []
        self.encoded: list[tuple[int, EncodedJpeg]] = []
        self.decoding = 0.0

    def add(self, position: int, outcome: Any) -> None:
        if isinstance(outcome, str):
            self.errors[position] = outcome
        elif isinstance(outcome, EncodedJpeg):
            self.encoded.append((position, outcome))
        else:
            self.parts.append(([position], outcome[None]))
        self.waiting -= 1

    def add_packed(self, packed: dict[str, Any]) -> None:
        for position, error in packed["errors"]:
            self.errors[position] = error
        self.encoded += packed["encoded"]
        self.decoding += packed.get("seconds", 0.0)
        groups = unpack_groups(packed)
        self.parts += groups
        self.waiting -= len(packed["errors"]) + len(packed["encoded"])
        self.waiting -= sum(len(positions) for positions, _ in groups)

    def finish(self) -> DecodedBatch:
        by_shape: dict[tuple[int, ...], list[tuple[list[int], torch.Tensor]]] = {}
        for positions, pixels in self.parts:
            by_shape.setdefault(tuple(pixels.shape[1:]), []).append((positions, pixels))
        groups = []
        for parts in by_shape.values():
            if len(parts) == 1:
                groups.append(parts[0])
            else:
                positions = [p for part, _ in parts for p in part]
                groups.append((positions, torch.cat([pixels for _, pixels in parts])))
        self.encoded.sort(key=lambda item: item[0])
        return DecodedBatch(
            self.indices, self.inputs, self.errors, groups, self.encoded, self.decoding
        )


def default_batch_size(device_type: str) -> int:
    """8 on the CPU, where larger batches spill the activations out of cache (measured on
    2 cores, convnext-tiny bfloat16: 69 images/s at batch 8, 41 at batch 32); 32 on a GPU."""
    return 8 if device_type == "cpu" else 32


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_workers(num_inputs: int, batch_size: int, device_type: str = "cpu") -> int:
    """Decoding processes that overlap the model: none for a single batch; on a GPU, the
    cores but one (at most 8); on the CPU one per four cores (at most 8).

    On the CPU the model's threads already use every core, and a decoder process fighting
    them for cores costs more than it overlaps (measured on 2 cores: bfloat16, 100 photos,
    5.7 s in-process against 7.3 s with one worker), so only one in four cores decodes.
    When this is 0, :class:`Runner` still decodes in one guard process, batch by batch
    without overlap (see :func:`plan_workers`).
    """
    if num_inputs <= batch_size:
        return 0
    cores = usable_cores()
    if device_type == "cpu":
        return min(8, cores // 4)
    return max(1, min(8, cores - 1))


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
      measuring, see :mod:`convnext_cli.thread_tuner`) and more than one batch, the guard
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
) -> Generator[DecodedBatch, None, None]:
    """Batches of decoded inputs, in order, from `workers` processes (0: in this process).

    At most `prefetch` batches (default ``workers x 2``) are decoded ahead of the one the
    caller is using, and no more inputs are taken from `items` than those batches hold: a
    stream is read as the run goes.  Inputs already in memory are resized here; only files
    go to workers.
    """
    chunks = _chunks(items, batch_size)
    if workers <= 0:
        batches = _decoded_here(chunks, spec, jpeg_on_device)
    else:
        ahead = max(1, prefetch if prefetch is not None else workers * TASKS_PER_WORKER)
        wait = decode_timeout() if timeout is None else timeout
        batches = _decoded_by_workers(chunks, spec, workers, jpeg_on_device, ahead, wait)
    try:
        for decoded in batches:
            yield decoded.pin_memory() if pin_memory else decoded
    finally:
        batches.close()  # stops the decode workers at once when the caller stops early


def _decoded_here(
    chunks: Iterator[list[Input]], spec: PreprocessSpec, jpeg_on_device: bool
) -> Generator[DecodedBatch, None, None]:
    """Each chunk decoded in this process, one after the other."""
    start = 0
    for chunk in chunks:
        pending = _PendingBatch(start, chunk)
        for position, item in enumerate(chunk):
            pending.add(position, _prepare(item, spec, jpeg_on_device))
        start += len(chunk)
        yield pending.finish()


def _decoded_by_workers(
    chunks: Iterator[list[Input]],
    spec: PreprocessSpec,
    workers: int,
    jpeg_on_device: bool,
    ahead: int,
    timeout: float,
) -> Generator[DecodedBatch, None, None]:
    """Chunks decoded by a :class:`DecodePool`, at most ``ahead`` batches in flight, handed
    over in order."""
    batches: dict[int, _PendingBatch] = {}

    def done(task: Task, packed: dict[str, Any]) -> None:
        batches[task.batch].add_packed(packed)

    def error(task: Task, position: int, message: str) -> None:
        batches[task.batch].add(position, message)

    pool = DecodePool(workers, spec, jpeg_on_device, timeout, done, error)
    submitted = 0  # batches taken from the inputs
    start = 0  # the number of the next input
    number = 0  # the batch the caller gets next
    try:
        while True:
            while len(batches) < ahead:
                taken = next(chunks, None)
                if taken is None:
                    break
                pending = batches[submitted] = _PendingBatch(start, taken)
                start += len(taken)
                files = []
                for position, item in enumerate(taken):
                    if isinstance(item, InMemoryImage):
                        pending.add(position, _prepare(item, spec, jpeg_on_device))
                    else:
                        files.append((position, item))
                if files:
                    pool.submit(submitted, files)
                submitted += 1
            if number not in batches:
                return  # the inputs have ended and every batch was handed over
            while batches[number].waiting > 0:
                pool.poll()
            decoded = batches.pop(number).finish()
            number += 1
            yield decoded
    finally:
        pool.close()


NON_FINITE = "model produced non-finite values"


def _model_failed(result: Result, pixels: torch.Tensor, exc: Exception) -> None:
    """One image the model could not run on: its own error record."""
    shape = "x".join(str(n) for n in pixels.shape)
    result.error = (
        f"the model cannot run on this image ({shape} after preprocessing): {one_line(exc)}"
    )
    result.predictions = []
    result.embedding = None


class Runner:
    """A loaded model on a device, turning paths into results batch by batch."""

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

    def compile(self) -> None:
        """torch.compile the model (on the plain path: Inductor does its own fusion)."""
        from convnext_cli.cpu_fusion import unfuse_blocks

        unfuse_blocks(self.model)
        self.logits_fn = torch.compile(self.model)
        self.embed_fn = torch.compile(self.model.embed)
        self.compiled = True

    def _to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, h, w) on the host -> normalised model input on the device."""
        batch = pixels.to(self.device, non_blocking=True)
        batch = self.spec.normalize(batch, self.dtype)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _run(
        self, paths: Iterable[Input], batch_size: int | None, workers: int | None, fn: Any
    ) -> Iterator[list[Result]]:

        if batch_size is None:
            batch_size = default_batch_size(self.device.type)
        known, paths = lookahead(paths, planning_lookahead(workers, batch_size))
        threads = self._tunable_threads()
        workers, prefetch = plan_workers(
            workers, known, batch_size, self.device.type, tuned=threads > 1
        )
        tuner = None
        if threads > 1 and workers > 0 and prefetch > 1 and known > batch_size:
            # every core for the model, or the decoders' cores left to them: measured
            tuner = ThreadTuner([threads, max(1, threads - workers)], settle=prefetch)
        pin = self.device.type == "cuda"
        batches = decoded_batches(
            paths,
            self.spec,
            batch_size,
            workers,
            pin,
            jpeg_on_device=self.jpeg_on_device,
            prefetch=prefetch,
        )
        try:
            for decoded in batches:
                results = [
                    Result(path=input_name(item), error=err, source=_source(item))
                    for item, err in zip(decoded.inputs, decoded.errors, strict=True)
                ]
                with torch.inference_mode():
                    groups = decoded.groups
                    if decoded.encoded:
                        groups = self._with_device_decoded(groups, decoded.encoded, results)
                    for positions, pixels in groups:
                        self._forward(fn, pixels, [results[p] for p in positions])
                # the decoders' load: their seconds on this batch, per decoding process
                load = decoded.decoding / workers if workers > 0 else 0.0
                if tuner is not None and (changed := tuner.batch_done(len(results), load)):
                    torch.set_num_threads(changed)
                yield results
        finally:
            batches.close()  # stops the decode workers at once when the caller stops early
            if tuner is not None and torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

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

    def _forward(self, fn: Any, pixels: torch.Tensor, results: list[Result]) -> None:
        """Run `fn` on a group; if it raises, run its images one by one, so that only the
        image the model cannot take (say, too small with resizing off) gets the error."""
        try:
            fn(self._to_input(pixels), results)
            return
        except Exception as exc:
            if len(results) == 1:
                _model_failed(results[0], pixels[0], exc)
                return
        for one, result in zip(pixels, results, strict=True):
            try:
                fn(self._to_input(one[None]), [result])
            except Exception as exc:
                _model_failed(result, one, exc)

    def _with_device_decoded(
        self,
        groups: list[tuple[list[int], torch.Tensor]],
        encoded: list[tuple[int, EncodedJpeg]],
        results: list[Result],
    ) -> list[tuple[list[int], torch.Tensor]]:
        """Decode a batch's JPEGs on the device, resize them there, and merge them into the
        host-decoded groups of the same shape.  A JPEG the device decoder rejects is decoded
        on the CPU instead; one that fails there too gets its error in `results`."""

        from convnext_cli import gpu_jpeg

        images = gpu_jpeg.decode([e for _, e in encoded], self.device)
        # shape -> (positions in the batch, (n, 3, h, w) uint8 tensors on the device)
        by_shape: dict[tuple[int, ...], tuple[list[int], list[torch.Tensor]]] = {}
        for positions, pixels in groups:
            by_shape[tuple(pixels.shape[1:])] = (
                list(positions),
                [pixels.to(self.device, non_blocking=True)],
            )
        for (position, jpeg), image in zip(encoded, images, strict=True):
            try:
                pixels = self.spec.resize_and_crop(
                    decode_bytes(jpeg.data) if image is None else image
                )
            except Exception as exc:
                results[position].error = failure(exc)
                continue
            positions, tensors = by_shape.setdefault(tuple(pixels.shape), ([], []))
            positions.append(position)
            tensors.append(pixels.to(self.device)[None])
        return [
            (positions, tensors[0] if len(tensors) == 1 else torch.cat(tensors))
            for positions, tensors in by_shape.values()
            if positions
        ]

    def classify(
        self,
        paths: Iterable[Input],
        top_k: int = 5,
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> Iterator[list[Result]]:
        """Top-k softmax predictions for every path, one list of results per batch (`paths`
        may be a stream: it is read as the batches go)."""
        if not self.labels:
            from convnext_cli.errors import UsageError

            raise UsageError(
                "this checkpoint has no classification head (a feature model): use `convnext embed`"
            )
        k = max(1, min(top_k, len(self.labels)))

        def put_top_k(batch: torch.Tensor, results: list[Result]) -> None:
            logits = self.logits_fn(batch).float()
            probs = logits.softmax(dim=-1)
            finite = (torch.isfinite(logits) & torch.isfinite(probs)).all(dim=-1)
            scores, indices = probs.topk(k, dim=-1)
            for result, ok, row_scores, row_indices in zip(
                results,
                finite.cpu().tolist(),
                scores.cpu().tolist(),
                indices.cpu().tolist(),
                strict=True,
            ):
                if not ok:
                    result.error = NON_FINITE
                    continue
                result.predictions = [
                    Prediction(self.labels[i], i, s)
                    for s, i in zip(row_scores, row_indices, strict=True)
                ]

        return self._run(paths, batch_size, workers, put_top_k)

    def embed(
        self,
        paths: Iterable[Input],
        normalize: bool = False,
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> Iterator[list[Result]]:
        """The pooled feature (transformers' pooler_output) for every path, per batch."""

        def put_embeddings(batch: torch.Tensor, results: list[Result]) -> None:
            features = self.embed_fn(batch).float()
            if normalize:
                features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            finite = torch.isfinite(features).all(dim=-1)
            for result, ok, row in zip(results, finite.cpu().tolist(), features.cpu(), strict=True):
                if ok:
                    result.embedding = row
                else:
                    result.error = NON_FINITE

        return self._run(paths, batch_size, workers, put_embeddings)
