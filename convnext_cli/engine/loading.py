"""The one way from "model reference + run options" to a ready :class:`Runner`.

The CLI commands (classify, embed, benchmark), the Python API (:class:`ImageModel`,
:func:`load_model`) and the Ray engine's model actors all load through
:func:`load_runner`; what the user should be told (``--dtype auto`` chose bfloat16,
JPEGs are decoded on the GPU, compiling) comes back as notes for the caller to show or not.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from convnext_cli.checkpoints.checkpoint import Checkpoint, build_model, load_checkpoint
from convnext_cli.choices import DEFAULT_MODEL
from convnext_cli.engine.device import resolve, resolve_device
from convnext_cli.engine.pipeline import Runner
from convnext_cli.errors import CheckpointError, UsageError
from convnext_cli.imaging.gpu_jpeg import resolve_decode
from convnext_cli.limits import as_device, as_path
from convnext_cli.model.convnext import ConvNeXtForClassification
from convnext_cli.model.labels import read_labels_file


@dataclass(frozen=True)
class ModelSource:
    """Which checkpoint: a Hub id (``id@rev``), a Hub-layout folder or a weights file,
    with the Hub options and an optional label file replacing the checkpoint's names."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    cache_dir: Path | None = None
    token: str | None = None
    labels: Path | None = None  # --labels FILE: one name per line, or JSON


@dataclass(frozen=True)
class RunOptions:
    """How the model runs: device, dtype, where JPEGs are decoded, torch.compile, layout."""

    device: str = "auto"
    dtype: str = "auto"
    decode: str = "auto"
    compile: bool = False
    channels_last: bool = True
    compile_mode: str = "default"  # one of choices.COMPILE_MODES, used when compile is on


@dataclass
class LoadedRunner:
    """A runner ready for batches, the checkpoint it came from, and the notes to show."""

    runner: Runner
    checkpoint: Checkpoint
    notes: list[str] = field(default_factory=list)


def read_source(
    source: ModelSource | str, on_note: Callable[[str], None] | None = None
) -> Checkpoint:
    """The checkpoint ``source`` names, with ``--labels`` applied, checked for images (RGB)."""
    if isinstance(source, str):
        source = ModelSource(source)
    checkpoint = load_checkpoint(
        source.model,
        revision=source.revision,
        cache_dir=source.cache_dir,
        token=source.token,
        on_note=on_note,
    )
    config = checkpoint.config
    if config.num_channels != 3:
        where = checkpoint.files.config if checkpoint.config_json else checkpoint.files.weights
        raise CheckpointError(
            f"{where}: num_channels: the model takes {config.num_channels} input channels; "
            "images are decoded to RGB (3)"
        )
    if source.labels is not None:
        names = read_labels_file(source.labels, expected=config.num_labels)
        config.id2label = dict(enumerate(names))
    return checkpoint


def load_runner(
    source: ModelSource | str = DEFAULT_MODEL,
    options: RunOptions | None = None,
    on_note: Callable[[str], None] | None = None,
) -> LoadedRunner:
    """Resolve device and dtype, read and check the checkpoint, build the model on the
    device, and wrap it in a :class:`Runner` (compiled when asked).

    What the user should be told is in the result's ``notes``; ``on_note`` also hears each
    one as it happens (a Hub download is announced before its progress bars).
    """
    options = options or RunOptions()
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if on_note is not None:
            on_note(text)

    placement = resolve(options.device, options.dtype)
    decode_on_device = resolve_decode(options.decode, placement.device, note)
    checkpoint = read_source(source, note)
    if placement.reason:
        note(f"--dtype auto chose {placement.dtype_name}: {placement.reason}")
    net = build_model(
        checkpoint, placement.device, placement.dtype, channels_last=options.channels_last
    )
    runner = Runner(
        net,
        checkpoint.preprocess,
        placement.device,
        placement.dtype,
        channels_last=options.channels_last,
        jpeg_on_device=decode_on_device,
    )
    runner.on_note = note  # a batch halved after running out of device memory
    if options.compile:
        note("compiling the model; the first batch includes the compile time")
        runner.compile(options.compile_mode)
    return LoadedRunner(runner, checkpoint, notes)


def load_model(
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
) -> ConvNeXtForClassification:
    """Any supported checkpoint as a ready-to-run ``nn.Module`` (``.config`` and
    ``.preprocess`` set), for callers who run the model themselves.  ``device``: a name or
    a ``torch.device`` (None: auto); ``dtype``: a floating ``torch.dtype`` (None: float32)."""
    if not isinstance(device, torch.device):
        device = resolve_device(as_device(device))
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UsageError(f"dtype: {dtype!r} is not torch.float32, float16, bfloat16 or None")
    checkpoint = read_source(as_path(model, "model"))
    net = build_model(checkpoint, device=device, dtype=dtype)
    net.preprocess = checkpoint.preprocess  # type: ignore[assignment]  # read by callers
    return net
