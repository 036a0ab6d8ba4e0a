"""Fused CPU inference for ConvNeXt blocks through oneDNN (the kernels torch.compile uses).

Eager PyTorch runs a block's MLP as five passes over the activations: addmm (after copying
the bias into the output), GELU, addmm, the layer-scale multiply and the residual add.  On
CPU, oneDNN's ``mkldnn._linear_pointwise`` does linear + bias + GELU in one kernel and
linear + bias + residual add in another; folding the layer scale into the second linear's
weights removes the multiply.  Same mathematics: float32 logits move by ~1e-6.

``_linear_pointwise`` is an internal PyTorch op (it backs Inductor's CPU fusions), so every
block is checked against the plain path on a probe input before it is switched over, and
any error or mismatch leaves the model on the plain path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from convnext_cli.model.convnext import Block, ConvNeXtForClassification

# our activation names -> oneDNN post-op (attr, algorithm)
_POST_OPS = {
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
    "silu": ("swish", ""),
}


def fusion_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(torch.backends.mkldnn.is_available() and ops and hasattr(ops, "_linear_pointwise"))


def _fused_forward(block: Block) -> Callable[[torch.Tensor], torch.Tensor]:
    linear = torch.ops.mkldnn._linear_pointwise
    attr, algorithm = _POST_OPS[block.act_name]
    scalars: list[float] = []
    w1, b1 = block.pwconv1.weight.detach(), block.pwconv1.bias.detach()
    w2, b2 = block.pwconv2.weight.detach(), block.pwconv2.bias.detach()
    if block.layer_scale_parameter is not None:
        gamma = block.layer_scale_parameter.detach().float()
        w2 = (w2.float() * gamma[:, None]).to(w2.dtype)
        b2 = (b2.float() * gamma).to(b2.dtype)
    w2, b2 = w2.contiguous(), b2.contiguous()
    norm = block.layernorm
    grn = block.grn

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous(memory_format=torch.channels_last):
            return block.plain_forward(x)
        n, c, h, w = x.shape
        y = block.dwconv(x).permute(0, 2, 3, 1).contiguous()  # (N, H, W, C), free if NHWC
        y = F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        hidden = linear(y.view(-1, c), w1, b1, attr, scalars, algorithm)  # (NHW, 4C)
        if grn is not None:
            hidden = grn(hidden.view(n, h, w, -1)).view(n * h * w, -1)
        residual = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view for channels_last x
        out = linear.binary(hidden, residual, w2, b2, "add")  # W2 h + b2 + x
        return out.view(n, h, w, c).permute(0, 3, 1, 2)  # (N, C, H, W), channels_last

    return forward


def fuse_blocks(model: ConvNeXtForClassification, probe_size: int = 8) -> bool:
    """Switch every block of a CPU model to the fused path; False if any check fails."""
    if not fusion_available():
        return False
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks or any(b.act_name not in _POST_OPS for b in blocks):
        return False
    param = next(model.parameters())
    if param.device.type != "cpu":
        return False
    tolerance = 1e-4 if param.dtype == torch.float32 else 5e-2
    generator = torch.Generator().manual_seed(0)
    fused: list[tuple[Block, Callable[[torch.Tensor], torch.Tensor]]] = []
    with torch.inference_mode():
        for block in blocks:
            dim = block.dwconv.in_channels
            probe = torch.randn(2, dim, probe_size, probe_size, generator=generator)
            probe = probe.to(param.dtype).contiguous(memory_format=torch.channels_last)
            try:
                forward = _fused_forward(block)
                got = forward(probe).float()
            except (RuntimeError, NotImplementedError, TypeError):
                return False
            expected = block.plain_forward(probe).float()
            scale = expected.abs().max().clamp_min(1.0)
            if not torch.isfinite(got).all() or (got - expected).abs().max() > tolerance * scale:
                return False
            fused.append((block, forward))
    for block, forward in fused:
        block.fused_forward = forward
    return True


def unfuse_blocks(model: torch.nn.Module) -> None:
    """Back to the plain path, e.g. before torch.compile, which does its own fusion."""
    for block in model.modules():
        if isinstance(block, Block):
            block.fused_forward = None
