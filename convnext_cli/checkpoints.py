"""Finding, reading and checking checkpoints.

locate (Hub id[@revision], Hub-layout folder, or single weights file)
  -> read (safetensors preferred; pickles only with ``weights_only=True``)
  -> foreign layouts renamed to transformers' keys (:mod:`convnext_cli.layouts`)
  -> config + preprocessing spec + a key-by-key, shape-by-shape check that fails loudly.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnext_cli.config import MAX_JSON_BYTES, ConvNextConfig, json_kind, no_duplicate_keys
from convnext_cli.errors import CheckpointError, one_line
from convnext_cli.preprocess import PreprocessSpec
from convnext_cli.weights_io import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    check_tensors,
    read_weights_file,
    shape_problems,
)

if TYPE_CHECKING:
    import torch

    from convnext_cli.model import ConvNeXtForClassification

DEFAULT_MODEL = "facebook/convnext-tiny-224"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass
class Checkpoint:
    """Everything needed to build a model: config, weights (transformers keys), preprocessing."""

    config: ConvNextConfig
    state_dict: dict[str, torch.Tensor]
    preprocess: PreprocessSpec
    source: str
    layout: str
    # The files it was read from (weights, config.json, preprocessor_config.json), as found:
    # an output must never be written over one of them.
    files: list[Path] = field(default_factory=list)

    @property
    def has_head(self) -> bool:
        return "classifier.weight" in self.state_dict


def split_revision(model: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``)."""
    if "@" in model:
        repo_id, revision = model.rsplit("@", 1)
        return repo_id, revision or None
    return model, None


def looks_like_hub_id(model: str) -> bool:
    repo_id, _ = split_revision(model)
    parts = repo_id.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not repo_id.startswith((".", "~"))


def resolve_local(model: str) -> Path:
    """A local path as is; a Hub id downloaded (or found in the cache) to a snapshot folder."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(model) or model.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        raise CheckpointError(f"{model}: no such file or folder, and not a Hugging Face Hub id")
    return download_from_hub(model)


def download_from_hub(model: str) -> Path:
    """Fetch config, preprocessor config and weights through huggingface_hub and its cache.

    ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are honoured by
    huggingface_hub itself.  ``model.safetensors`` is preferred; ``pytorch_model.bin`` is
    fetched only when a repo has no safetensors file.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = split_revision(model)
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except GatedRepoError as exc:
            raise CheckpointError(f"{model}: gated repo; log in or set HF_TOKEN") from exc
        except RepositoryNotFoundError as exc:
            raise CheckpointError(
                f"{model}: no such model on the Hugging Face Hub (or it is private: set HF_TOKEN)"
            ) from exc
        except RevisionNotFoundError as exc:
            raise CheckpointError(f"{model}: no revision {revision!r} on the Hub") from exc
        except HFValidationError as exc:
            raise CheckpointError(f"{model}: not a valid Hub id ({one_line(exc)})") from exc
        except LocalEntryNotFoundError as exc:
            if filename != CONFIG_FILE:
                return None  # offline, and this optional file was never cached
            why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub is unreachable"
            raise CheckpointError(
                f"{model}: {why} and the model is not in the local cache "
                "(pass -m a local folder or weights file)"
            ) from exc
        except EntryNotFoundError:
            return None
        except Exception as exc:  # network failures come in many types
            raise CheckpointError(f"{model}: download failed ({one_line(exc)})") from exc

    with _quiet_hub_logging():
        if fetch(CONFIG_FILE) is None:
            raise CheckpointError(f"{model}: the repo has no config.json")
        fetch(PREPROCESSOR_FILE)
        for name in WEIGHT_FILES:
            weights = fetch(name)
            if weights is not None:
                return weights.parent
    raise CheckpointError(f"{model}: the repo has neither {' nor '.join(WEIGHT_FILES)}")


@contextlib.contextmanager
def _quiet_hub_logging() -> Iterator[None]:
    """huggingface_hub logs every network retry; the one-line error at the end says it all."""
    from huggingface_hub.utils import logging as hub_logging

    previous = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(previous)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (at most MAX_JSON_BYTES, no key given twice), or a
    one-line CheckpointError."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(
                f"{path}: {size} bytes is too large for a config file (at most {MAX_JSON_BYTES})"
            )
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicate_keys)
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({one_line(exc)})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {json_kind(data)}")
    return data


def folder_weights(folder: Path) -> Path:
    """``model.safetensors``, else ``pytorch_model.bin``, else the folder's only weights file."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise CheckpointError(f"{folder}: sharded checkpoints are not supported")
    suffixes = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in sorted(folder.iterdir())[:8]) or "nothing"
    raise CheckpointError(
        f"{folder}: no weights file ({' or '.join(WEIGHT_FILES)}) in the folder; found: {found}"
    )


def load_checkpoint(model: str = DEFAULT_MODEL) -> Checkpoint:
    """Locate and read a checkpoint in any supported layout, with its config and preprocessing.

    Validation comes before anything large is built: the JSON files first (types, ranges,
    consistency), then the weights file's structure (a safetensors header is checked
    before a tensor is read), then dtypes and finiteness, then the config against the
    weights' shapes (stages, depths, widths, labels) before a model is even laid out.
    """
    path = resolve_local(model)
    folder = path if path.is_dir() else path.parent
    config_path = folder / CONFIG_FILE
    raw_config = read_json(config_path) if config_path.is_file() else None
    if path.is_dir() and raw_config is not None and "model_type" in raw_config:
        # A transformers folder's config: checked now, before the weights are read.  (Beside
        # a single weights file it may describe another model, and counts only if the
        # weights turn out to be in transformers' layout.)
        ConvNextConfig.from_dict(raw_config, where=str(config_path))
    pre_path = folder / PREPROCESSOR_FILE
    preprocess = PreprocessSpec.from_file(pre_path) if pre_path.is_file() else None

    weights_file = folder_weights(path) if path.is_dir() else path
    state_dict = read_weights_file(weights_file)
    if raw_config is not None and is_hf_layout(state_dict):
        layout = "hf"
        config = ConvNextConfig.from_dict(raw_config, where=str(config_path))
        tensors = _tensors_only(state_dict, weights_file)
        check_tensors(tensors, weights_file)
        check_config_against_weights(config, tensors, str(config_path), str(weights_file))
        state_dict = _normalise_hf_keys(tensors, config)
    else:
        from convnext_cli import layouts

        state_dict = layouts.unwrap(state_dict)
        check_tensors(state_dict, weights_file)
        layout = layouts.detect_layout(state_dict)
        state_dict, raw_config = layouts.to_hf(state_dict, layout)
        config = ConvNextConfig.from_dict(raw_config, where=str(weights_file))
        state_dict = _normalise_hf_keys(state_dict, config)
    if config.num_channels != 3:
        raise CheckpointError(
            f"{config_path if layout == 'hf' else weights_file}: num_channels: the model takes "
            f"{config.num_channels} input channels; images are decoded to RGB (3)"
        )

    if "classifier.weight" not in state_dict:
        config.id2label = {}  # a feature model: the head is an identity

    if preprocess is None:
        preprocess = PreprocessSpec.from_dict(
            _default_preprocessing(layout, raw_config, folder), where=f"{weights_file} (defaults)"
        )
    files = [weights_file] + [p for p in (config_path, pre_path) if p.is_file()]
    checkpoint = Checkpoint(config, state_dict, preprocess, model, layout, files)
    check_weights(checkpoint)
    return checkpoint


def _tensors_only(state_dict: dict[str, Any], source: Path) -> dict[str, torch.Tensor]:
    """A transformers state dict must hold tensors only."""
    import torch

    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
    return state_dict


def check_config_against_weights(
    config: ConvNextConfig, state_dict: dict[str, torch.Tensor], where: str, weights: str
) -> None:
    """config.json against what the weights' key names and shapes say, field by field.

    Runs before the model is laid out (even on the meta device), so a config whose depths
    or widths are far from the weights fails here in microseconds.
    """
    from convnext_cli import layouts

    prefixes = tuple(t + "." for t in ("convnext", "convnextv2"))
    body = {(k.split(".", 1)[1] if k.startswith(prefixes) else k): v for k, v in state_dict.items()}
    try:
        arch = layouts.infer_architecture(body)
    except CheckpointError as exc:
        raise CheckpointError(f"{weights}: not a ConvNeXt ({exc})") from None
    found: dict[str, Any] = {
        "model_type": arch.model_type,
        "num_stages": len(arch.depths),
        "depths": arch.depths,
        "hidden_sizes": arch.hidden_sizes,
        "num_channels": arch.num_channels,
        "patch_size": arch.patch_size,
    }
    num_labels = config.num_labels if arch.has_head else 0
    problem = next(
        (
            f"{name} is {getattr(config, name)!r} but the weights have {value!r}"
            for name, value in found.items()
            if getattr(config, name) != value
        ),
        None,
    )
    if problem is None and num_labels != arch.num_labels:
        problem = (
            f"num_labels/id2label name {config.num_labels} labels but the classifier has "
            f"{arch.num_labels} rows"
        )
    if problem is not None:
        # The keys and shapes at fault, from the config's shape table (a dict: the limits
        # on depths keep it small; no module is built).
        described = layouts.Architecture(
            v2=config.is_v2,
            num_channels=config.num_channels,
            patch_size=config.patch_size,
            depths=config.depths,
            hidden_sizes=config.hidden_sizes,
            layer_scale=not config.is_v2 and config.layer_scale_init_value > 0,
            num_labels=num_labels,
        )
        details = shape_problems(layouts.expected_shapes(described), body)
        raise CheckpointError(f"{where}: {problem}" + (f" ({details})" if details else ""))


def _default_preprocessing(layout: str, config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """No preprocessor_config.json: a timm Hub repo's pretrained_cfg, else the layout's default."""
    from convnext_cli import layouts

    timm_config = folder / CONFIG_FILE
    if layout == "timm" and timm_config.is_file():
        try:
            described = layouts.preprocessor_from_timm_config(read_json(timm_config))
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
            raise CheckpointError(
                f"{timm_config}: pretrained_cfg: not a timm preprocessing description "
                f"({one_line(exc)})"
            ) from None
        if described is not None:
            return described
    return layouts.default_preprocessor(layout, config)


def is_hf_layout(state_dict: dict[str, Any]) -> bool:
    """transformers' key names, with or without the backbone prefix."""
    return any(k.endswith("embeddings.patch_embeddings.weight") for k in state_dict)


def _normalise_hf_keys(state_dict: dict[str, Any], config: ConvNextConfig) -> dict[str, Any]:
    """A classifier checkpoint keeps its keys; a bare ``ConvNextModel`` gets the backbone prefix."""
    prefix = config.base_prefix + "."
    if any(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {(k if k.startswith("classifier.") else prefix + k): v for k, v in state_dict.items()}


def expected_shapes(config: ConvNextConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape the model for this config has (no allocation)."""
    import torch

    from convnext_cli.model import ConvNeXtForClassification

    with torch.device("meta"):
        model = ConvNeXtForClassification(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_weights(checkpoint: Checkpoint) -> None:
    """Fail with one line naming missing and unexpected keys and shape mismatches."""
    problems = shape_problems(expected_shapes(checkpoint.config), checkpoint.state_dict)
    if problems:
        raise CheckpointError(f"{checkpoint.source}: weights do not match the config: {problems}")


def build_model(
    checkpoint: Checkpoint,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    fuse: bool = True,
) -> ConvNeXtForClassification:
    """Instantiate the model without a random init, load the weights strictly, move and cast.

    On CPU with channels_last, blocks switch to oneDNN's fused kernels (see cpu_fusion).
    """
    import torch

    from convnext_cli.model import ConvNeXtForClassification

    with torch.device("meta"):
        model = ConvNeXtForClassification(checkpoint.config)
    model.load_state_dict(checkpoint.state_dict, strict=True, assign=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    # one pass for device, dtype and layout (torch's stubs lack the memory_format overload)
    model = model.to(device=device, dtype=dtype or torch.float32, memory_format=layout)  # type: ignore[call-overload]
    model = model.eval().requires_grad_(False)
    if fuse and channels_last and torch.device(device).type == "cpu":
        from convnext_cli.cpu_fusion import fuse_blocks

        fuse_blocks(model)
    return model


def load_model(
    model: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> ConvNeXtForClassification:
    """Load any supported checkpoint as a ready-to-run model (``.config``, ``.preprocess`` set)."""
    checkpoint = load_checkpoint(model)
    net = build_model(checkpoint, device=device, dtype=dtype)
    net.preprocess = checkpoint.preprocess  # type: ignore[assignment]  # read by callers
    return net
