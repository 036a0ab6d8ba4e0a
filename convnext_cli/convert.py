"""`convnext convert`: any supported ConvNeXt checkpoint in, a Hub-layout folder out.

The folder holds ``config.json`` (transformers' ConvNextConfig / ConvNextV2Config),
``model.safetensors`` (metadata ``{"format": "pt"}``) and ``preprocessor_config.json``
(transformers' ConvNextImageProcessor), and loads with ``from_pretrained`` unchanged.

SOURCE is a local path: a single weights file in any layout, or a folder holding
``model.safetensors`` or ``pytorch_model.bin`` (a transformers folder keeps its
``config.json`` and ``preprocessor_config.json``, which is how ``.bin`` folders become
safetensors; a timm Hub folder gives its preprocessing from ``pretrained_cfg``).  Hub ids
are resolved to a local snapshot folder by the caller.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnext_cli import checkpoints, interrupts, layouts
from convnext_cli.checkpoints import CONFIG_FILE, PREPROCESSOR_FILE
from convnext_cli.config import ConvNextConfig
from convnext_cli.errors import CheckpointError, UsageError, one_line
from convnext_cli.preprocess import PreprocessSpec
from convnext_cli.weights_io import (
    check_tensors,
    read_weights_file,
    save_safetensors,
)

if TYPE_CHECKING:
    from torch import Tensor

WEIGHTS_FILE = "model.safetensors"
# Weight files that would shadow or contradict the new model.safetensors under --force.
STALE_WEIGHTS = (
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
# Fields that must agree between a kept config.json and the weights.
SHAPE_FIELDS = ("model_type", "num_channels", "patch_size", "depths", "hidden_sizes")


@dataclass
class Conversion:
    """What was converted, and where it went."""

    source: Path
    output_dir: Path
    layout: str
    config: dict[str, Any]
    preprocessor: dict[str, Any]
    num_labels: int  # 0: a feature model

    def summary(self) -> str:
        """``timm, ConvNeXt V2, depths [...], widths [...], 1000 labels``."""
        return f"{self.layout}, {layouts.describe(self.config, self.num_labels)}"


@dataclass
class Source:
    """A checkpoint read from disk, with whatever JSON came beside it."""

    path: Path
    weights_file: Path
    raw: dict[str, Any]
    config: dict[str, Any] | None
    preprocessor: dict[str, Any] | None


def convert_checkpoint(
    source: Path,
    output_dir: Path,
    *,
    layout: str = "auto",
    image_size: int | None = None,
    crop_pct: float | None = None,
    force: bool = False,
) -> Path:
    """Convert ``source`` (a local weights file or folder) into a Hub-layout ``output_dir``."""
    return convert(
        source, output_dir, layout=layout, image_size=image_size, crop_pct=crop_pct, force=force
    ).output_dir


def convert(
    source: Path,
    output_dir: Path,
    *,
    layout: str = "auto",
    image_size: int | None = None,
    crop_pct: float | None = None,
    force: bool = False,
) -> Conversion:
    """:func:`convert_checkpoint`, returning what was written (for the CLI's summary line)."""
    source, output_dir = Path(source).expanduser(), Path(output_dir).expanduser()
    check_options(layout, image_size, crop_pct)
    check_output_dir(output_dir, source, force)
    src = read_source(source)
    state_dict = layouts.unwrap(src.raw)
    check_tensors(state_dict, src.weights_file)
    found_layout = layouts.resolve_layout(state_dict, layout)
    weights, inferred = layouts.to_hf(state_dict, found_layout)
    num_labels = len(inferred.get("id2label") or {})
    config_where = str(src.path / CONFIG_FILE)
    if found_layout == "hf" and src.config is not None:
        ConvNextConfig.from_dict(src.config, where=config_where)  # types and ranges first
        config = merge_hf_config(src.config, inferred, where=config_where)
    else:
        config = inferred
    if image_size is not None:
        config["image_size"] = image_size
    preprocessor = choose_preprocessor(src, found_layout, config, image_size, crop_pct)
    # What is written must read back: the same checks classify applies when loading it.
    ConvNextConfig.from_dict(config, where=f"{output_dir / CONFIG_FILE} (to be written)")
    PreprocessSpec.from_dict(
        preprocessor, where=f"{output_dir / PREPROCESSOR_FILE} (to be written)"
    )
    write_folder(output_dir, weights, config, preprocessor, force)
    return Conversion(source, output_dir, found_layout, config, preprocessor, num_labels)


def check_options(layout: str, image_size: int | None, crop_pct: float | None) -> None:
    if layout != "auto" and layout not in layouts.LAYOUTS:
        raise UsageError(
            f"unknown --from {layout!r} (use auto or one of {', '.join(layouts.LAYOUTS)})"
        )
    if image_size is not None and image_size < 1:
        raise UsageError(f"--image-size must be a positive number of pixels, got {image_size}")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise UsageError(f"--crop-pct must be in (0, 1], got {crop_pct}")


def check_output_dir(output_dir: Path, source: Path, force: bool) -> None:
    """Refuse a file, a folder holding the source, or a non-empty folder without ``force``.

    Paths are compared with every symlink resolved: a SOURCE that is OUTPUT_DIR, lies inside
    it, or reaches into it through a symlink (the weights file or a JSON file of a source
    folder included) is refused before anything is written.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"{output_dir}: exists and is not a folder")
    out_real = output_dir.resolve()
    source_folder = source if source.is_dir() else source.parent
    if source.is_file() and source_folder.resolve() == out_real:
        raise UsageError(f"{output_dir}: is the source's own folder; choose another OUTPUT_DIR")
    for path in source_paths(source):
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


def source_paths(source: Path) -> list[Path]:
    """Every file convert reads from ``source``, as named (symlinks not yet resolved)."""
    if not source.is_dir():
        return [source]
    paths = [source, source / CONFIG_FILE, source / PREPROCESSOR_FILE]
    try:
        paths.append(checkpoints.folder_weights(source))
    except CheckpointError:
        pass  # reported when the source is read
    return paths


# --------------------------------------------------------------------------- reading


def read_source(source: Path) -> Source:
    """Read a weights file, or a folder's weights plus its config/preprocessor JSON (the
    JSON first: a bad preprocessor_config.json is refused before the weights are read)."""
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or folder")
    if source.is_file():
        return Source(source, source, read_weights_file(source), None, None)
    weights_file = checkpoints.folder_weights(source)
    config = read_json(source / CONFIG_FILE)
    preprocessor = read_json(source / PREPROCESSOR_FILE)
    if preprocessor is not None:
        PreprocessSpec.from_dict(preprocessor, where=str(source / PREPROCESSOR_FILE))
    return Source(
        path=source,
        weights_file=weights_file,
        raw=read_weights_file(weights_file),
        config=config,
        preprocessor=preprocessor,
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when the file does not exist."""
    return checkpoints.read_json(path) if path.is_file() else None


# --------------------------------------------------------------------------- config


def merge_hf_config(
    existing: dict[str, Any], inferred: dict[str, Any], *, where: str
) -> dict[str, Any]:
    """Keep a transformers folder's config.json, checked against (and completed from) the weights.

    Architecture fields must agree with the weights; numeric settings such as
    ``layer_norm_eps`` and the label names are the folder's.  ``architectures`` is set
    from the weights (classifier or feature model).
    """
    config = dict(existing)
    for field in SHAPE_FIELDS:
        if field in config and _comparable(field, config[field]) != inferred[field]:
            raise CheckpointError(
                f"{where}: {field} {config[field]!r} does not match the weights "
                f"({inferred[field]!r})"
            )
    for field in SHAPE_FIELDS + ("num_stages", "architectures"):
        config[field] = inferred[field]
    labels = inferred.get("id2label")
    if labels is None:
        return config  # a feature model: whatever labels the config names are unused
    kept = config.get("id2label")
    if not kept:
        config["id2label"], config["label2id"] = labels, inferred["label2id"]
    elif len(kept) != len(labels):
        raise CheckpointError(
            f"{where}: id2label names {len(kept)} classes but the classifier has {len(labels)}"
        )
    else:
        config["id2label"] = {str(k): str(v) for k, v in sorted(kept.items(), key=_index)}
        config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    config.pop("num_labels", None)
    return config


def _comparable(field: str, value: Any) -> Any:
    """A config.json value in the form the inferred config uses (patch_size may be [4, 4])."""
    if field == "patch_size" and isinstance(value, (list, tuple)) and len(set(value)) == 1:
        return int(value[0])
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return value


def _index(item: tuple[Any, Any]) -> int:
    try:
        return int(item[0])
    except (TypeError, ValueError):
        raise CheckpointError(f"id2label key {item[0]!r} is not an integer") from None


def choose_preprocessor(
    src: Source,
    layout: str,
    config: dict[str, Any],
    image_size: int | None,
    crop_pct: float | None,
) -> dict[str, Any]:
    """The folder's preprocessor_config.json, timm's pretrained_cfg, or the layout's default;
    then the ``--image-size`` / ``--crop-pct`` overrides."""
    timm_pre = (
        layouts.preprocessor_from_timm_config(src.config)
        if src.config is not None and layout == "timm"
        else None
    )
    if src.preprocessor is not None:
        pre = dict(src.preprocessor)
    elif timm_pre is not None:
        pre = timm_pre
        if image_size is None:
            config["image_size"] = pre["size"]["shortest_edge"]
    else:
        pre = layouts.default_preprocessor(layout, config)
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

    Each file is written to a temporary file inside ``output_dir`` and renamed into place,
    so an interrupted convert never leaves a half-written file under a final name, and an
    existing symlink is replaced by the new file, never written through to its target.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if force:
            for name in STALE_WEIGHTS:
                (output_dir / name).unlink(missing_ok=True)  # a symlink: only the link goes
        with replacing(output_dir / WEIGHTS_FILE) as tmp:
            save_safetensors(weights, tmp, metadata={"format": "pt"})
        write_json(output_dir / CONFIG_FILE, config)
        write_json(output_dir / PREPROCESSOR_FILE, preprocessor)
    except OSError as exc:
        raise UsageError(f"{output_dir}: cannot write ({one_line(exc)})") from exc


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed over
    ``target`` (replacing a symlink itself, not its target); on any failure or interrupt
    the temporary is removed and ``target`` is untouched."""
    if target.is_dir() and not target.is_symlink():
        raise UsageError(f"{target}: is a folder; cannot replace it with a file")
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        # Ctrl-C while writing leaves at once (see interrupts): the temporary goes first
        with interrupts.cleanup_on_leave(lambda: tmp.unlink(missing_ok=True)):
            yield tmp
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
