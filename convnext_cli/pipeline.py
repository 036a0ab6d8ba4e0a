"""The streaming pipeline shared by classify and embed.

DataLoader worker processes decode and resize (uint8) while the model runs on the previous
batch; the main process normalises on the target device, runs the model and yields one
list of results per batch, in input order.  Memory is bounded by the batches in flight
(``workers x prefetch``), never by the number of inputs.  Every input yields exactly one
result: its predictions or embedding, or the one-line reason it could not be read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from convnext_cli.errors import ImageError, one_line
from convnext_cli.images import decode_bytes, read_file
from convnext_cli.jpeg_on_device import EncodedJpeg, for_device
from convnext_cli.preprocess import PreprocessSpec

if TYPE_CHECKING:
    import torch

    from convnext_cli.model import ConvNeXtForClassification


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


def _failure(exc: Exception) -> str:
    """The one-line reason an input could not be decoded."""
    if isinstance(exc, ImageError):
        return one_line(exc)
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    return f"cannot decode image: {one_line(exc)}"  # a decoder bug must not end the run


class DecodeDataset:
    """Map-style dataset: path -> (index, pixels or None, error or None).

    The pixels are a uint8 (3, h, w) tensor, resized and cropped; or, when JPEGs are
    decoded on the model's device, an :class:`EncodedJpeg` holding the file's bytes.
    """

    def __init__(
        self, paths: Sequence[str], spec: PreprocessSpec, jpeg_on_device: bool = False
    ) -> None:
        self.paths = paths
        self.spec = spec
        self.jpeg_on_device = jpeg_on_device

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Any, str | None]:
        try:
            data = read_file(self.paths[index])
            if self.jpeg_on_device:
                encoded = for_device(data)
                if encoded is not None:
                    return index, encoded, None
            return index, self.spec.resize_and_crop(decode_bytes(data)), None
        except Exception as exc:
            return index, None, _failure(exc)


@dataclass
class DecodedBatch:
    """One batch as a worker hands it over: per-input errors, and the pixels stacked by shape.

    Stacking happens in the worker, so that with ``pin_memory`` the whole uint8 batch is
    pinned once and its host-to-device copy can run asynchronously.
    """

    indices: list[int]
    errors: list[str | None]
    groups: list[tuple[list[int], torch.Tensor]]  # positions in the batch, (n, 3, h, w) uint8
    encoded: list[tuple[int, EncodedJpeg]] = field(default_factory=list)  # for the device

    def pin_memory(self) -> DecodedBatch:
        groups = [(positions, pixels.pin_memory()) for positions, pixels in self.groups]
        return DecodedBatch(self.indices, self.errors, groups, self.encoded)


def _collate(items: list[tuple[int, Any, str | None]]) -> DecodedBatch:
    import torch

    by_shape: dict[tuple[int, ...], list[int]] = {}  # one group unless resizing is off
    encoded: list[tuple[int, EncodedJpeg]] = []
    for position, (_, pixels, error) in enumerate(items):
        if isinstance(pixels, EncodedJpeg):
            encoded.append((position, pixels))
        elif error is None:
            by_shape.setdefault(tuple(pixels.shape), []).append(position)
    groups = [
        (positions, torch.stack([items[p][1] for p in positions]))
        for positions in by_shape.values()
    ]
    return DecodedBatch([i for i, _, _ in items], [e for _, _, e in items], groups, encoded)


def default_batch_size(device_type: str) -> int:
    """8 on the CPU, where larger batches spill the activations out of cache (measured on
    2 cores, convnext-tiny bfloat16: 69 images/s at batch 8, 41 at batch 32); 32 on a GPU."""
    return 8 if device_type == "cpu" else 32


def default_workers(num_inputs: int, batch_size: int, device_type: str = "cpu") -> int:
    """Decoding processes: none for a single batch; on a GPU, the cores but one (at most 8).

    On the CPU the model's threads already use every core, and a decoder process fighting
    them for cores costs more than it overlaps (measured on 2 cores: bfloat16, 100 photos,
    5.7 s in-process against 7.3 s with one worker), so only one in four cores decodes.
    """
    if num_inputs <= batch_size:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if device_type == "cpu":
        return min(8, cores // 4)
    return max(1, min(8, cores - 1))


def _init_worker(_worker_id: int) -> None:
    """Ctrl-C is the main process's to handle: it stops the workers cleanly.  And when the
    main process goes away mid-transfer, the worker's fd-passing thread (multiprocessing's
    resource_sharer, which reports through sys.excepthook) stays quiet about the closed
    connection instead of printing a traceback into the user's terminal."""
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    default_hook = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            default_hook(kind, value, tb)

    sys.excepthook = hook


def decoded_batches(
    paths: Sequence[str],
    spec: PreprocessSpec,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    jpeg_on_device: bool = False,
) -> Iterator[DecodedBatch]:
    """Batches of decoded inputs, in order, produced by `workers` processes (0: in-process)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        DecodeDataset(paths, spec, jpeg_on_device),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
        worker_init_fn=_init_worker if workers > 0 else None,
    )
    yield from loader


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
        self.jpeg_on_device = jpeg_on_device  # decode JPEGs on `device` (see jpeg_on_device)
        self.labels = model.config.labels
        # what runs a batch: the model itself, or torch.compile'd versions of it
        self.logits_fn: Any = model
        self.embed_fn: Any = model.embed

    def compile(self) -> None:
        """torch.compile the model (on the plain path: Inductor does its own fusion)."""
        import torch

        from convnext_cli.cpu_fusion import unfuse_blocks

        unfuse_blocks(self.model)
        self.logits_fn = torch.compile(self.model)
        self.embed_fn = torch.compile(self.model.embed)

    def _to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, h, w) on the host -> normalised model input on the device."""
        import torch

        batch = pixels.to(self.device, non_blocking=True)
        batch = self.spec.normalize(batch, self.dtype)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _run(
        self, paths: Sequence[str], batch_size: int | None, workers: int | None, fn: Any
    ) -> Iterator[list[Result]]:
        import torch

        if batch_size is None:
            batch_size = default_batch_size(self.device.type)
        if workers is None:
            workers = default_workers(len(paths), batch_size, self.device.type)
        pin = self.device.type == "cuda"
        batches = decoded_batches(
            paths, self.spec, batch_size, workers, pin, jpeg_on_device=self.jpeg_on_device
        )
        for decoded in batches:
            results = [
                Result(path=paths[i], error=err)
                for i, err in zip(decoded.indices, decoded.errors, strict=True)
            ]
            with torch.inference_mode():
                groups = decoded.groups
                if decoded.encoded:
                    groups = self._with_device_decoded(groups, decoded.encoded, results)
                for positions, pixels in groups:
                    fn(self._to_input(pixels), [results[p] for p in positions])
            yield results

    def _with_device_decoded(
        self,
        groups: list[tuple[list[int], torch.Tensor]],
        encoded: list[tuple[int, EncodedJpeg]],
        results: list[Result],
    ) -> list[tuple[list[int], torch.Tensor]]:
        """Decode a batch's JPEGs on the device, resize them there, and merge them into the
        host-decoded groups of the same shape.  A JPEG the device decoder rejects is decoded
        on the CPU instead; one that fails there too gets its error in `results`."""
        import torch

        from convnext_cli import jpeg_on_device

        images = jpeg_on_device.decode([e for _, e in encoded], self.device)
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
                results[position].error = _failure(exc)
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
        paths: Sequence[str],
        top_k: int = 5,
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> Iterator[list[Result]]:
        """Top-k softmax predictions for every path, one list of results per batch."""
        if not self.labels:
            from convnext_cli.errors import UsageError

            raise UsageError(
                "this checkpoint has no classification head (a feature model): use `convnext embed`"
            )
        k = max(1, min(top_k, len(self.labels)))

        def fill(batch: torch.Tensor, results: list[Result]) -> None:
            probs = self.logits_fn(batch).float().softmax(dim=-1)
            scores, indices = probs.topk(k, dim=-1)
            for result, row_scores, row_indices in zip(
                results, scores.cpu().tolist(), indices.cpu().tolist(), strict=True
            ):
                result.predictions = [
                    Prediction(self.labels[i], i, s)
                    for s, i in zip(row_scores, row_indices, strict=True)
                ]

        return self._run(paths, batch_size, workers, fill)

    def embed(
        self,
        paths: Sequence[str],
        normalize: bool = False,
        batch_size: int | None = None,
        workers: int | None = None,
    ) -> Iterator[list[Result]]:
        """The pooled feature (transformers' pooler_output) for every path, per batch."""

        def fill(batch: torch.Tensor, results: list[Result]) -> None:
            features = self.embed_fn(batch).float()
            if normalize:
                features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            for result, row in zip(results, features.cpu(), strict=True):
                result.embedding = row

        return self._run(paths, batch_size, workers, fill)
