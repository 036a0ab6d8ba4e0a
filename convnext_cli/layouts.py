"""Foreign checkpoint layouts -> transformers' ConvNeXt key names, shapes and config.json.

Every layout this project reads is handled here, as pure functions over state dicts:

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
    is dropped.
``timm``
    timm's ``ConvNeXt`` (``stem.``, ``stages.i.downsample.``, ``stages.i.blocks.j.``,
    ``conv_dw``, ``mlp.fc1``/``mlp.fc2`` as Linear or, for atto..nano, 1x1 convolutions,
    1-D ``mlp.grn`` parameters, ``head.norm``, ``head.fc``).
``torchvision``
    torchvision's ``convnext_*`` (``features.N``, ``block.0/2/3/5``, ``layer_scale`` of shape
    (C, 1, 1), ``classifier.0``/``classifier.2``).

:func:`to_hf` renames and reshapes, infers the architecture from tensor shapes (V1 vs V2
from GRN keys, depths from block indices, widths/patch size/channels/labels from shapes),
and checks the result key by key and shape by shape against what transformers builds for
that config, so a checkpoint that does not fit fails here with one line, not later.

Decisions:

* A checkpoint with a classifier gets exactly the keys of transformers'
  ``*ForImageClassification``; a headless one (FCMAE encoders, any layout with its head
  removed) gets the keys of ``ConvNextModel`` / ``ConvNextV2Model`` saved on its own.  No
  classifier is ever invented.
* FCMAE encoders (and timm's ``fcmae`` weights) have no final LayerNorm.  The headless model
  gets an identity-affine one (weight 1, bias 0, eps 1e-6): ``last_hidden_state`` is the
  encoder output unchanged and ``pooler_output`` is the standardised mean-pooled feature,
  exactly what the ConvNeXt-V2 fine-tuning recipe starts from (a freshly initialised
  ``nn.LayerNorm`` on the pooled feature).
* fb, fcmae, timm and torchvision models use eps 1e-6 in their final norm, so their configs
  say ``layer_norm_eps: 1e-6`` (transformers' default 1e-12 would change the numbers).
* V1 checkpoints without layer-scale parameters get ``layer_scale_init_value: 0.0``.
* Variants transformers cannot express (timm's ``norm_pre``/head-norm-first models, MLP
  heads, overlapping stems, kernel sizes other than 7, MLP ratios other than 4, ...) are
  refused with a :class:`~convnext_cli.errors.CheckpointError` naming the offending keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convnext_cli.errors import CheckpointError, UsageError
from convnext_cli.labels import id2label_dict, label2id_dict, labels_for
from convnext_cli.weights_io import shape_problems

if TYPE_CHECKING:
    from torch import Tensor

LAYOUTS = ("hf", "fb", "fcmae", "timm", "torchvision")
LAYOUT_NAMES = {
    "hf": "transformers",
    "fb": "facebookresearch",
    "fcmae": "ConvNeXt-V2 FCMAE",
    "timm": "timm",
    "torchvision": "torchvision",
}

# Containers that training scripts wrap a state dict in, in order of preference.
CONTAINER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "ema", "module", "net")
# Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

NORM_EPS = 1e-6  # the final LayerNorm of the fb, fcmae, timm and torchvision models
HF_DEFAULT_NORM_EPS = 1e-12  # transformers' ConvNextConfig default, used by Hub checkpoints
DEFAULT_IMAGE_SIZE = 224
DEFAULT_CROP_PCT = 0.875
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PIL_NEAREST, PIL_LANCZOS, PIL_BILINEAR, PIL_BICUBIC, PIL_BOX, PIL_HAMMING = 0, 1, 2, 3, 4, 5

# torchvision's ConvNeXt weights: eval transform resizes the short side (bilinear) to this,
# then centre-crops 224.  Keyed by (depths, hidden_sizes).
TORCHVISION_RESIZE: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {
    ((3, 3, 9, 3), (96, 192, 384, 768)): 236,  # convnext_tiny
    ((3, 3, 27, 3), (96, 192, 384, 768)): 230,  # convnext_small
    ((3, 3, 27, 3), (128, 256, 512, 1024)): 232,  # convnext_base
    ((3, 3, 27, 3), (192, 384, 768, 1536)): 232,  # convnext_large
}
TORCHVISION_CROP = 224

DW_KERNEL = 7  # transformers' ConvNeXt depthwise kernel
MLP_RATIO = 4
DOWNSAMPLE_KERNEL = 2

StateDict = dict[str, "Tensor"]


# --------------------------------------------------------------------------- unwrapping


def unwrap(obj: Mapping[str, Any]) -> StateDict:
    """The tensors of a checkpoint, out of ``{"model": ...}``-style containers and DDP prefixes.

    Containers are searched in the order of :data:`CONTAINER_KEYS` (``model`` before
    ``model_ema``: the facebookresearch ``*_ema.pth`` files keep their EMA weights under
    ``model``), nested ones too.  Non-tensor entries at the state-dict level are dropped.
    """
    import torch

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


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """Which of :data:`LAYOUTS` a state dict is in, from its key names."""
    keys = set(state_dict)
    if any(_is_fcmae_key(k) for k in keys):
        return "fcmae"
    hf_stems = ("embeddings.patch_embeddings.weight",)
    if any(k in keys for k in hf_stems) or any(
        f"{base}.{k}" in keys for base in ("convnext", "convnextv2") for k in hf_stems
    ):
        return "hf"
    if "downsample_layers.0.0.weight" in keys:
        return "fb"
    if "stem.0.weight" in keys and any(k.startswith("stages.") for k in keys):
        return "timm"
    if "features.0.0.weight" in keys:
        return "torchvision"
    raise CheckpointError(
        f"not a ConvNeXt checkpoint in any known layout ({len(keys)} tensors; keys include "
        f"{_show(state_dict)}); expected transformers, facebookresearch (ConvNeXt, ConvNeXt-V2, "
        "FCMAE), timm or torchvision weights"
    )


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
    _rule(r"(?:convnext|convnextv2)\.((?:embeddings|encoder|layernorm)\..+)", r"\1"),
    _rule(r"((?:embeddings|encoder|layernorm)\..+)", r"\1"),
    _rule(r"(classifier\.(?:weight|bias))", r"\1"),
)

_FB = r"stages\.(\d+)\.(\d+)\."
_HB = r"encoder.stages.\1.layers.\2."
FB_RULES = (
    _rule(r"downsample_layers\.0\.0\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    _rule(r"downsample_layers\.0\.1\.(weight|bias)", r"embeddings.layernorm.\1"),
    _rule(
        r"downsample_layers\.(\d+)\.([01])\.(weight|bias)",
        r"encoder.stages.\1.downsampling_layer.\2.\3",
    ),
    _rule(_FB + r"dwconv\.(weight|bias)", _HB + r"dwconv.\3"),
    _rule(_FB + r"norm\.(weight|bias)", _HB + r"layernorm.\3"),
    _rule(_FB + r"(pwconv[12])\.(weight|bias)", _HB + r"\3.\4", _as_linear),
    _rule(_FB + r"gamma", _HB + r"layer_scale_parameter", _flatten),
    _rule(_FB + r"grn\.gamma", _HB + r"grn.weight", _grn),
    _rule(_FB + r"grn\.beta", _HB + r"grn.bias", _grn),
    _rule(r"norm\.(weight|bias)", r"layernorm.\1"),
    _rule(r"head\.(weight|bias)", r"classifier.\1"),
)

_TB = r"stages\.(\d+)\.blocks\.(\d+)\."
TIMM_RULES = (
    _rule(r"stem\.0\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    _rule(r"stem\.1\.(weight|bias)", r"embeddings.layernorm.\1"),
    _rule(
        r"stages\.(\d+)\.downsample\.([01])\.(weight|bias)",
        r"encoder.stages.\1.downsampling_layer.\2.\3",
    ),
    _rule(_TB + r"conv_dw\.(weight|bias)", _HB + r"dwconv.\3"),
    _rule(_TB + r"norm\.(weight|bias)", _HB + r"layernorm.\3"),
    _rule(_TB + r"mlp\.fc1\.(weight|bias)", _HB + r"pwconv1.\3", _as_linear),
    _rule(_TB + r"mlp\.fc2\.(weight|bias)", _HB + r"pwconv2.\3", _as_linear),
    _rule(_TB + r"gamma", _HB + r"layer_scale_parameter", _flatten),
    _rule(_TB + r"mlp\.grn\.(weight|bias)", _HB + r"grn.\3", _grn),
    _rule(r"head\.norm\.(weight|bias)", r"layernorm.\1"),
    _rule(r"head\.fc\.(weight|bias)", r"classifier.\1"),
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

RULES: dict[str, tuple[Rule, ...]] = {
    "hf": HF_RULES,
    "fb": FB_RULES,
    "timm": TIMM_RULES,
    "torchvision": TORCHVISION_RULES,
}


def rename(state_dict: Mapping[str, Tensor], layout: str) -> StateDict:
    """Keys (and shapes) of ``layout`` to transformers' names, without the backbone prefix.

    The result uses ``embeddings.`` / ``encoder.`` / ``layernorm.`` for the backbone and
    ``classifier.`` for the head.  A key no rule claims is an error naming it.
    """
    if layout == "fcmae":
        return rename(fcmae_to_fb(state_dict), "fb")
    rules = RULES.get(layout)
    if rules is None:
        raise UsageError(f"unknown layout {layout!r} (use auto or one of {', '.join(LAYOUTS)})")
    out: StateDict = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        renamed = _apply_rules(rules, key, value)
        if renamed is None:
            unknown.append(key)
            continue
        new_key, new_value = renamed
        if new_key in out:
            raise CheckpointError(f"{LAYOUT_NAMES[layout]}: two tensors map to {new_key}")
        out[new_key] = new_value
    if unknown:
        raise CheckpointError(
            f"{LAYOUT_NAMES[layout]} checkpoint: {len(unknown)} keys have no place in "
            f"transformers' ConvNeXt ({_show(unknown, 4)}); wrong --from, or a variant "
            "transformers cannot express"
        )
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


# --------------------------------------------------------------------------- architecture


@dataclass
class Architecture:
    """What the weights say about the model."""

    v2: bool
    num_channels: int
    patch_size: int
    depths: list[int]
    hidden_sizes: list[int]
    layer_scale: bool
    num_labels: int  # 0: headless

    @property
    def model_type(self) -> str:
        return "convnextv2" if self.v2 else "convnext"

    @property
    def has_head(self) -> bool:
        return self.num_labels > 0

    @property
    def architecture_name(self) -> str:
        base = "ConvNextV2" if self.v2 else "ConvNext"
        return f"{base}ForImageClassification" if self.has_head else f"{base}Model"


_STAGE_KEY = re.compile(r"encoder\.stages\.(\d+)\.(?:layers\.(\d+)|downsampling_layer)\.")


def infer_architecture(body: Mapping[str, Tensor]) -> Architecture:
    """Depths, widths, patch size, channels, V1/V2, layer scale, labels: from shapes and keys."""
    stem = body.get("embeddings.patch_embeddings.weight")
    if stem is None or stem.ndim != 4 or stem.shape[2] != stem.shape[3]:
        shape = None if stem is None else list(stem.shape)
        raise CheckpointError(f"no square patch-embedding convolution in the checkpoint ({shape})")
    blocks_of: dict[int, set[int]] = {}
    for key in body:
        m = _STAGE_KEY.match(key)
        if m:
            found = blocks_of.setdefault(int(m.group(1)), set())
            if m.group(2) is not None:
                found.add(int(m.group(2)))
    num_stages = max(blocks_of, default=-1) + 1
    if num_stages == 0 or sorted(blocks_of) != list(range(num_stages)):
        raise CheckpointError(f"stages {_numbers(blocks_of)} are not numbered 0..n-1")
    for stage, blocks in blocks_of.items():
        # every block has keys of its own, so a depth is bounded by the checkpoint's size
        if sorted(blocks) != list(range(len(blocks))):
            raise CheckpointError(
                f"stage {stage}: blocks {_numbers(blocks)} are not numbered 0..n-1"
            )
    depth_of = {stage: len(blocks) for stage, blocks in blocks_of.items()}
    hidden = [int(stem.shape[0])]
    for stage in range(1, num_stages):
        down = body.get(f"encoder.stages.{stage}.downsampling_layer.1.weight")
        if down is None or down.ndim != 4:
            shape = None if down is None else list(down.shape)
            raise CheckpointError(f"stage {stage} has no downsampling convolution ({shape})")
        hidden.append(int(down.shape[0]))
    classifier = body.get("classifier.weight")
    if classifier is not None and classifier.ndim != 2:
        raise CheckpointError(f"classifier.weight of shape {list(classifier.shape)} is not 2-D")
    return Architecture(
        v2=any(".grn." in k for k in body),
        num_channels=int(stem.shape[1]),
        patch_size=int(stem.shape[2]),
        depths=[depth_of[s] for s in range(num_stages)],
        hidden_sizes=hidden,
        layer_scale=any(k.endswith(".layer_scale_parameter") for k in body),
        num_labels=0 if classifier is None else int(classifier.shape[0]),
    )


def _numbers(values: Iterable[int], limit: int = 8) -> str:
    shown = sorted(values)
    return str(shown[:limit])[:-1] + (", ...]" if len(shown) > limit else "]")


def expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every key and shape transformers' model for ``arch`` has (without the backbone prefix)."""
    first = arch.hidden_sizes[0]
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.patch_embeddings.weight": (first, arch.num_channels, *(arch.patch_size,) * 2),
        "embeddings.patch_embeddings.bias": (first,),
        "embeddings.layernorm.weight": (first,),
        "embeddings.layernorm.bias": (first,),
    }
    prev = first
    for stage, (depth, width) in enumerate(zip(arch.depths, arch.hidden_sizes, strict=True)):
        if stage > 0:
            down = _DOWN.format(s=stage)
            shapes[down + "0.weight"] = (prev,)
            shapes[down + "0.bias"] = (prev,)
            shapes[down + "1.weight"] = (width, prev, DOWNSAMPLE_KERNEL, DOWNSAMPLE_KERNEL)
            shapes[down + "1.bias"] = (width,)
        for block in range(depth):
            shapes.update(_block_shapes(_BLOCK.format(s=stage, b=block), width, arch))
        prev = width
    shapes["layernorm.weight"] = (prev,)
    shapes["layernorm.bias"] = (prev,)
    if arch.has_head:
        shapes["classifier.weight"] = (arch.num_labels, prev)
        shapes["classifier.bias"] = (arch.num_labels,)
    return shapes


def _block_shapes(prefix: str, width: int, arch: Architecture) -> dict[str, tuple[int, ...]]:
    hidden = MLP_RATIO * width
    shapes: dict[str, tuple[int, ...]] = {
        prefix + "dwconv.weight": (width, 1, DW_KERNEL, DW_KERNEL),
        prefix + "dwconv.bias": (width,),
        prefix + "layernorm.weight": (width,),
        prefix + "layernorm.bias": (width,),
        prefix + "pwconv1.weight": (hidden, width),
        prefix + "pwconv1.bias": (hidden,),
        prefix + "pwconv2.weight": (width, hidden),
        prefix + "pwconv2.bias": (width,),
    }
    if arch.v2:
        shapes[prefix + "grn.weight"] = (1, 1, 1, hidden)
        shapes[prefix + "grn.bias"] = (1, 1, 1, hidden)
    elif arch.layer_scale:
        shapes[prefix + "layer_scale_parameter"] = (width,)
    return shapes


def check_fits(body: Mapping[str, Tensor], arch: Architecture, layout: str) -> None:
    """Fail with one line unless ``body`` has exactly the keys and shapes of ``arch``."""
    problems = shape_problems(expected_shapes(arch), body)
    if problems:
        raise CheckpointError(
            f"{LAYOUT_NAMES[layout]} checkpoint does not fit transformers' ConvNeXt "
            f"(depths {arch.depths}, widths {arch.hidden_sizes}): {problems}"
        )


def _add_identity_final_norm(body: StateDict) -> StateDict:
    """A headless encoder without a final LayerNorm gets weight 1, bias 0 (module docstring)."""
    import torch

    if "layernorm.weight" in body or "classifier.weight" in body:
        return body
    stem = body.get("embeddings.patch_embeddings.weight")
    if stem is None:
        return body
    arch = infer_architecture(body)
    width = arch.hidden_sizes[-1]
    dtype = stem.dtype
    return {
        **body,
        "layernorm.weight": torch.ones(width, dtype=dtype),
        "layernorm.bias": torch.zeros(width, dtype=dtype),
    }


# --------------------------------------------------------------------------- public API


def to_hf(
    state_dict: Mapping[str, Tensor], layout: str | None = None
) -> tuple[StateDict, dict[str, Any]]:
    """Rename any supported layout to transformers' keys; return (state dict, config.json dict).

    With a classifier the keys are those of ``ConvNextForImageClassification`` /
    ``ConvNextV2ForImageClassification`` (``convnext.`` / ``convnextv2.`` prefix plus
    ``classifier.``); without one, those of ``ConvNextModel`` / ``ConvNextV2Model`` saved on
    its own (``embeddings.``, ``encoder.``, ``layernorm.``).  ``layout`` None or ``"auto"``
    detects it; ``"fb"`` also accepts FCMAE checkpoints.
    """
    layout = resolve_layout(state_dict, layout)
    body = rename(state_dict, layout)
    body = _add_identity_final_norm(body)
    arch = infer_architecture(body)
    check_fits(body, arch, layout)
    config = config_dict(arch, layout)
    if arch.has_head:
        prefix = arch.model_type + "."
        body = {(k if k.startswith("classifier.") else prefix + k): v for k, v in body.items()}
    return body, config


def resolve_layout(state_dict: Mapping[str, Any], layout: str | None) -> str:
    """``auto``/None: detect; ``fb`` given for an FCMAE checkpoint: ``fcmae``; else as given."""
    if layout is None or layout == "auto":
        return detect_layout(state_dict)
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r} (use auto or one of {', '.join(LAYOUTS)})")
    if layout == "fb" and any(_is_fcmae_key(k) for k in state_dict):
        return "fcmae"
    return layout


def config_dict(arch: Architecture, layout: str) -> dict[str, Any]:
    """transformers' config.json for ``arch`` (labels from :mod:`convnext_cli.labels`)."""
    config: dict[str, Any] = {
        "architectures": [arch.architecture_name],
        "model_type": arch.model_type,
        "num_channels": arch.num_channels,
        "patch_size": arch.patch_size,
        "num_stages": len(arch.depths),
        "depths": list(arch.depths),
        "hidden_sizes": list(arch.hidden_sizes),
        "hidden_act": "gelu",
        "layer_norm_eps": HF_DEFAULT_NORM_EPS if layout == "hf" else NORM_EPS,
        "image_size": DEFAULT_IMAGE_SIZE,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
    }
    if not arch.v2:
        config["layer_scale_init_value"] = 1e-6 if arch.layer_scale else 0.0
    if arch.has_head:
        names = labels_for(arch.num_labels)
        config["id2label"] = id2label_dict(names)
        config["label2id"] = label2id_dict(names)
    return config


def exact_crop_pct(crop: int, resize: int) -> float:
    """A crop_pct for which ``int(crop / crop_pct) == resize`` holds exactly in float arithmetic."""
    if not 0 < crop <= resize:
        raise ValueError(f"crop {crop} must be positive and at most resize {resize}")
    pct = crop / resize
    for _ in range(64):
        got = int(crop / pct)
        if got == resize:
            return pct
        pct = math.nextafter(pct, 0.0 if got < resize else 1.0)
    raise ValueError(f"no float crop_pct gives int({crop} / crop_pct) == {resize}")


def default_preprocessor(layout: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' ``preprocessor_config.json`` for a checkpoint that comes without one.

    SPEC defaults (short side ``image_size`` (224), crop_pct 0.875, bicubic, ImageNet
    mean/std), except torchvision's tiny/small/base/large weights: bilinear, short side to
    236/230/232 then a 224 crop, written as crop_pct = 224/236 etc.
    """
    size = int(config.get("image_size", DEFAULT_IMAGE_SIZE))
    crop_pct, resample = DEFAULT_CROP_PCT, PIL_BICUBIC
    if layout == "torchvision":
        shape = (tuple(config.get("depths", ())), tuple(config.get("hidden_sizes", ())))
        resize = TORCHVISION_RESIZE.get(shape)
        if resize is not None:
            crop_pct, resample = exact_crop_pct(TORCHVISION_CROP, resize), PIL_BILINEAR
    return preprocessor_dict(size, crop_pct, resample, IMAGENET_MEAN, IMAGENET_STD)


def preprocessor_dict(
    size: int,
    crop_pct: float,
    resample: int,
    mean: Iterable[float],
    std: Iterable[float],
) -> dict[str, Any]:
    """A complete ``ConvNextImageProcessor`` config (every field explicit: transformers'
    own defaults, size 384 and mean/std 0.5, are not the ImageNet ones)."""
    from convnext_cli.preprocess import PreprocessSpec

    spec = PreprocessSpec(
        shortest_edge=int(size),
        crop_pct=float(crop_pct),
        resample=int(resample),
        image_mean=tuple(float(x) for x in mean),
        image_std=tuple(float(x) for x in std),
    )
    return spec.to_dict()


_TIMM_INTERPOLATION = {
    "nearest": PIL_NEAREST,
    "bilinear": PIL_BILINEAR,
    "bicubic": PIL_BICUBIC,
    "lanczos": PIL_LANCZOS,
    "box": PIL_BOX,
    "hamming": PIL_HAMMING,
}


def preprocessor_from_timm_config(raw: Mapping[str, Any]) -> dict[str, Any] | None:
    """The preprocessing a timm Hub repo's ``config.json`` (``pretrained_cfg``) describes.

    None when it has no ``pretrained_cfg``.  timm resizes the short side to
    ``floor(size / crop_pct)`` and centre-crops, the rule transformers applies below 384;
    timm's 384 weights use ``crop_mode: squash`` with crop_pct 1.0, which is transformers'
    warp at 384 and above.
    """
    cfg = raw.get("pretrained_cfg")
    if not isinstance(cfg, Mapping):
        return None
    input_size = cfg.get("input_size") or (3, DEFAULT_IMAGE_SIZE)
    size = int(input_size[-1])
    crop_pct = float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)
    resample = _TIMM_INTERPOLATION.get(str(cfg.get("interpolation", "bicubic")), PIL_BICUBIC)
    mean = cfg.get("mean") or IMAGENET_MEAN
    std = cfg.get("std") or IMAGENET_STD
    return preprocessor_dict(size, crop_pct, resample, mean, std)


def describe(config: Mapping[str, Any], num_labels: int) -> str:
    """``ConvNeXt V2, depths [2, 2, 6, 2], widths [40, 80, 160, 320], 1000 labels``."""
    family = "ConvNeXt V2" if config.get("model_type") == "convnextv2" else "ConvNeXt V1"
    head = f"{num_labels} labels" if num_labels else "no head (feature model)"
    return (
        f"{family}, depths {list(config.get('depths', []))}, "
        f"widths {list(config.get('hidden_sizes', []))}, {head}"
    )
