"""Source checkpoints in every foreign layout, built with their own libraries, randomised.

Each builder returns the state dict as that library (or the facebookresearch repos) would
save it, plus the oracle: the source model itself, or for layouts without an installable
library (facebookresearch, FCMAE) the transformers model the weights were renamed from,
checked against timm's own facebookresearch importer where one exists.

A fresh init leaves layer scale at 1e-6 and GRN at 0, so blocks would vanish and parity
would prove nothing: every parameter gets real values, LayerNorm weights near 1.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from helpers import randomise
from torch import nn

from convnext_cli.checkpoints import layouts

SMALL_DEPTHS = (1, 1, 2, 1)
SMALL_DIMS = (16, 24, 32, 40)


def pixels(seed: int = 0, size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- timm


def timm_model(
    name: str | None = None,
    *,
    v2: bool = False,
    conv_mlp: bool = False,
    num_classes: int = 10,
    layer_scale: bool = True,
    seed: int = 0,
    **kwargs,
) -> Any:
    """A registered timm model (``name``) or timm's ConvNeXt class with small dims."""
    import timm
    from timm.models.convnext import ConvNeXt

    if name is not None:
        model = timm.create_model(name, num_classes=num_classes, **kwargs)
    else:
        model = ConvNeXt(
            depths=SMALL_DEPTHS,
            dims=SMALL_DIMS,
            num_classes=num_classes,
            conv_mlp=conv_mlp,
            use_grn=v2,
            ls_init_value=1e-6 if layer_scale and not v2 else None,
            **kwargs,
        )
    return randomise(model, seed)


# --------------------------------------------------------------------------- torchvision


def torchvision_model(num_classes: int = 10, seed: int = 0) -> Any:
    """torchvision's ConvNeXt class with a small block setting (same code path as convnext_tiny)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    dims = SMALL_DIMS
    setting = [
        CNBlockConfig(dims[i], dims[i + 1] if i + 1 < len(dims) else None, SMALL_DEPTHS[i])
        for i in range(len(dims))
    ]
    return randomise(ConvNeXt(setting, num_classes=num_classes), seed)


# --------------------------------------------------------------------------- transformers


def hf_model(
    *,
    v2: bool = False,
    head: bool = True,
    num_labels: int = 10,
    layer_scale: float = 1e-6,
    layer_norm_eps: float = 1e-6,
    seed: int = 0,
) -> Any:
    """A small transformers ConvNeXt (V1 or V2), randomised."""
    import factories

    model = factories.hf_model(
        v2=v2,
        depths=SMALL_DEPTHS,
        hidden_sizes=SMALL_DIMS,
        num_labels=num_labels,
        layer_scale=layer_scale,
        head=head,
        seed=seed,
        layer_norm_eps=layer_norm_eps,
    )
    return randomise(model, seed)


# --------------------------------------------------------------------------- facebookresearch

# transformers (bare ConvNextModel keys + classifier) -> facebookresearch ConvNeXt / ConvNeXt-V2
# names, per models/convnext.py and models/convnextv2.py of the two repos.
_HF_TO_FB = (
    (r"embeddings\.patch_embeddings\.(.+)", r"downsample_layers.0.0.\1"),
    (r"embeddings\.layernorm\.(.+)", r"downsample_layers.0.1.\1"),
    (r"encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.(.+)", r"downsample_layers.\1.\2.\3"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.(.+)", r"stages.\1.\2.norm.\3"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter", r"stages.\1.\2.gamma"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.weight", r"stages.\1.\2.grn.gamma"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.bias", r"stages.\1.\2.grn.beta"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", r"stages.\1.\2.\3"),
    (r"layernorm\.(.+)", r"norm.\1"),
    (r"classifier\.(.+)", r"head.\1"),
)


def fb_state_dict(hf: nn.Module) -> dict[str, torch.Tensor]:
    """The facebookresearch checkpoint of a transformers model (the inverse of the conversion,
    written independently from the fb repos' module names)."""
    out = {}
    for key, value in hf.state_dict().items():
        key = re.sub(r"^convnext(v2)?\.", "", key)
        for pattern, repl in _HF_TO_FB:
            new, n = re.subn(f"^{pattern}$", repl, key)
            if n:
                out[new] = value.clone()
                break
        else:
            raise KeyError(key)
    return out


def dense_to_sparse_kernel(weight: torch.Tensor) -> torch.Tensor:
    """MinkowskiEngine kernel from a dense conv weight, element by element.

    kernel[w * k + h] = weight[:, :, h, w]: the layout ConvNeXt-V2's remap_checkpoint_keys reads.
    """
    c_out, c_in, k, k2 = weight.shape
    assert k == k2
    depthwise = c_in == 1 and c_out > 1
    kernel = torch.empty(k * k, c_out) if depthwise else torch.empty(k * k, c_in, c_out)
    for h in range(k):
        for w in range(k):
            if depthwise:
                kernel[w * k + h] = weight[:, 0, h, w]
            else:
                kernel[w * k + h] = weight[:, :, h, w].t()
    return kernel


def fcmae_checkpoint(fb_encoder: dict[str, torch.Tensor], decoder_dim: int = 8) -> dict:
    """An FCMAE pre-training checkpoint ({"model": ...}) around a dense fb V2 encoder."""
    sparse: dict[str, torch.Tensor] = {}
    for key, value in fb_encoder.items():
        if key.startswith(("norm.", "head.")):
            raise ValueError("FCMAE encoders have no final norm or head")
        parts = key.split(".")
        if key.startswith("downsample_layers.0."):
            new = key  # the stem is a dense Conv2d + channels-first LayerNorm
        elif parts[0] == "downsample_layers" and parts[2] == "0":
            new = ".".join(parts[:3] + ["ln", parts[3]])
        elif parts[-1] == "weight" and value.ndim == 4:
            new, value = ".".join(parts[:-1] + ["kernel"]), dense_to_sparse_kernel(value)
        elif parts[-2] in ("norm",):
            new = ".".join(parts[:-1] + ["ln", parts[-1]])
        elif parts[-2] in ("pwconv1", "pwconv2"):
            new = ".".join(parts[:-1] + ["linear", parts[-1]])
        elif parts[-2] == "grn":
            new, value = key, value.reshape(1, -1)
        else:
            new = key
        is_conv_bias = parts[-1] == "bias" and (
            parts[-2] == "dwconv" or (parts[0] == "downsample_layers" and parts[2] == "1")
        )
        if is_conv_bias and not key.startswith("downsample_layers.0."):
            value = value.reshape(1, -1)
        sparse["encoder." + new] = value.clone()
    last_stage = max(int(k.split(".")[1]) for k in fb_encoder if k.startswith("stages."))
    last = fb_encoder[f"stages.{last_stage}.0.dwconv.weight"].shape[0]
    gen = torch.Generator().manual_seed(123)
    d = decoder_dim
    extra = {
        "mask_token": (1, d, 1, 1),
        "proj.weight": (d, last, 1, 1),
        "proj.bias": (d,),
        "decoder.0.dwconv.weight": (d, 1, 7, 7),
        "decoder.0.norm.weight": (d,),
        "decoder.0.pwconv1.weight": (4 * d, d),
        "decoder.0.grn.gamma": (1, 1, 1, 4 * d),
        "decoder.0.grn.beta": (1, 1, 1, 4 * d),
        "decoder.0.pwconv2.weight": (d, 4 * d),
        "pred.weight": (32 * 32 * 3, d, 1, 1),
        "pred.bias": (32 * 32 * 3,),
    }
    for key, shape in extra.items():
        sparse[key] = torch.randn(shape, generator=gen)
    return {"model": sparse}


def to_hf(
    state_dict: dict[str, torch.Tensor], layout: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """What ``convnext convert`` writes for an in-memory state dict: transformers' keys (a
    headless model's without the backbone prefix) and config.json, after the one strict
    key-and-shape check."""
    from convnext_cli.checkpoints.checkpoint import assemble, identify_weights, with_backbone_prefix

    found, body, config = identify_weights(layouts.unwrap(state_dict), layout)
    if "classifier.weight" not in body:
        config.id2label = {}
    prefixed = with_backbone_prefix(body, config)
    assemble(config, prefixed, found.display)
    return (prefixed if "classifier.weight" in body else body), config.to_dict()


def default_preprocessor(layout: str, config: dict) -> dict:
    """The preprocessor_config.json a checkpoint of ``layout`` without one gets."""
    from convnext_cli.imaging.preprocess import PreprocessSpec
    from convnext_cli.model.config import ConvNextConfig

    return PreprocessSpec.for_layout(layout, ConvNextConfig.from_dict(config)).to_dict()


def timm_preprocessor(raw: dict) -> dict | None:
    """What a timm Hub repo's config.json (``pretrained_cfg``) describes, or None."""
    from convnext_cli.imaging.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_timm_config(raw)
    return None if spec is None else spec.to_dict()
