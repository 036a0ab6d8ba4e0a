"""Checkpoint layouts: which one a state dict is in, and its keys renamed to transformers'.

This module only detects and renames; what the renamed tensors describe (a
:class:`~convnext_cli.model.config.ConvNextConfig`, :meth:`ConvNextConfig.from_state_dict`), how
they are checked (one strict load, :func:`convnext_cli.checkpoints.checkpoint.assemble`) and how
each
layout's images are preprocessed (:meth:`convnext_cli.imaging.preprocess.PreprocessSpec.for_layout`)
live with the config, the model and the preprocessor.

Each :class:`CheckpointLayout` member carries its display name, its rename rules and its detection:

``hf``
    transformers' ``ConvNextForImageClassification`` / ``ConvNextV2ForImageClassification``
    (``convnext.`` / ``convnextv2.`` prefix, ``classifier.``) or a bare ``ConvNextModel`` /
    ``ConvNextV2Model`` (``embeddings.``, ``encoder.``, ``layernorm.``).
``fb``
    facebookresearch ConvNeXt and ConvNeXt-V2 (``downsample_layers.``, ``stages.i.j.``,
    ``gamma`` layer scale, ``grn.gamma``/``grn.beta`` of shape (1, 1, 1, C), ``norm.``,
    ``head.``).
``fcmae``
    ConvNeXt-V2 FCMAE pre-training checkpoints: the sparse (MinkowskiEngine) encoder under
    ``encoder.``, with ``.kernel`` convolution weights of shape (k*k, C) (depthwise) or
    (k*k, C_in, C_out), ``.ln.`` / ``.linear.`` wrappers, 2-D biases and (1, C) GRN
    parameters, next to a decoder (``proj.``, ``mask_token``, ``decoder.``, ``pred.``) that
    is dropped.  Densified to the ``fb`` layout first, then renamed by its rules.
``timm``
    timm's ``ConvNeXt`` (``stem.``, ``stages.i.downsample.``, ``stages.i.blocks.j.``,
    ``conv_dw``, ``mlp.fc1``/``mlp.fc2`` as Linear or, for atto..nano, 1x1 convolutions,
    1-D ``mlp.grn`` parameters, ``head.norm``, ``head.fc``).
``tf``
    transformers' TensorFlow models (``TFConvNextForImageClassification``,
    ``TFConvNextV2...``, ``TFConvNextModel``) saved as Keras HDF5 weights (``tf_model.h5``):
    ``<layer>/<model name>/convnext/encoder/stages.0/layers.0/dwconv/kernel:0`` and so on.
    Mapped as transformers' ``convert_tf_weight_name_to_pt_weight_name`` does (``:0``
    dropped, ``_._`` a level, the model's name dropped, ``kernel``/``gamma`` -> ``weight``,
    ``beta`` -> ``bias``), kernels transposed to PyTorch's layout (Conv2D (kh, kw, in, out)
    -> (out, in, kh, kw), Dense (in, out) -> (out, in)); then transformers' rules.
``torchvision``
    torchvision's ``convnext_*`` (``features.N``, ``block.0/2/3/5``, ``layer_scale`` of shape
    (C, 1, 1), ``classifier.0``/``classifier.2``).

Decisions:

* FCMAE encoders (and timm's ``fcmae`` weights) have no final LayerNorm.  The headless model
  gets an identity-affine one (weight 1, bias 0): ``last_hidden_state`` is the encoder
  output unchanged and ``pooler_output`` is the standardised mean-pooled feature, exactly
  what the ConvNeXt-V2 fine-tuning recipe starts from.
* Variants transformers cannot express (timm's ``norm_pre``/head-norm-first models, MLP
  heads, ...) have keys no rule claims, and are refused naming them; other shapes
  (kernel sizes other than 7, MLP ratios other than 4, ...) fail the strict load.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from convnext_cli.choices import LAYOUTS
from convnext_cli.errors import CheckpointError, UsageError

# Containers that training scripts wrap a state dict in, in order of preference.
CONTAINER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "ema", "module", "net")
# Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

StateDict = dict[str, Tensor]


# --------------------------------------------------------------------------- unwrapping


def unwrap(obj: Mapping[str, Any]) -> StateDict:
    """The tensors of a checkpoint, out of ``{"model": ...}``-style containers and DDP prefixes.

    Containers are searched in the order of :data:`CONTAINER_KEYS` (``model`` before
    ``model_ema``: the facebookresearch ``*_ema.pth`` files keep their EMA weights under
    ``model``), nested ones too.  Non-tensor entries at the state-dict level are dropped.
    """
    current: Any = obj
    for _ in range(8):
        if not isinstance(current, Mapping):
            raise CheckpointError(f"expected a dict of tensors, found {type(current).__name__}")
        if any(isinstance(v, torch.Tensor) for v in current.values()):
            break
        inner = next(
            (current[k] for k in CONTAINER_KEYS if isinstance(current.get(k), Mapping)), None
        )
        if inner is None:
            shown = ", ".join(map(str, list(current)[:6])) or "nothing"
            raise CheckpointError(f"no tensors in the checkpoint (top-level keys: {shown})")
        current = inner
    tensors = {str(k): v for k, v in current.items() if isinstance(v, torch.Tensor)}
    return {_strip_wrappers(k): v for k, v in tensors.items()}


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


# --------------------------------------------------------------------------- detection


def _is_fcmae_key(key: str) -> bool:
    if key.startswith("encoder.downsample_layers."):
        return True
    if key.startswith(("stages.", "downsample_layers.", "encoder.stages.")):
        return key.endswith(".kernel") or ".ln." in key or ".linear." in key
    return False


def _show(keys: Iterable[str], limit: int = 5) -> str:
    names = list(keys)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------- renaming

Transform = Callable[["Tensor", str], "Tensor"]
Target = str | Callable[[re.Match[str]], "str | None"] | None


@dataclass(frozen=True)
class Rule:
    """A key pattern (full match), its transformers name (template, function, or None: drop)."""

    pattern: re.Pattern[str]
    target: Target
    transform: Transform | None = None


def _rule(pattern: str, target: Target, transform: Transform | None = None) -> Rule:
    return Rule(re.compile(pattern), target, transform)


def _as_linear(value: Tensor, key: str) -> Tensor:
    """A 1x1 convolution weight (out, in, 1, 1) as a Linear weight (out, in)."""
    if value.ndim == 4:
        if tuple(value.shape[2:]) != (1, 1):
            raise CheckpointError(
                f"{key}: pointwise weight has a {tuple(value.shape[2:])} kernel, expected 1x1"
            )
        return value.reshape(value.shape[0], value.shape[1])
    return value


def _flatten(value: Tensor, key: str) -> Tensor:
    """Layer scale (C,), (C, 1, 1) or (1, C): to transformers' (C,)."""
    return value.reshape(-1)


def _grn(value: Tensor, key: str) -> Tensor:
    """GRN weight/bias (C,), (1, C) or (1, 1, 1, C): to transformers' (1, 1, 1, C)."""
    return value.reshape(1, 1, 1, -1)


_BLOCK = r"encoder.stages.{s}.layers.{b}."
_DOWN = r"encoder.stages.{s}.downsampling_layer."

HF_RULES = (
    _rule(
        r"(?:convnext|convnextv2)\.((?:embeddings|encoder|layernorm|hidden_states_norms)\..+)",
        r"\1",
    ),
    _rule(r"((?:embeddings|encoder|layernorm|hidden_states_norms)\..+)", r"\1"),
    _rule(r"(classifier\.(?:weight|bias))", r"\1"),
)

_HB = r"encoder.stages.\1.layers.\2."
_WB = r"\.(weight|bias)"


def _dense_rules(
    stem: str, downsample: str, block: str, parts: Mapping[str, str], final: str, head: str
) -> tuple[Rule, ...]:
    """The rules of a layout that is fb's but for its names (fb itself, timm).

    ``stem``: the patchify conv and its norm are ``stem`` 0 and 1; ``downsample``: stage i's
    norm and conv are ``downsample`` (its group 1 is i) 0 and 1; ``block``: block j of stage i
    (groups 1 and 2) holds ``parts``, each transformers' name of a block part (``dwconv``,
    ``layernorm``, ``pwconv1``, ``pwconv2``, ``gamma``, ``grn.weight``, ``grn.bias``) to its
    name here; ``final`` and ``head``: the last norm and the classifier.
    """
    part = {name: block + pattern for name, pattern in parts.items()}
    return (
        _rule(stem + r"0" + _WB, r"embeddings.patch_embeddings.\1"),
        _rule(stem + r"1" + _WB, r"embeddings.layernorm.\1"),
        _rule(downsample + r"\.([01])" + _WB, r"encoder.stages.\1.downsampling_layer.\2.\3"),
        _rule(part["dwconv"] + _WB, _HB + r"dwconv.\3"),
        _rule(part["layernorm"] + _WB, _HB + r"layernorm.\3"),
        _rule(part["pwconv1"] + _WB, _HB + r"pwconv1.\3", _as_linear),
        _rule(part["pwconv2"] + _WB, _HB + r"pwconv2.\3", _as_linear),
        _rule(part["gamma"], _HB + r"layer_scale_parameter", _flatten),
        _rule(part["grn.weight"], _HB + r"grn.weight", _grn),
        _rule(part["grn.bias"], _HB + r"grn.bias", _grn),
        _rule(final + _WB, r"layernorm.\1"),
        _rule(head + _WB, r"classifier.\1"),
    )


FB_PARTS = {
    "dwconv": r"dwconv",
    "layernorm": r"norm",
    "pwconv1": r"pwconv1",
    "pwconv2": r"pwconv2",
    "gamma": r"gamma",
    "grn.weight": r"grn\.gamma",
    "grn.bias": r"grn\.beta",
}
TIMM_PARTS = {
    "dwconv": r"conv_dw",
    "layernorm": r"norm",
    "pwconv1": r"mlp\.fc1",
    "pwconv2": r"mlp\.fc2",
    "gamma": r"gamma",
    "grn.weight": r"mlp\.grn\.weight",
    "grn.bias": r"mlp\.grn\.bias",
}
FB_RULES = _dense_rules(
    r"downsample_layers\.0\.",
    r"downsample_layers\.(\d+)",
    r"stages\.(\d+)\.(\d+)\.",
    FB_PARTS,
    final=r"norm",
    head=r"head",
)
TIMM_RULES = _dense_rules(
    r"stem\.",
    r"stages\.(\d+)\.downsample",
    r"stages\.(\d+)\.blocks\.(\d+)\.",
    TIMM_PARTS,
    final=r"head\.norm",
    head=r"head\.fc",
)


def _tv_downsample(m: re.Match[str]) -> str | None:
    index = int(m.group(1))  # features.2k is the downsampling into stage k
    if index < 2 or index % 2:
        return None
    return f"encoder.stages.{index // 2}.downsampling_layer.{m.group(2)}.{m.group(3)}"


_TV_BLOCK_PARTS = {"0": "dwconv", "2": "layernorm", "3": "pwconv1", "5": "pwconv2"}


def _tv_block(m: re.Match[str]) -> str | None:
    index = int(m.group(1))  # features.(2k+1) holds the blocks of stage k
    part = _TV_BLOCK_PARTS.get(m.group(3))
    if index % 2 == 0 or part is None:
        return None
    return f"encoder.stages.{(index - 1) // 2}.layers.{m.group(2)}.{part}.{m.group(4)}"


def _tv_layer_scale(m: re.Match[str]) -> str | None:
    index = int(m.group(1))
    if index % 2 == 0:
        return None
    return f"encoder.stages.{(index - 1) // 2}.layers.{m.group(2)}.layer_scale_parameter"


TORCHVISION_RULES = (
    _rule(r"features\.0\.0\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    _rule(r"features\.0\.1\.(weight|bias)", r"embeddings.layernorm.\1"),
    _rule(r"features\.(\d+)\.([01])\.(weight|bias)", _tv_downsample),
    _rule(r"features\.(\d+)\.(\d+)\.block\.(\d+)\.(weight|bias)", _tv_block),
    _rule(r"features\.(\d+)\.(\d+)\.layer_scale", _tv_layer_scale, _flatten),
    _rule(r"classifier\.0\.(weight|bias)", r"layernorm.\1"),
    _rule(r"classifier\.2\.(weight|bias)", r"classifier.\1"),
)


# --------------------------------------------------------------------------- Keras

# where transformers' names begin once the HDF5 layer group and the model's name are dropped
_HF_ROOTS = ("convnext", "convnextv2", "embeddings", "encoder", "layernorm", "classifier")


def _is_keras_key(key: str) -> bool:
    return key.endswith(":0") and "/" in key


def keras_to_hf(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Keras HDF5 weight paths to transformers' PyTorch names, kernels transposed (see the
    ``tf`` layout in the module docstring)."""
    out: StateDict = {}
    for path, value in state_dict.items():
        parts = [p for p in path.removesuffix(":0").replace("_._", "/").split("/") if p]
        if len(parts) > 1:
            parts = parts[1:]  # the HDF5 group of the top-level Keras layer
        if len(parts) > 1 and parts[0] not in _HF_ROOTS:
            parts = parts[1:]  # the model's name (level zero in transformers' mapping)
        last = parts[-1] if parts else ""
        if last == "kernel" and value.ndim == 4:  # Conv2D (kh, kw, in/groups, out)
            value = value.permute(3, 2, 0, 1)
        elif last == "kernel" and value.ndim == 2:  # Dense (in, out)
            value = value.t()
        if last in ("kernel", "gamma"):
            parts[-1] = "weight"
        elif last == "beta":
            parts[-1] = "bias"
        key = ".".join(parts)
        if key in out:
            raise CheckpointError(f"Keras checkpoint: two weights map to {key} ({path})")
        out[key] = value.contiguous()
    return out


def _apply_rules(rules: Iterable[Rule], key: str, value: Tensor) -> tuple[str, Tensor] | None:
    for rule in rules:
        match = rule.pattern.fullmatch(key)
        if match is None:
            continue
        if callable(rule.target):
            new_key = rule.target(match)
        elif rule.target is None:
            new_key = None
        else:
            new_key = match.expand(rule.target)
        if new_key is None:
            return None
        return new_key, (rule.transform(value, key) if rule.transform else value)
    return None


# --------------------------------------------------------------------------- FCMAE


def fcmae_to_fb(state_dict: Mapping[str, Tensor]) -> StateDict:
    """The dense facebookresearch ConvNeXt-V2 encoder from an FCMAE (sparse) checkpoint.

    Keys outside ``encoder.`` (the decoder, ``proj``, ``pred``, ``mask_token``) are dropped.
    MinkowskiEngine stores a k x k convolution as a (k*k, C_in, C_out) ``kernel`` whose
    row ``w * k + h`` is the dense weight's ``[:, :, h, w]`` (column-major over the window, as
    ConvNeXt-V2's ``remap_checkpoint_keys`` reads it), and a depthwise one as (k*k, C).
    """
    out: StateDict = {}
    has_encoder = any(k.startswith("encoder.") for k in state_dict)
    for key, value in state_dict.items():
        if has_encoder:
            if not key.startswith("encoder."):
                continue  # decoder, proj, pred, mask_token: pre-training only
            key = key[len("encoder.") :]
        parts = key.split(".")
        if parts[-1] == "kernel":
            key = ".".join(parts[:-1] + ["weight"])
            value = sparse_kernel_to_dense(value, key)
        elif len(parts) >= 2 and parts[-2] in ("ln", "linear"):
            key = ".".join(parts[:-2] + parts[-1:])
        if key.endswith(".bias") and value.ndim == 2:
            value = value.reshape(-1)
        out[key] = value
    return out


def sparse_kernel_to_dense(kernel: Tensor, key: str) -> Tensor:
    """A MinkowskiEngine kernel as a dense ``nn.Conv2d`` weight (see :func:`fcmae_to_fb`)."""
    if kernel.ndim == 2:  # depthwise: (k*k, C) -> (C, 1, k, k)
        volume, channels = kernel.shape
        size = _kernel_side(volume, key)
        return kernel.permute(1, 0).reshape(channels, 1, size, size).transpose(2, 3).contiguous()
    if kernel.ndim == 3:  # (k*k, C_in, C_out) -> (C_out, C_in, k, k)
        volume, c_in, c_out = kernel.shape
        size = _kernel_side(volume, key)
        return kernel.permute(2, 1, 0).reshape(c_out, c_in, size, size).transpose(2, 3).contiguous()
    raise CheckpointError(f"{key}: sparse kernel of shape {list(kernel.shape)} is not 2-D or 3-D")


def _kernel_side(volume: int, key: str) -> int:
    side = math.isqrt(volume)
    if side * side != volume:
        raise CheckpointError(f"{key}: kernel volume {volume} is not a square window")
    return side


def _add_identity_final_norm(body: StateDict) -> StateDict:
    """A headless encoder without a final LayerNorm gets weight 1, bias 0 (module docstring)."""
    if "layernorm.weight" in body or "classifier.weight" in body:
        return body
    last = max((int(m.group(1)) for k in body if (m := _STAGE.match(k))), default=None)
    scale = body.get(f"encoder.stages.{last}.layers.0.dwconv.bias")
    if scale is None:
        return body  # not a ConvNeXt body: the strict load says what is missing
    ones = torch.ones_like(scale)
    return {**body, "layernorm.weight": ones, "layernorm.bias": torch.zeros_like(scale)}


_STAGE = re.compile(r"encoder\.stages\.(\d+)\.layers\.")


# --------------------------------------------------------------------------- the layouts


def _detect_hf(keys: set[str]) -> bool:
    stem = "embeddings.patch_embeddings.weight"
    return any(k in keys for k in (stem, f"convnext.{stem}", f"convnextv2.{stem}"))


def _has_fcmae_keys(keys: set[str]) -> bool:
    return any(_is_fcmae_key(k) for k in keys)


def _detect_timm(keys: set[str]) -> bool:
    return "stem.0.weight" in keys and any(k.startswith("stages.") for k in keys)


class CheckpointLayout(str, Enum):
    """A checkpoint layout: its name (``--from``), display name, rename rules and detection.

    Adding a layout is one member here, one rule table above and one detection function.
    Detection tries the members in order.
    """

    display: str
    rules: tuple[Rule, ...]
    detect: Callable[[set[str]], bool]
    densify: Callable[[Mapping[str, Tensor]], StateDict] | None

    def __new__(
        cls,
        name: str,
        display: str,
        rules: tuple[Rule, ...],
        detect: Callable[[set[str]], bool],
        densify: Callable[[Mapping[str, Tensor]], StateDict] | None = None,
    ) -> CheckpointLayout:
        member = str.__new__(cls, name)
        member._value_ = name
        member.display = display
        member.rules = rules
        member.detect = detect
        member.densify = densify
        return member

    HF = ("hf", "transformers", HF_RULES, _detect_hf)
    FB = (
        "fb",
        "facebookresearch",
        FB_RULES,
        lambda keys: "downsample_layers.0.0.weight" in keys and not _has_fcmae_keys(keys),
    )
    FCMAE = ("fcmae", "ConvNeXt-V2 FCMAE", FB_RULES, _has_fcmae_keys, fcmae_to_fb)
    TIMM = ("timm", "timm", TIMM_RULES, _detect_timm)
    TORCHVISION = (
        "torchvision",
        "torchvision",
        TORCHVISION_RULES,
        lambda keys: "features.0.0.weight" in keys,
    )
    KERAS = (
        "tf",
        "TensorFlow/Keras",
        HF_RULES,
        lambda keys: any(_is_keras_key(k) for k in keys),
        keras_to_hf,
    )

    def __str__(self) -> str:
        return self.value

    @classmethod
    def detect_from(cls, state_dict: Mapping[str, Any]) -> CheckpointLayout:
        """The layout a state dict is in, from its key names."""
        keys = set(state_dict)
        found = next((layout for layout in cls if layout.detect(keys)), None)
        if found is None:
            raise CheckpointError(
                f"not a ConvNeXt checkpoint in any known layout ({len(keys)} tensors; keys "
                f"include {_show(state_dict)}); expected transformers, facebookresearch "
                "(ConvNeXt, ConvNeXt-V2, FCMAE), timm, torchvision or TensorFlow/Keras weights"
            )
        return found

    @classmethod
    def resolve(cls, state_dict: Mapping[str, Any], name: str | None) -> CheckpointLayout:
        """``auto``/None: detected; ``fb`` given for an FCMAE checkpoint: ``fcmae``."""
        if name is None or name == "auto":
            return cls.detect_from(state_dict)
        if name not in LAYOUTS:
            raise UsageError(f"unknown layout {name!r} (use auto or one of {', '.join(LAYOUTS)})")
        if name == "fb" and _has_fcmae_keys(set(state_dict)):
            return cls.FCMAE
        return next(layout for layout in cls if layout.value == name)


def detect_layout(state_dict: Mapping[str, Any]) -> CheckpointLayout:
    """:meth:`CheckpointLayout.detect_from`."""
    return CheckpointLayout.detect_from(state_dict)


def rename(state_dict: Mapping[str, Tensor], layout: CheckpointLayout) -> StateDict:
    """Keys (and shapes) of ``layout`` to transformers' names, without the backbone prefix.

    The result uses ``embeddings.`` / ``encoder.`` / ``layernorm.`` for the backbone and
    ``classifier.`` for the head.  A key no rule claims is an error naming it.
    """
    if layout.densify is not None:
        state_dict = layout.densify(state_dict)
    out: StateDict = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        renamed = _apply_rules(layout.rules, key, value)
        if renamed is None:
            unknown.append(key)
            continue
        new_key, new_value = renamed
        if new_key in out:
            raise CheckpointError(f"{layout.display}: two tensors map to {new_key}")
        out[new_key] = new_value
    if unknown:
        raise CheckpointError(
            f"{layout.display} checkpoint: {len(unknown)} keys have no place in "
            f"transformers' ConvNeXt ({_show(unknown, 4)}); wrong --from, or a variant "
            "transformers cannot express"
        )
    return _add_identity_final_norm(out)
