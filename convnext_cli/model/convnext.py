"""ConvNeXt V1 and V2 in one module.

Module names equal transformers' state-dict keys (``convnext.encoder.stages.0.layers.0.dwconv``
and so on), so a Hub checkpoint loads with ``load_state_dict(strict=True)`` and no renaming.

Shapes in comments: N batch, C channels, H/W spatial.  Blocks run the pointwise MLP in
(N, H, W, C) so the two 1x1 convolutions are plain matrix products; with
``torch.channels_last`` inputs every permute below is free (a view of contiguous memory).

Reduced precision (float16/bfloat16): the channels-first LayerNorm statistics and V2's GRN
spatial norm are computed in float32.  In the original code both overflow float16 when
activations reach a few hundred (a sum of squares over 56x56 positions passes 65504).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from convnext_cli.model.config import ACTIVATIONS, ConvNextConfig


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor, statistics in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 3, 1).float()  # (N, H, W, C)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        y = F.layer_norm(y, self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype).permute(0, 3, 1, 2)  # (N, C, H, W)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2) on (N, H, W, C) activations."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # L2 norm over H, W per channel, accumulated in float32 (no float16 overflow) without
        # a float32 copy of the 4C activation (the reduction casts as it reads): (N, 1, 1, C)
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True, dtype=torch.float32)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        # weight * (x * nx) + bias + x  ==  x * (1 + weight * nx) + bias, one pass over x
        scale = (1.0 + self.weight.float() * nx).to(x.dtype)
        return torch.addcmul(self.bias.to(x.dtype), x, scale)


class Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear 4C -> act [-> GRN] -> Linear C [-> layer scale] + x."""

    def __init__(self, config: ConvNextConfig, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act_name = ACTIVATIONS[config.hidden_act]
        self.grn = GRN(4 * dim) if config.is_v2 else None
        self.pwconv2 = nn.Linear(4 * dim, dim)
        use_ls = not config.is_v2 and config.layer_scale_init_value > 0
        self.layer_scale_parameter = (
            nn.Parameter(torch.full((dim,), float(config.layer_scale_init_value)))
            if use_ls
            else None
        )
        # set by convnext_cli.model.cpu_fusion for CPU inference; not part of the state dict
        self.fused_forward: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_name == "gelu":
            return F.gelu(x)
        if self.act_name == "gelu_tanh":
            return F.gelu(x, approximate="tanh")
        if self.act_name == "relu":
            return F.relu(x)
        return F.silu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_forward is not None:
            return self.fused_forward(x)
        return self.plain_forward(x)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x)  # (N, C, H, W)
        y = y.permute(0, 2, 3, 1)  # (N, H, W, C)
        y = self.layernorm(y)
        y = self._act(self.pwconv1(y))  # (N, H, W, 4C)
        if self.grn is not None:
            y = self.grn(y)
        y = self.pwconv2(y)  # (N, H, W, C)
        if self.layer_scale_parameter is not None:
            y = y * self.layer_scale_parameter
        return x + y.permute(0, 3, 1, 2)  # (N, C, H, W)


class Stage(nn.Module):
    """Optional downsampling (LayerNorm + 2x2 stride-2 conv), then `depth` blocks."""

    def __init__(self, config: ConvNextConfig, in_dim: int, out_dim: int, depth: int, stride: int):
        super().__init__()
        self.downsampling_layer = nn.ModuleList()
        if in_dim != out_dim or stride > 1:
            self.downsampling_layer.append(LayerNorm2d(in_dim, eps=1e-6))
            self.downsampling_layer.append(
                nn.Conv2d(in_dim, out_dim, kernel_size=stride, stride=stride)
            )
        self.layers = nn.ModuleList(Block(config, out_dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.downsampling_layer:
            x = layer(x)
        for layer in self.layers:
            x = layer(x)
        return x


class Embeddings(nn.Module):
    """Patchify stem: a patch_size x patch_size stride-patch_size conv, then LayerNorm."""

    def __init__(self, config: ConvNextConfig) -> None:
        super().__init__()
        dim = config.hidden_sizes[0]
        self.patch_embeddings = nn.Conv2d(
            config.num_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.layernorm = LayerNorm2d(dim, eps=1e-6)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.patch_embeddings(pixel_values))


class Encoder(nn.Module):
    def __init__(self, config: ConvNextConfig) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        prev = config.hidden_sizes[0]
        for i in range(config.num_stages):
            out = config.hidden_sizes[i]
            stride = 2 if i > 0 else 1
            self.stages.append(Stage(config, prev, out, config.depths[i], stride))
            prev = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


class ConvNeXt(nn.Module):
    """The backbone: pixels (N, 3, H, W) -> last feature map, and its pooled feature.

    Equals transformers' ``ConvNextModel`` / ``ConvNextV2Model`` (same keys, same numbers).
    """

    def __init__(self, config: ConvNextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps)
        # transformers' ConvNextBackbone: one channels-first LayerNorm per output stage, only
        # when the checkpoint holds them (``hidden_states_norms.<stage>``)
        widths = dict(
            zip(config.stage_names, [config.hidden_sizes[0], *config.hidden_sizes], strict=True)
        )
        if config.backbone_norms:
            self.hidden_states_norms = nn.ModuleDict(
                {name: LayerNorm2d(widths[name], eps=1e-6) for name in config.backbone_norms}
            )

    def stage_maps(
        self, pixel_values: torch.Tensor, stages: list[str], backbone: bool = False
    ) -> list[torch.Tensor]:
        """The feature maps (N, C, H, W) of the named stages, in the order given: ``stem`` is
        transformers' ``hidden_states[0]``, ``stageI`` its ``hidden_states[I]``; with
        `backbone`, each through its own LayerNorm (``ConvNextBackbone.feature_maps``).
        Stages past the last one asked for are not run."""
        names = self.config.stage_names
        wanted = {names.index(name) for name in stages}
        found: dict[str, torch.Tensor] = {}
        x = self.embeddings(pixel_values)
        for index in range(max(wanted) + 1):
            if index > 0:
                x = self.encoder.stages[index - 1](x)
            if index in wanted:
                found[names[index]] = x
        if backbone:
            norms = self.hidden_states_norms
            found = {name: norms[name](found[name]) for name in found}
        return [found[name] for name in stages]

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C_last, H/32, W/32)."""
        return self.encoder(self.embeddings(pixel_values))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pool then the final LayerNorm: transformers' ``pooler_output``."""
        pooled = features.mean(dim=(-2, -1))  # (N, C)
        return F.layer_norm(
            pooled.float(),
            self.layernorm.normalized_shape,
            self.layernorm.weight.float(),
            self.layernorm.bias.float(),
            self.layernorm.eps,
        ).to(features.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(pixel_values))


class ConvNeXtForClassification(nn.Module):
    """Backbone plus a linear head; equals ``ConvNextForImageClassification`` (and V2).

    The backbone is registered under the checkpoint's prefix (``convnext`` or ``convnextv2``)
    so that transformers' state-dict keys load strictly.
    """

    def __init__(self, config: ConvNextConfig) -> None:
        super().__init__()
        self.config = config
        self.add_module(config.base_prefix, ConvNeXt(config))
        self.classifier: nn.Module = (
            nn.Linear(config.hidden_sizes[-1], config.num_labels)
            if config.num_labels > 0
            else nn.Identity()
        )

    @property
    def backbone(self) -> ConvNeXt:
        return getattr(self, self.config.base_prefix)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(pixel_values)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.backbone.pool(features)
        return pooled if pre_logits else self.classifier(pooled)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled feature (transformers' ``pooler_output``), (N, C_last)."""
        return self.backbone(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits, (N, num_labels)."""
        return self.forward_head(self.forward_features(pixel_values))
