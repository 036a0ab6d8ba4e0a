"""float16 / bfloat16 stay finite and close to float32 with activations that overflow float16.

A random init keeps activations small, where nothing can overflow; here the residual stream
is pushed into the hundreds (checked, not assumed), where the original code's channels-first
LayerNorm variance and V2's GRN sum of squares pass float16's 65504.
"""

from __future__ import annotations

import factories
import pytest
import torch

from convnext_cli.model.config import ConvNextConfig
from convnext_cli.model.convnext import GRN, ConvNeXtForClassification, LayerNorm2d

FP16_MAX = torch.finfo(torch.float16).max


def amplified_model(v2: bool) -> ConvNeXtForClassification:
    reference = factories.hf_model(
        v2=v2, depths=(2, 2, 2, 1), hidden_sizes=(16, 32, 48, 64), seed=11
    )
    model = ConvNeXtForClassification(ConvNextConfig.from_dict(reference.config.to_dict()))
    model.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pwconv2.weight" in name:
                p.mul_(120.0)  # every block adds large values to the residual stream
    return model.eval()


def capture_inputs(model: torch.nn.Module, kinds: tuple[type, ...]) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().float()))
        for m in model.modules()
        if isinstance(m, kinds)
    ]
    return seen, hooks  # type: ignore[return-value]


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_finite_and_close(v2: bool, dtype: torch.dtype) -> None:
    model = amplified_model(v2)
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))

    seen, hooks = capture_inputs(model, (LayerNorm2d, GRN))
    with torch.no_grad():
        reference = model(pixels)
        pooled_reference = model.embed(pixels)
    for hook in hooks:
        hook.remove()

    # the premise: activations in the hundreds, squares past float16's range
    largest = max(t.abs().max().item() for t in seen)
    assert largest > 300, f"activations too small to test overflow ({largest})"
    assert max((t.double() ** 2).sum(dim=(1, 2)).max().item() for t in seen) > FP16_MAX
    naive_fp16_sum = max((t.half() ** 2).sum(dim=(1, 2)).max().item() for t in seen)
    assert naive_fp16_sum == float("inf"), "a naive float16 reduction must overflow here"

    half = model.to(dtype)
    with torch.no_grad():
        logits = half(pixels.to(dtype)).float()
        pooled = half.embed(pixels.to(dtype)).float()
    assert torch.isfinite(logits).all() and torch.isfinite(pooled).all()
    tol = 0.02 if dtype == torch.float16 else 0.08
    scale = reference.abs().max()
    assert (logits - reference).abs().max() <= tol * scale
    cos = torch.nn.functional.cosine_similarity(pooled, pooled_reference, dim=-1)
    assert cos.min() > 0.99


def test_grn_alone_in_float16_large_inputs() -> None:
    grn = GRN(8)
    with torch.no_grad():
        grn.weight.normal_()
        grn.bias.normal_()
    x = torch.randn(1, 56, 56, 8) * 200
    expected = grn(x)
    got = grn.half()(x.half()).float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=5e-3, atol=expected.abs().max().item() * 2e-3)
