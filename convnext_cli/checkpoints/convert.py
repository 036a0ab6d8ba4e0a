"""`convnext convert`: any supported ConvNeXt checkpoint in, a Hub-layout folder (or, with
an ``.onnx`` name or ``--to onnx``, an ONNX model: :func:`export_onnx`) out.

The folder holds ``config.json`` (transformers' ConvNextConfig / ConvNextV2Config),
``model.safetensors`` (metadata ``{"format": "pt"}``) and ``preprocessor_config.json``
(transformers' ConvNextImageProcessor), and loads with ``from_pretrained`` unchanged.

SOURCE is anything classify loads (located and read by the same
:func:`~convnext_cli.checkpoints.checkpoint.locate` and
:func:`~convnext_cli.checkpoints.checkpoint.load_checkpoint`):
a single weights file in any layout, a folder holding ``model.safetensors`` or
``pytorch_model.bin`` (a transformers folder keeps its ``config.json`` and
``preprocessor_config.json``, which is how ``.bin`` folders become safetensors; a timm Hub
folder gives its preprocessing from ``pretrained_cfg``), or a Hub id.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from convnext_cli.checkpoints.checkpoint import (
    Checkpoint,
    CheckpointFiles,
    assemble,
    load_checkpoint,
    locate,
)
from convnext_cli.checkpoints.hub import CONFIG_FILE, PREPROCESSOR_FILE
from convnext_cli.checkpoints.layouts import CheckpointLayout
from convnext_cli.checkpoints.weights_io import save_safetensors
from convnext_cli.choices import LAYOUTS
from convnext_cli.errors import CheckpointError, UsageError, one_line
from convnext_cli.imaging.preprocess import PreprocessSpec
from convnext_cli.limits import check_environment
from convnext_cli.model._fields import MAX_JSON_BYTES
from convnext_cli.model.config import ConvNextConfig
from convnext_cli.outputs import files as output_files
from convnext_cli.outputs.files import OutputFile, refuse_overwriting, resolve_target
from convnext_cli.reading import read_json_file

WEIGHTS_FILE = "model.safetensors"
# Weight files that would shadow or contradict the new model.safetensors under --force.
STALE_WEIGHTS = (
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
WRITTEN = (WEIGHTS_FILE, CONFIG_FILE, PREPROCESSOR_FILE)
# config.json fields that come from the weights; a kept config.json keeps its other fields.
FROM_WEIGHTS = (
    "architectures",
    "model_type",
    "num_channels",
    "patch_size",
    "num_stages",
    "depths",
    "hidden_sizes",
    "id2label",
    "label2id",
)


@dataclass
class Conversion:
    """What was converted, and where it went."""

    source: Path
    output_dir: Path
    layout: CheckpointLayout
    config: dict[str, Any]
    preprocessor: dict[str, Any]
    num_labels: int  # 0: a feature model
    described: str = ""

    def summary(self) -> str:
        """``timm, ConvNeXt V2, depths [...], widths [...], 1000 labels``."""
        return f"{self.layout}, {self.described}"


@dataclass(frozen=True)
class ConvertOptions:
    """What :func:`convert` and :func:`export_onnx` take besides the source and the target:
    the source's layout (``auto``: detected), the preprocessing to write, whether to replace
    an existing output, and the Hub options."""

    layout: str = "auto"
    image_size: int | None = None
    crop_pct: float | None = None
    force: bool = False
    revision: str | None = None
    cache_dir: Path | None = None
    token: str | None = None

    def locate(self, source: str | Path) -> CheckpointFiles:
        """The options checked, then ``source``'s files found (downloaded from the Hub)."""
        check_environment()  # HF_HUB_*_TIMEOUT and the like: one line naming the variable
        check_options(self.layout, self.image_size, self.crop_pct)
        return locate(
            str(source), revision=self.revision, cache_dir=self.cache_dir, token=self.token
        )

    def read(self, files: CheckpointFiles) -> tuple[Checkpoint, dict[str, Any], dict[str, Any]]:
        """The checkpoint, and the config.json and preprocessor_config.json written for it."""
        checkpoint = load_checkpoint(files, layout=self.layout)
        config = config_json(checkpoint, self.image_size)
        return checkpoint, config, choose_preprocessor(checkpoint, self.image_size, self.crop_pct)


def convert_checkpoint(source: str | Path, output_dir: Path, **options: Any) -> Path:
    """Convert ``source`` (a weights file, a folder or a Hub id) into a Hub-layout folder;
    ``options`` are :class:`ConvertOptions`' fields.  Returns the folder."""
    return convert(source, output_dir, ConvertOptions(**options)).output_dir


def convert(
    source: str | Path, output_dir: Path, options: ConvertOptions | None = None
) -> Conversion:
    """:func:`convert_checkpoint`, returning what was written (for the CLI's summary line)."""
    options = options or ConvertOptions()
    output_dir = Path(output_dir).expanduser()
    files = options.locate(source)
    check_output_dir(output_dir, files, options.force)
    checkpoint, config, preprocessor = options.read(files)
    assemble(checkpoint.config, checkpoint.state_dict, files.weights)  # the one shape check
    # What is written must read back: the same checks classify applies when loading it.
    ConvNextConfig.from_dict(config, where=f"{output_dir / CONFIG_FILE} (to be written)")
    PreprocessSpec.from_dict(
        preprocessor, where=f"{output_dir / PREPROCESSOR_FILE} (to be written)"
    )
    write_folder(output_dir, saved_weights(checkpoint), config, preprocessor, options.force)
    return Conversion(
        Path(str(source)),
        output_dir,
        checkpoint.layout,
        config,
        preprocessor,
        checkpoint.config.num_labels,
        checkpoint.config.describe(),
    )


def check_options(layout: str, image_size: int | None, crop_pct: float | None) -> None:
    if layout != "auto" and layout not in LAYOUTS:
        raise UsageError(f"unknown --from {layout!r} (use auto or one of {', '.join(LAYOUTS)})")
    if image_size is not None and image_size < 1:
        raise UsageError(f"--image-size must be a positive number of pixels, got {image_size}")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise UsageError(f"--crop-pct must be in (0, 1], got {crop_pct}")


def check_output_dir(output_dir: Path, files: CheckpointFiles, force: bool) -> None:
    """Refuse a file, a folder holding the source, or a non-empty folder without ``force``.

    Paths are compared with every symlink resolved: a source file that is OUTPUT_DIR, lies
    inside it, or reaches into it through a symlink (the weights file or a JSON file of a
    source folder included) is refused before anything is written.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"{output_dir}: exists and is not a folder")
    out_real = output_dir.resolve()
    if not files.folder and files.weights.parent.resolve() == out_real:
        raise UsageError(f"{output_dir}: is the source's own folder; choose another OUTPUT_DIR")
    for path in [files.weights.parent, *files.paths]:
        real = path.resolve()
        if real == out_real:
            raise UsageError(
                f"{output_dir}: is the source itself ({path}); choose another OUTPUT_DIR"
            )
        if real.is_relative_to(out_real):
            via = "" if path.absolute() == real else f" (through a symlink: {path} -> {real})"
            raise UsageError(
                f"{output_dir}: the source {path} lies inside OUTPUT_DIR{via}; "
                "choose another OUTPUT_DIR"
            )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not force:
        raise UsageError(f"{output_dir}: folder is not empty (use --force to write into it)")
    written = [output_dir / name for name in (*STALE_WEIGHTS, *WRITTEN)]
    refuse_overwriting(written, checkpoint=files.paths)
    for path in written:  # a device node or FIFO in OUT_DIR: refused before the load
        resolve_target(path, follow_symlinks=False, devices=False)


# --------------------------------------------------------------------------- what is written


def saved_weights(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """A classifier keeps transformers' ``*ForImageClassification`` keys; a headless model
    gets those of ``ConvNextModel``/``ConvNextV2Model`` saved on its own (no prefix)."""
    if checkpoint.has_head:
        return checkpoint.state_dict
    prefix = checkpoint.config.base_prefix + "."
    return {k.removeprefix(prefix): v for k, v in checkpoint.state_dict.items()}


def config_json(checkpoint: Checkpoint, image_size: int | None) -> dict[str, Any]:
    """transformers' config.json for the checkpoint.

    A transformers folder's own config.json is kept (its settings, its label names), with
    the architecture fields taken from the weights it was checked against.
    """
    inferred = checkpoint.config.to_dict()
    config = dict(checkpoint.config_json or {})
    config.pop("num_labels", None)
    for name, value in inferred.items():
        if name in FROM_WEIGHTS or name not in config:
            config[name] = value
    if not checkpoint.has_head:
        config.pop("id2label", None)  # a feature model: whatever labels the config named
        config.pop("label2id", None)
    if image_size is not None:
        config["image_size"] = image_size
    elif _preprocessing_from_timm(checkpoint):
        config["image_size"] = checkpoint.preprocess.shortest_edge
    return config


def _preprocessing_from_timm(checkpoint: Checkpoint) -> bool:
    files = checkpoint.files
    return (
        checkpoint.layout is CheckpointLayout.TIMM
        and files.preprocessor is None
        and files.config is not None
        and checkpoint.preprocess.shortest_edge != checkpoint.config.image_size
    )


def choose_preprocessor(
    checkpoint: Checkpoint, image_size: int | None, crop_pct: float | None
) -> dict[str, Any]:
    """The folder's preprocessor_config.json as written, else the checkpoint's preprocessing
    (timm's pretrained_cfg, or the layout's default); then ``--image-size``/``--crop-pct``."""
    files = checkpoint.files
    if files.preprocessor is not None:
        pre = read_json_file(files.preprocessor, error=CheckpointError, limit=MAX_JSON_BYTES)
        if not isinstance(pre, dict):
            raise CheckpointError(f"{files.preprocessor}: expected a JSON object")
    else:
        pre = checkpoint.preprocess.to_dict()
    if image_size is not None:
        pre["size"] = {"shortest_edge": image_size}
    if crop_pct is not None:
        pre["crop_pct"] = crop_pct
    return pre


# --------------------------------------------------------------------------- writing


def write_folder(
    output_dir: Path,
    weights: dict[str, Tensor],
    config: dict[str, Any],
    preprocessor: dict[str, Any],
    force: bool,
) -> None:
    """Write the three files (with ``force``, first remove weight files that would conflict).

    Each file goes through the one output protection (:mod:`convnext_cli.outputs.files`):
    written beside its name and renamed into place, so an interrupted convert never leaves
    a half-written file under a final name; an existing symlink is replaced by the new file,
    never written through to its target; anything else that is not a regular file (a
    device node, a FIFO) is refused before any file is written.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{output_dir}: cannot write ({one_line(exc)})") from exc
    for name in (*STALE_WEIGHTS, *WRITTEN):
        resolve_target(output_dir / name, follow_symlinks=False, devices=False)
    try:
        if force:
            for name in STALE_WEIGHTS:
                (output_dir / name).unlink(missing_ok=True)  # a symlink: only the link goes
    except OSError as exc:
        raise UsageError(f"{output_dir}: cannot write ({one_line(exc)})") from exc
    with replacing(output_dir / WEIGHTS_FILE) as out:
        save_safetensors(weights, out.partial, metadata={"format": "pt"})
    write_json(output_dir / CONFIG_FILE, config)
    write_json(output_dir / PREPROCESSOR_FILE, preprocessor)


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[OutputFile]:
    """The output protection for a file convert writes: a symlink is replaced (never written
    through), a device node or FIFO refused; written beside and moved into place; on any
    failure or interrupt the partial file is removed and ``target`` is untouched."""
    with output_files.replacing(target, follow_symlinks=False, devices=False) as out:
        yield out


def write_json(path: Path, data: dict[str, Any]) -> None:
    with replacing(path) as out:
        out.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------- ONNX

ONNX_OPSET = 18
ONNX_INPUT = "pixel_values"


@dataclass
class OnnxExport:
    """An ONNX file written, for the CLI's summary line."""

    source: Path
    output: Path
    layout: CheckpointLayout
    output_name: str  # logits, or pooler_output for a feature model
    input_shape: tuple[int, int, int]  # (3, H, W) after the preprocessing
    described: str = ""

    def summary(self) -> str:
        shape = "x".join(str(n) for n in self.input_shape)
        return f"{self.layout}, {self.described}; input N x {shape}, output {self.output_name}"


def check_onnx_output(output: Path, files: CheckpointFiles, force: bool) -> None:
    """An existing file only with ``force``; never a folder, never a source file (symlinks
    resolved)."""
    if output.is_dir():
        raise UsageError(f"{output}: is a folder; name the .onnx file to write")
    real = output.resolve()
    for path in files.paths:
        if path.resolve() == real:
            raise UsageError(f"{output}: is the source itself ({path}); choose another name")
    refuse_overwriting([output], checkpoint=files.paths)  # a hard link to the source too
    if os.path.lexists(output) and not force:
        raise UsageError(f"{output}: exists (use --force to replace it)")
    resolve_target(output, follow_symlinks=False, devices=False)  # never over a device node


def export_onnx(
    source: str | Path, output: Path, options: ConvertOptions | None = None
) -> OnnxExport:
    """The checkpoint as an ONNX model (float32, opset 18, through torch.onnx's exporter).

    Input ``pixel_values``: float32 (N, 3, H, W), RGB, preprocessed as the metadata's
    ``preprocessor_config`` says (resize and crop to H x W, scale to [0, 1], normalise by
    ``image_mean``/``image_std``), with a dynamic batch dimension N.  Output ``logits``
    (N, labels), or ``pooler_output`` (N, C) for a feature model.  Metadata (ONNX
    ``metadata_props``): ``preprocessor_config`` and ``config`` (the JSON that convert
    writes into a Hub folder), ``id2label`` (JSON), ``input``/``output`` (the tensor names)
    and ``producer``.  It is for deployment (ONNX Runtime, OpenVINO, ...), not speed: on
    the CPU this tool's own runs are as fast or faster (see the README).
    """
    import torch

    from convnext_cli.checkpoints.checkpoint import build_model

    options = options or ConvertOptions()
    output = Path(output).expanduser()
    files = options.locate(source)
    check_onnx_installed()
    check_onnx_output(output, files, options.force)
    checkpoint, config, preprocessor = options.read(files)
    spec = PreprocessSpec.from_dict(preprocessor, where=f"{output} (preprocessing)")
    model = build_model(checkpoint, "cpu", torch.float32, channels_last=False, fuse=False)
    height, width = spec.resize_and_crop(torch.zeros(3, 480, 640, dtype=torch.uint8)).shape[1:]
    # a feature model's head is an identity: its forward gives the pooled feature
    name = "logits" if checkpoint.has_head else "pooler_output"
    example = torch.zeros(2, checkpoint.config.num_channels, height, width)
    metadata = onnx_metadata(checkpoint, config, preprocessor, name)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{output}: cannot write ({one_line(exc)})") from exc
    with replacing(output) as out:
        _export(model, example, out.partial, name, metadata)
    shape = (checkpoint.config.num_channels, int(height), int(width))
    return OnnxExport(
        Path(str(source)), output, checkpoint.layout, name, shape, checkpoint.config.describe()
    )


def check_onnx_installed() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UsageError(
            "ONNX export needs onnx and onnxscript: pip install 'convnext-cli[onnx]'"
        ) from None


def onnx_metadata(
    checkpoint: Checkpoint, config: dict[str, Any], preprocessor: dict[str, Any], output: str
) -> dict[str, str]:
    """The ONNX file's ``metadata_props``: what a deployment needs to feed it and read it."""
    from convnext_cli import __version__

    labels = {str(i): label for i, label in enumerate(checkpoint.config.labels)}
    return {
        "preprocessor_config": json.dumps(preprocessor, sort_keys=True),
        "config": json.dumps(config, sort_keys=True),
        "id2label": json.dumps(labels, sort_keys=True),
        "input": ONNX_INPUT,
        "output": output,
        "producer": f"convnext-cli {__version__}",
    }


def _export(
    module: Any, example: Any, path: Path, output_name: str, metadata: dict[str, str]
) -> None:
    import io
    import warnings

    import onnx
    import torch

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[ONNX_INPUT],
            output_names=[output_name],
            dynamic_shapes={"pixel_values": {0: batch}},
            opset_version=ONNX_OPSET,
            dynamo=True,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "convnext-cli"
    onnx.save_model(proto, str(path))
