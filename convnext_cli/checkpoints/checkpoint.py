"""From a model reference to a checked checkpoint, and from a checkpoint to a model.

    locate (Hub id[@revision], Hub-layout folder, or single weights file -> CheckpointFiles)
      -> read (JSON first; safetensors preferred; pickles only with ``weights_only=True``)
      -> layouts: detected, renamed to transformers' keys (:mod:`convnext_cli.checkpoints.layouts`)
      -> ConvNextConfig.from_state_dict (what the tensors describe), compared field by
         field with a config.json beside transformers weights
      -> assemble: the model built from the config, the one key-and-shape check, strict load.

Both loading (classify, embed, benchmark, the Python API) and ``convert`` go through
:func:`locate` and :func:`load_checkpoint`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from convnext_cli.checkpoints import hub
from convnext_cli.checkpoints.hub import CONFIG_FILE, PREPROCESSOR_FILE, WEIGHT_FILES
from convnext_cli.checkpoints.layouts import CheckpointLayout, StateDict, rename, unwrap
from convnext_cli.checkpoints.weights_io import (
    H5_SUFFIXES,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    check_tensors,
    read_weights_file,
    shape_problems,
)
from convnext_cli.choices import DEFAULT_MODEL
from convnext_cli.errors import CheckpointError, UsageError, one_line
from convnext_cli.imaging.preprocess import PreprocessSpec
from convnext_cli.model._fields import read_json_object
from convnext_cli.model.config import ConvNextConfig
from convnext_cli.model.convnext import ConvNeXtForClassification

__all__ = ["DEFAULT_MODEL", "Checkpoint", "CheckpointFiles", "load_checkpoint", "locate"]

# transformers' own weights, PyTorch or TensorFlow: their config.json describes them
TRANSFORMERS_LAYOUTS = (CheckpointLayout.HF, CheckpointLayout.KERAS)
NORM_EPS = 1e-6  # the final LayerNorm of the fb, fcmae, timm and torchvision models
HF_DEFAULT_NORM_EPS = 1e-12  # transformers' ConvNextConfig default, used by Hub checkpoints


# --------------------------------------------------------------------------- locating


@dataclass(frozen=True)
class CheckpointFiles:
    """Where a checkpoint is: its weights file, and the JSON files beside it (None: absent)."""

    weights: Path
    config: Path | None
    preprocessor: Path | None
    folder: bool  # the reference named a folder (or a Hub snapshot), not one weights file

    @property
    def paths(self) -> list[Path]:
        """Every file a run reads (an output must never be written over one of them)."""
        return [p for p in (self.weights, self.config, self.preprocessor) if p is not None]


def locate(
    model: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    cache_dir: Path | None = None,
    token: str | None = None,
    on_note: Callable[[str], None] | None = None,
) -> CheckpointFiles:
    """A local weights file or folder as is; a Hub id downloaded (or found in the cache;
    ``on_note`` hears which)."""
    path = Path(model).expanduser()
    if not path.exists():
        ref = _hub_ref(model, revision, cache_dir, token)
        try:
            path = hub.download(ref, on_note)
        except CheckpointError as exc:
            if model == DEFAULT_MODEL or not _meant_local(path):
                raise
            raise CheckpointError(
                f"no local file or folder {model} exists, so it was tried as a Hub id: {exc}"
            ) from exc
    elif revision is not None:
        raise UsageError(f"--revision {revision}: {model} is a local path, not a Hub id")
    if not path.is_dir():
        folder = path.parent
        return CheckpointFiles(
            path, _beside(folder, CONFIG_FILE), _beside(folder, PREPROCESSOR_FILE), folder=False
        )
    return CheckpointFiles(
        folder_weights(path),
        _beside(path, CONFIG_FILE),
        _beside(path, PREPROCESSOR_FILE),
        folder=True,
    )


def _meant_local(path: Path) -> bool:
    """Whether a path that does not exist reads as a local one rather than ``org/name``: one
    name only, or a folder above it that exists."""
    return len(path.parts) == 1 or path.parent.is_dir()


def _hub_ref(
    model: str, revision: str | None, cache_dir: Path | None, token: str | None
) -> hub.HubRef:
    if not hub.looks_like_hub_id(model) or model.endswith(
        SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + H5_SUFFIXES
    ):
        raise CheckpointError(f"{model}: no such file or folder, and not a Hugging Face Hub id")
    repo_id, pinned = hub.split_revision(model)
    if pinned and revision and pinned != revision:
        raise UsageError(f"{model}: names revision {pinned!r} but --revision says {revision!r}")
    return hub.HubRef(repo_id, revision or pinned, cache_dir, token)


def _beside(folder: Path, name: str) -> Path | None:
    """``folder/name`` when there is anything by that name: what is not a regular file (a
    FIFO, a broken symlink) is then refused with one line when it is read, not skipped."""
    path = folder / name
    return path if os.path.lexists(path) else None


def folder_weights(folder: Path) -> Path:
    """``model.safetensors``, else ``pytorch_model.bin``, else the folder's only weights file."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise CheckpointError(f"{folder}: sharded checkpoints are not supported")
    suffixes = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + H5_SUFFIXES
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in sorted(folder.iterdir())[:8]) or "nothing"
    raise CheckpointError(
        f"{folder}: no weights file ({' or '.join(WEIGHT_FILES)}) in the folder; found: {found}"
    )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (at most MAX_JSON_BYTES, no key given twice), or a
    one-line CheckpointError."""
    return read_json_object(path)


# --------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    """Everything needed to build a model: config, weights (transformers keys), preprocessing."""

    config: ConvNextConfig
    state_dict: StateDict  # transformers' keys: ``convnext.``/``convnextv2.`` + ``classifier.``
    preprocess: PreprocessSpec
    source: str
    layout: CheckpointLayout
    files: CheckpointFiles
    # the config.json that describes these weights (transformers layout), as written
    config_json: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def has_head(self) -> bool:
        return "classifier.weight" in self.state_dict


def load_checkpoint(
    model: str | CheckpointFiles = DEFAULT_MODEL,
    *,
    layout: str | None = None,
    revision: str | None = None,
    cache_dir: Path | None = None,
    token: str | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Checkpoint:
    """Locate and read a checkpoint in any supported layout, with its config and preprocessing.

    Validation comes before anything large is built: the JSON files first (types, ranges,
    consistency), then the weights file's structure (a safetensors header is checked before
    a tensor is read), dtypes and finiteness, then the config against what the weights'
    shapes describe.  ``layout`` (``--from``) None or ``auto`` detects it from the key names.
    """
    files = (
        model
        if isinstance(model, CheckpointFiles)
        else locate(model, revision=revision, cache_dir=cache_dir, token=token, on_note=on_note)
    )
    config_json = read_json(files.config) if files.config is not None else None
    if files.folder and config_json is not None and "model_type" in config_json:
        # A transformers folder's config: checked now, before the weights are read.  (Beside
        # a single weights file it may describe another model, and counts only if the
        # weights turn out to be in transformers' layout.)
        ConvNextConfig.from_dict(config_json, where=str(files.config))
    preprocess = (
        PreprocessSpec.from_file(files.preprocessor) if files.preprocessor is not None else None
    )
    tensors = unwrap(read_weights_file(files.weights))
    check_tensors(tensors, files.weights)
    found, body, config = identify_weights(tensors, layout, where=str(files.weights))
    if found in TRANSFORMERS_LAYOUTS and config_json is not None:
        config = _config_json_for(config, config_json, files, body)
    else:
        config_json = None
    if "classifier.weight" not in body:
        config.id2label = {}  # a feature model: the head is an identity
    if preprocess is None:
        preprocess = _default_preprocessing(found, config, files)
    source = model if isinstance(model, str) else str(files.weights)
    return Checkpoint(
        config, with_backbone_prefix(body, config), preprocess, source, found, files, config_json
    )


def identify_weights(
    tensors: Mapping[str, Tensor], layout: str | None = None, *, where: str = "checkpoint"
) -> tuple[CheckpointLayout, StateDict, ConvNextConfig]:
    """What a state dict is: its layout (``layout`` when given, else detected), its tensors
    under transformers' names (no backbone prefix), and the config they describe (eps:
    transformers' default for its own layout, 1e-6 for the others, whose final norm uses
    it)."""
    found = CheckpointLayout.resolve(tensors, layout)
    body = rename(tensors, found)
    eps = HF_DEFAULT_NORM_EPS if found in TRANSFORMERS_LAYOUTS else NORM_EPS
    return found, body, ConvNextConfig.from_state_dict(body, layer_norm_eps=eps, where=where)


def _config_json_for(
    inferred: ConvNextConfig, config_json: dict[str, Any], files: CheckpointFiles, body: StateDict
) -> ConvNextConfig:
    """The config.json beside transformers weights, once it agrees with what they describe
    (a disagreement names the field, then the keys and shapes at fault)."""
    config = ConvNextConfig.from_dict(config_json, where=str(files.config))
    config.backbone_norms = inferred.backbone_norms  # what the weights hold
    problem = config.architecture_differences(inferred)
    if problem is not None:
        if not inferred.num_labels:
            config.id2label = {}
        _, details = _laid_out(config, with_backbone_prefix(body, config))
        raise CheckpointError(f"{files.config}: {problem}" + (f" ({details})" if details else ""))
    return config


def _default_preprocessing(
    layout: CheckpointLayout, config: ConvNextConfig, files: CheckpointFiles
) -> PreprocessSpec:
    """No preprocessor_config.json: a timm Hub repo's pretrained_cfg, else the layout's default."""
    if layout is CheckpointLayout.TIMM and files.config is not None:
        try:
            described = PreprocessSpec.from_timm_config(read_json(files.config))
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
            raise CheckpointError(
                f"{files.config}: pretrained_cfg: not a timm preprocessing description "
                f"({one_line(exc)})"
            ) from None
        if described is not None:
            return PreprocessSpec.from_dict(described.to_dict(), where=str(files.config))
    spec = PreprocessSpec.for_layout(layout, config)
    return PreprocessSpec.from_dict(spec.to_dict(), where=f"{files.weights} (defaults)")


def with_backbone_prefix(body: StateDict, config: ConvNextConfig) -> StateDict:
    """transformers' classification-model keys: the backbone under ``convnext.``/``convnextv2.``."""
    prefix = config.base_prefix + "."
    return {(k if k.startswith("classifier.") else prefix + k): v for k, v in body.items()}


# --------------------------------------------------------------------------- building


def assemble(
    config: ConvNextConfig, state_dict: StateDict, source: object
) -> ConvNeXtForClassification:
    """The model ``config`` describes, with ``state_dict``'s tensors as its parameters.

    This is the one key-and-shape check: the model is laid out on the meta device (no
    memory, no random init), its keys and shapes are compared with the checkpoint's (one
    line naming missing and unexpected keys and shape mismatches), then the tensors are
    loaded strictly in place.
    """
    model, problems = _laid_out(config, state_dict)
    if problems:
        raise CheckpointError(
            f"{source}: weights do not fit transformers' ConvNeXt (depths {config.depths}, "
            f"widths {config.hidden_sizes}): {problems}"
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def _laid_out(
    config: ConvNextConfig, state_dict: StateDict
) -> tuple[ConvNeXtForClassification, str | None]:
    """The model for ``config`` on the meta device, and how ``state_dict`` fails to fit it."""
    with torch.device("meta"):
        model = ConvNeXtForClassification(config)
    prefix = config.base_prefix + "."
    expected = {k.removeprefix(prefix): tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k.removeprefix(prefix): v for k, v in state_dict.items()}
    return model, shape_problems(expected, found)


def build_model(
    checkpoint: Checkpoint,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    fuse: bool = True,
) -> ConvNeXtForClassification:
    """:func:`assemble`, then move and cast; eval mode, no gradients.

    On CPU with channels_last, blocks switch to oneDNN's fused kernels (see cpu_fusion).
    """
    from convnext_cli.model.cpu_fusion import fuse_blocks

    model = assemble(checkpoint.config, checkpoint.state_dict, checkpoint.source)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    # one pass for device, dtype and layout (torch's stubs lack the memory_format overload)
    model = model.to(device=device, dtype=dtype or torch.float32, memory_format=layout)  # type: ignore[call-overload]
    model = model.eval().requires_grad_(False)
    if fuse and channels_last and torch.device(device).type == "cpu":
        fuse_blocks(model)
    return model
