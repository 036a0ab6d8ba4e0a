"""Every foreign layout renamed to transformers' keys gives the source model's numbers.

Each source model is built with its own library (timm, torchvision) or, for the
facebookresearch and FCMAE layouts that have no installable library, renamed from a
transformers model and checked against timm's own facebookresearch importer.  All weights
are randomised; parity is float32 logits (or pooled features) within 1e-4.
"""

from __future__ import annotations

import json
from typing import Any

import layout_sources as src
import pytest
import torch
import torch.nn.functional as F
import transformers
from factories import IMAGENET_PREPROCESSOR

from convnext_cli.checkpoints import layouts
from convnext_cli.errors import CheckpointError, UsageError
from convnext_cli.imaging.preprocess import exact_crop_pct

ATOL = 1e-4


def hf_from(state_dict: dict, config: dict) -> Any:
    """Load a converted state dict into transformers' own class, strictly."""
    fields = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **fields)
    head = "classifier.weight" in state_dict
    v2 = config["model_type"] == "convnextv2"
    cls: Any
    if v2:
        cls = (
            transformers.ConvNextV2ForImageClassification if head else transformers.ConvNextV2Model
        )
    else:
        cls = transformers.ConvNextForImageClassification if head else transformers.ConvNextModel
    assert config["architectures"] == [cls.__name__]
    model = cls(cfg).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff < ATOL, diff
    assert want.abs().max().item() > 0.1  # the comparison is not between near-zero outputs


@torch.no_grad()
def check_logits(source: torch.nn.Module, state_dict: dict, layout: str) -> dict:
    assert layouts.detect_layout(state_dict) == layout
    converted, config = src.to_hf(state_dict)
    model = hf_from(converted, config)
    x = src.pixels()
    assert_close(model(x).logits, source(x))
    return config


# --------------------------------------------------------------------------- timm


@pytest.mark.parametrize(
    ("name", "kwargs", "v2"),
    [
        ("convnext_atto", {}, False),  # 1x1-conv MLP, LayerNorm2d, layer scale
        ("convnextv2_atto", {}, True),  # 1x1-conv MLP, channels-first GRN
        (None, {}, False),  # Linear MLP (convnext_tiny and larger), small dims
        (None, {"v2": True}, True),  # Linear MLP + channels-last 1-D GRN
        (None, {"layer_scale": False}, False),  # V1 without layer scale
    ],
    ids=["convnext_atto", "convnextv2_atto", "v1-linear", "v2-linear", "v1-no-layer-scale"],
)
def test_timm_classifier(name: str | None, kwargs: dict, v2: bool) -> None:
    model = src.timm_model(name, **kwargs)
    config = check_logits(model, model.state_dict(), "timm")
    assert config["model_type"] == ("convnextv2" if v2 else "convnext")
    assert config["layer_norm_eps"] == 1e-6
    if name is not None:
        assert config["depths"] == [2, 2, 6, 2]
        assert config["hidden_sizes"] == [40, 80, 160, 320]
    else:
        assert config["depths"] == list(src.SMALL_DEPTHS)
        assert config["hidden_sizes"] == list(src.SMALL_DIMS)
    if not v2:
        has_ls = kwargs.get("layer_scale", True)
        assert config["layer_scale_init_value"] == (1e-6 if has_ls else 0.0)
    assert config["id2label"]["3"] == "LABEL_3"


@torch.no_grad()
def test_timm_headless_keeps_final_norm() -> None:
    model = src.timm_model(num_classes=0, v2=True)
    sd = model.state_dict()
    assert not any(k.startswith("head.fc") for k in sd)
    converted, config = src.to_hf(sd)
    assert config["architectures"] == ["ConvNextV2Model"]
    assert "id2label" not in config
    assert not any(k.startswith(("convnextv2.", "classifier.")) for k in converted)
    hf = hf_from(converted, config)
    x = src.pixels(1)
    out = hf(x)
    assert_close(out.pooler_output, model(x))  # num_classes=0: timm returns pre-logits
    assert_close(out.last_hidden_state, model.forward_features(x))


@torch.no_grad()
def test_timm_without_final_norm_gets_identity_norm() -> None:
    """timm's fcmae weights: no head.norm, no head.fc."""
    model = src.timm_model(conv_mlp=True, v2=True)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    converted, config = src.to_hf(sd)
    assert torch.equal(converted["layernorm.weight"], torch.ones(src.SMALL_DIMS[-1]))
    assert torch.equal(converted["layernorm.bias"], torch.zeros(src.SMALL_DIMS[-1]))
    hf = hf_from(converted, config)
    x = src.pixels(2)
    out = hf(x)
    features = model.forward_features(x)
    assert_close(out.last_hidden_state, features)
    pooled = F.layer_norm(features.mean((2, 3)), (src.SMALL_DIMS[-1],), eps=1e-6)
    assert_close(out.pooler_output, pooled)


# --------------------------------------------------------------------------- torchvision


def test_torchvision_classifier() -> None:
    model = src.torchvision_model()
    sd = model.state_dict()
    assert sd["features.1.0.layer_scale"].shape == (src.SMALL_DIMS[0], 1, 1)
    config = check_logits(model, sd, "torchvision")
    assert config["model_type"] == "convnext"
    assert config["depths"] == list(src.SMALL_DEPTHS)
    assert config["hidden_sizes"] == list(src.SMALL_DIMS)
    assert config["layer_norm_eps"] == 1e-6


@torch.no_grad()
def test_torchvision_headless() -> None:
    model = src.torchvision_model()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.2.")}
    converted, config = src.to_hf(sd)
    assert config["architectures"] == ["ConvNextModel"]
    x = src.pixels(3)
    pooled = model.classifier[:2](model.avgpool(model.features(x)))
    assert_close(hf_from(converted, config)(x).pooler_output, pooled)


# --------------------------------------------------------------------------- facebookresearch


def timm_fb_oracle(
    fb: dict, hf: torch.nn.Module, *, v2: bool, layer_scale: bool
) -> torch.nn.Module:
    """timm's model loaded through timm's own facebookresearch importer (checkpoint_filter_fn)."""
    from timm.models.convnext import ConvNeXt, checkpoint_filter_fn

    num_classes = fb["head.weight"].shape[0] if "head.weight" in fb else 0
    model = ConvNeXt(
        depths=src.SMALL_DEPTHS,
        dims=src.SMALL_DIMS,
        num_classes=num_classes,
        use_grn=v2,
        ls_init_value=1e-6 if layer_scale and not v2 else None,
    ).eval()
    model.load_state_dict(checkpoint_filter_fn({"model": dict(fb)}, model), strict=True)
    return model


@pytest.mark.parametrize(
    ("v2", "layer_scale"),
    [(False, True), (False, False), (True, False)],
    ids=["v1", "v1-no-layer-scale", "v2"],
)
@torch.no_grad()
def test_fb_classifier(v2: bool, layer_scale: bool) -> None:
    hf = src.hf_model(v2=v2, layer_scale=1e-6 if layer_scale else 0.0, seed=4)
    fb = src.fb_state_dict(hf)
    if v2:
        assert fb["stages.0.0.grn.gamma"].shape == (1, 1, 1, 4 * src.SMALL_DIMS[0])
    else:
        assert ("stages.0.0.gamma" in fb) == layer_scale
    oracle = timm_fb_oracle(fb, hf, v2=v2, layer_scale=layer_scale)
    x = src.pixels(4)
    assert_close(oracle(x), hf(pixel_values=x).logits)  # the fb dict is what timm expects
    config = check_logits(oracle, fb, "fb")
    assert config["model_type"] == ("convnextv2" if v2 else "convnext")
    if not v2:
        assert config["layer_scale_init_value"] == (1e-6 if layer_scale else 0.0)


@torch.no_grad()
def test_fb_headless_and_unwrapped() -> None:
    hf = src.hf_model(v2=True, seed=5)
    fb = {k: v for k, v in src.fb_state_dict(hf).items() if not k.startswith("head.")}
    sd = layouts.unwrap({"model": {f"module.{k}": v for k, v in fb.items()}, "epoch": 3})
    converted, config = src.to_hf(sd, "fb")
    assert config["architectures"] == ["ConvNextV2Model"]
    x = src.pixels(5)
    want = hf.convnextv2(x).pooler_output
    assert_close(hf_from(converted, config)(x).pooler_output, want)


def test_fb_1k_and_22k_heads_get_imagenet_names() -> None:
    for num_labels, index, name in ((1000, 281, "tabby, tabby cat"), (21841, 1, "benthos")):
        hf = src.hf_model(num_labels=num_labels)
        _, config = src.to_hf(src.fb_state_dict(hf))
        assert len(config["id2label"]) == num_labels
        assert config["id2label"][str(index)] == name
        assert config["label2id"][name] == index


# --------------------------------------------------------------------------- FCMAE


def test_sparse_kernel_permutation_by_hand() -> None:
    """kernel row w*k+h holds the dense weight at [h, w] (ConvNeXt-V2 remap_checkpoint_keys)."""
    kernel = torch.tensor([[10.0], [11.0], [12.0], [13.0]])  # depthwise, k=2, C=1
    dense = layouts.sparse_kernel_to_dense(kernel, "x")
    assert dense.shape == (1, 1, 2, 2)
    assert dense[0, 0].tolist() == [[10.0, 12.0], [11.0, 13.0]]
    full = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3)  # (k*k, C_in, C_out)
    dense = layouts.sparse_kernel_to_dense(full, "y")
    assert dense.shape == (3, 2, 2, 2)
    for h in range(2):
        for w in range(2):
            assert torch.equal(dense[:, :, h, w], full[w * 2 + h].t())
    weight = torch.randn(5, 1, 7, 7)
    assert torch.equal(
        layouts.sparse_kernel_to_dense(src.dense_to_sparse_kernel(weight), "z"), weight
    )


@torch.no_grad()
def test_fcmae_encoder_converts_to_feature_model() -> None:
    hf = src.hf_model(v2=True, head=False, seed=6)
    fb = {k: v for k, v in src.fb_state_dict(hf).items() if not k.startswith("norm.")}
    checkpoint = src.fcmae_checkpoint(fb)
    sd = layouts.unwrap(checkpoint)
    assert sd["encoder.stages.0.0.dwconv.kernel"].shape == (49, src.SMALL_DIMS[0])
    assert sd["encoder.downsample_layers.1.1.kernel"].shape == (4, *src.SMALL_DIMS[:2])
    assert sd["encoder.downsample_layers.1.1.bias"].shape == (1, src.SMALL_DIMS[1])
    assert layouts.detect_layout(sd) == "fcmae"
    assert layouts.CheckpointLayout.resolve(sd, "fb") == "fcmae"
    converted, config = src.to_hf(sd)
    assert config["architectures"] == ["ConvNextV2Model"]
    assert config["layer_norm_eps"] == 1e-6
    assert set(converted) == set(hf.state_dict())
    assert torch.equal(converted["layernorm.weight"], torch.ones(src.SMALL_DIMS[-1]))
    model = hf_from(converted, config)
    x = src.pixels(6)
    got, want = model(x), hf(x)
    assert_close(got.last_hidden_state, want.last_hidden_state)
    pooled = F.layer_norm(want.last_hidden_state.mean((2, 3)), (src.SMALL_DIMS[-1],), eps=1e-6)
    assert_close(got.pooler_output, pooled)


# --------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("head", [True, False], ids=["classifier", "headless"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_hf_passes_through(v2: bool, head: bool) -> None:
    hf = src.hf_model(v2=v2, head=head, layer_norm_eps=1e-12)
    sd = hf.state_dict()
    converted, config = src.to_hf(sd)
    assert layouts.detect_layout(sd) == "hf"
    assert set(converted) == set(sd)
    assert all(torch.equal(converted[k], sd[k]) for k in sd)
    assert config["layer_norm_eps"] == 1e-12  # transformers' default, used by Hub checkpoints
    with torch.no_grad():
        x = src.pixels(7)
        model = hf_from(converted, config)
        if head:
            assert_close(model(x).logits, hf(x).logits)
        else:
            assert_close(model(x).pooler_output, hf(x).pooler_output)


def test_hf_bare_backbone_with_classifier_gets_prefix() -> None:
    hf = src.hf_model(v2=True)
    bare = {k.removeprefix("convnextv2."): v for k, v in hf.state_dict().items()}
    converted, config = src.to_hf(bare)
    assert set(converted) == set(hf.state_dict())


# --------------------------------------------------------------------------- real sizes


@pytest.mark.parametrize(
    ("name", "depths", "widths", "v2"),
    [
        ("convnext_atto", [2, 2, 6, 2], [40, 80, 160, 320], False),
        ("convnextv2_atto", [2, 2, 6, 2], [40, 80, 160, 320], True),
        ("convnext_tiny", [3, 3, 9, 3], [96, 192, 384, 768], False),
        ("convnextv2_nano", [2, 2, 8, 2], [80, 160, 320, 640], True),
    ],
)
def test_timm_real_sizes_on_meta_device(name: str, depths: list, widths: list, v2: bool) -> None:
    import timm

    with torch.device("meta"):
        model = timm.create_model(name)
    converted, config = src.to_hf(model.state_dict())
    assert config["depths"] == depths
    assert config["hidden_sizes"] == widths
    assert config["model_type"] == ("convnextv2" if v2 else "convnext")
    assert config["id2label"]["281"] == "tabby, tabby cat"
    pre = src.default_preprocessor("timm", config)
    assert (pre["crop_pct"], pre["resample"], pre["size"]) == (0.875, 3, {"shortest_edge": 224})


@pytest.mark.parametrize(
    ("name", "resize"),
    [
        ("convnext_tiny", 236),
        ("convnext_small", 230),
        ("convnext_base", 232),
        ("convnext_large", 232),
    ],
)
def test_torchvision_preprocessing_is_exact(name: str, resize: int) -> None:
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    _, config = src.to_hf(model.state_dict())
    pre = json.loads(json.dumps(src.default_preprocessor("torchvision", config)))
    assert int(224 / pre["crop_pct"]) == resize  # transformers' ConvNextImageProcessor rule
    assert pre["resample"] == 2  # PIL bilinear, as torchvision's eval transform
    assert pre["size"] == {"shortest_edge": 224}
    assert pre["image_mean"] == [0.485, 0.456, 0.406]
    assert pre["image_std"] == [0.229, 0.224, 0.225]


def test_exact_crop_pct_for_every_resize() -> None:
    for crop in (224, 256, 288):
        for resize in range(crop, 2 * crop):
            assert int(crop / exact_crop_pct(crop, resize)) == resize


def test_default_preprocessor_is_spec_default() -> None:
    pre = src.default_preprocessor("fb", {"image_size": 224})
    assert pre == IMAGENET_PREPROCESSOR
    custom_tv = {"depths": [1, 1, 2, 1], "hidden_sizes": list(src.SMALL_DIMS)}
    assert src.default_preprocessor("torchvision", custom_tv)["crop_pct"] == 0.875


def test_timm_pretrained_cfg_preprocessing() -> None:
    raw = {
        "architecture": "convnext_atto",
        "pretrained_cfg": {
            "input_size": [3, 288, 288],
            "crop_pct": 0.95,
            "interpolation": "bicubic",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
    }
    pre = src.timm_preprocessor(raw)
    assert pre is not None
    assert pre["size"] == {"shortest_edge": 288}
    assert (pre["crop_pct"], pre["resample"], pre["image_mean"]) == (0.95, 3, [0.5, 0.5, 0.5])
    assert src.timm_preprocessor({"model_type": "convnext"}) is None


# --------------------------------------------------------------------------- unwrap / errors


def test_unwrap_containers_and_prefixes() -> None:
    t = torch.zeros(2)
    assert layouts.unwrap({"a": t}) == {"a": t}
    assert layouts.unwrap({"model": {"module.a": t}, "optimizer": {}, "epoch": 1}) == {"a": t}
    assert layouts.unwrap({"state_dict": {"_orig_mod.module.a": t}}) == {"a": t}
    assert layouts.unwrap({"model_ema": {"a": t}}) == {"a": t}
    assert layouts.unwrap({"checkpoint": 1, "state_dict": {"model": {"a": t}}}) == {"a": t}
    prefer_model = layouts.unwrap({"model_ema": {"b": t}, "model": {"a": t}})
    assert prefer_model == {"a": t}
    with pytest.raises(CheckpointError, match="no tensors"):
        layouts.unwrap({"epoch": 3, "args": "x"})


def test_unknown_layout_names_keys() -> None:
    sd = {"backbone.conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"backbone\.conv1\.weight") as info:
        layouts.detect_layout(sd)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError):
        src.to_hf(sd)


def test_unexpressible_variants_are_refused() -> None:
    model = src.timm_model(head_norm_first=True)  # norm before pooling: not transformers' order
    with pytest.raises(CheckpointError, match="norm_pre"):
        src.to_hf(model.state_dict())
    model = src.timm_model(kernel_sizes=5)
    with pytest.raises(CheckpointError, match="shape mismatches.*dwconv"):
        src.to_hf(model.state_dict())
    model = src.timm_model(head_hidden_size=12)
    with pytest.raises(CheckpointError, match="pre_logits"):
        src.to_hf(model.state_dict())


def test_wrong_layout_flag() -> None:
    sd = src.torchvision_model().state_dict()
    with pytest.raises(CheckpointError, match="timm checkpoint"):
        src.to_hf(sd, "timm")
    with pytest.raises(UsageError, match="unknown layout"):
        src.to_hf(sd, "keras")


def test_truncated_checkpoint_is_refused() -> None:
    sd = src.timm_model().state_dict()
    del sd["stages.2.blocks.1.mlp.fc2.bias"]
    with pytest.raises(
        CheckpointError, match=r"1 missing keys \(encoder\.stages\.2\.layers\.1\.pwconv2"
    ):
        src.to_hf(sd)
