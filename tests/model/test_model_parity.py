"""Logits and pooled features equal transformers' ConvNeXt / ConvNeXt V2 on the same weights."""

from __future__ import annotations

from typing import Any

import factories
import pytest
import torch

from convnext_cli.model.config import SIZES, ConvNextConfig
from convnext_cli.model.convnext import ConvNeXtForClassification

CASES: dict[str, dict[str, Any]] = {
    "v1-4stage": dict(v2=False),
    "v2-4stage": dict(v2=True),
    "v1-3stage": dict(v2=False, depths=(1, 2, 1), hidden_sizes=(8, 16, 24)),
    "v2-3stage": dict(v2=True, depths=(2, 1, 1), hidden_sizes=(12, 16, 20)),
    "v1-no-layer-scale": dict(v2=False, layer_scale=0.0),
    "v1-patch2-tanh-gelu": dict(v2=False, patch_size=2, hidden_act="gelu_pytorch_tanh"),
    "v1-many-labels": dict(v2=False, num_labels=1000),
    "v2-one-label": dict(v2=True, num_labels=1),
}


def ours_from(reference) -> ConvNeXtForClassification:
    config = ConvNextConfig.from_dict(reference.config.to_dict())
    model = ConvNeXtForClassification(config).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case: str) -> None:
    reference = factories.hf_model(seed=hash(case) % 1000, **CASES[case])
    ours = ours_from(reference)
    pixels = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixel_values=pixels).logits
        got = ours(pixels)
        got_cl = ours.to(memory_format=torch.channels_last)(
            pixels.contiguous(memory_format=torch.channels_last)
        )
    assert expected.abs().max() > 0.1, "randomised weights should give non-trivial logits"
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_cl, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("v2", [False, True])
def test_pooled_feature_matches_pooler_output(v2: bool) -> None:
    reference = factories.hf_model(v2=v2, seed=5)
    ours = ours_from(reference)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    base = reference.convnextv2 if v2 else reference.convnext
    with torch.no_grad():
        torch.testing.assert_close(
            ours.embed(pixels), base(pixels).pooler_output, atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("v2", [False, True])
def test_headless_model_keys_load(v2: bool) -> None:
    reference = factories.hf_model(v2=v2, head=False, seed=3)
    config = ConvNextConfig.from_dict(reference.config.to_dict())
    config.id2label = {}
    ours = ConvNeXtForClassification(config).eval()
    ours.backbone.load_state_dict(reference.state_dict(), strict=True)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), reference(pixels).pooler_output, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("v2", [False, True])
def test_every_paper_size_has_transformers_keys(size: str, v2: bool) -> None:
    """Every size of both papers builds with exactly transformers' parameter names and shapes."""
    import transformers

    config = ConvNextConfig.from_size(size, v2=v2, num_labels=1000)
    with torch.device("meta"):
        ours = ConvNeXtForClassification(config)
        cls = (
            transformers.ConvNextV2ForImageClassification
            if v2
            else transformers.ConvNextForImageClassification
        )
        ref_config: Any = (transformers.ConvNextV2Config if v2 else transformers.ConvNextConfig)(
            **config.to_dict()
        )
        reference = cls(ref_config)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert shapes == ref_shapes


@pytest.mark.parametrize(
    "case", ["v1-4stage", "v2-4stage", "v1-no-layer-scale", "v1-patch2-tanh-gelu"]
)
def test_fused_cpu_blocks_match_transformers(case: str) -> None:
    """The oneDNN-fused CPU path (what the CLI runs on CPU) keeps transformers' numbers."""
    from convnext_cli.model.cpu_fusion import fuse_blocks, fusion_available

    if not fusion_available():
        pytest.skip("this PyTorch build has no oneDNN fused linear")
    reference = factories.hf_model(seed=hash(case) % 1000, **CASES[case])
    ours = ours_from(reference).to(memory_format=torch.channels_last)
    assert fuse_blocks(ours)
    assert all(b.fused_forward is not None for b in ours.modules() if hasattr(b, "fused_forward"))
    pixels = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixel_values=pixels).logits
        got = ours(pixels.contiguous(memory_format=torch.channels_last))
        got_nchw = ours(pixels)  # non-channels_last input falls back to the plain path
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_nchw, expected, atol=1e-4, rtol=0)
    assert set(ours.state_dict()) == set(reference.state_dict())


def test_fused_bfloat16_close_to_plain_bfloat16() -> None:
    from convnext_cli.model.cpu_fusion import fuse_blocks, fusion_available

    if not fusion_available():
        pytest.skip("this PyTorch build has no oneDNN fused linear")
    reference = factories.hf_model(v2=True, seed=9)
    plain = ours_from(reference).to(torch.bfloat16, memory_format=torch.channels_last)  # type: ignore[call-overload]
    fused = ours_from(reference).to(torch.bfloat16, memory_format=torch.channels_last)  # type: ignore[call-overload]
    if not fuse_blocks(fused):
        pytest.skip("oneDNN has no bfloat16 fused linear on this CPU")
    pixels = torch.randn(2, 3, 64, 64).to(torch.bfloat16)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a, b = plain(pixels).float(), fused(pixels).float()
    assert torch.isfinite(b).all()
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
