"""embed --stage / --pool / --backbone: equal to transformers' ``hidden_states[i]`` and
``ConvNextBackbone`` / ``ConvNextV2Backbone`` ``feature_maps`` (V1 and V2), through the same
loading path as every checkpoint, in every format that holds them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import factories
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import invoke, jsonl, randomise
from safetensors.numpy import load_file

from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint
from convnext_cli.imaging.decoding import decode_file
from convnext_cli.imaging.preprocess import PreprocessSpec

STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def hf_backbone(v2: bool, out_features: list[str], seed: int = 3):
    import transformers

    kwargs: dict[str, Any] = dict(
        depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], out_features=out_features
    )
    model: Any
    if v2:
        model = transformers.ConvNextV2Backbone(transformers.ConvNextV2Config(**kwargs))
    else:
        config = transformers.ConvNextConfig(layer_scale_init_value=0.5, **kwargs)
        model = transformers.ConvNextBackbone(config)
    return randomise(model, seed).eval()


@pytest.mark.parametrize("v2", [False, True])
def test_stage_maps_equal_hidden_states(v2: bool, tmp_path: Path) -> None:
    reference = factories.hf_model(v2=v2, seed=7).eval()
    folder = factories.save_hf(reference, tmp_path / "m")
    ours = build_model(load_checkpoint(str(folder)))  # the CLI's loading path (fused on CPU)
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
        got = ours.backbone.stage_maps(pixels.contiguous(memory_format=torch.channels_last), STAGES)
        some = ours.backbone.stage_maps(pixels, ["stage3", "stem"])
    assert len(expected) == len(got) == 5
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert _rel(g, e) < 1e-4
    assert torch.equal(some[1], got[0])


@pytest.mark.parametrize("v2", [False, True])
def test_backbone_equals_transformers_feature_maps(v2: bool, tmp_path: Path) -> None:
    out = ["stem", "stage2", "stage4"]
    reference = hf_backbone(v2, out)
    folder = factories.save_hf(reference, tmp_path / "bb")
    checkpoint = load_checkpoint(str(folder))
    assert checkpoint.config.out_features == out
    assert checkpoint.config.backbone_norms == out
    ours = build_model(checkpoint)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values=pixels).feature_maps
        got = ours.backbone.stage_maps(pixels, out, backbone=True)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert _rel(g, e) < 1e-4


def _pixels(photo: Path, spec: PreprocessSpec) -> torch.Tensor:
    return spec.normalize(spec.resize_and_crop(decode_file(photo))[None], torch.float32)


@pytest.mark.parametrize("v2", [False, True])
def test_cli_backbone_maps_in_every_tensor_format(
    v2: bool, tmp_path: Path, photos: list[Path]
) -> None:
    out = ["stage1", "stage3"]
    reference = hf_backbone(v2, out, seed=4)
    pre = dict(factories.IMAGENET_PREPROCESSOR, size={"shortest_edge": 64}, crop_pct=1.0)
    folder = factories.save_hf(reference, tmp_path / "bb", pre)
    spec = PreprocessSpec.from_file(folder / "preprocessor_config.json")
    with torch.no_grad():
        expected = [reference(pixel_values=_pixels(p, spec)).feature_maps for p in photos[:3]]
    args = ("embed", *photos[:3], "-m", folder, "--backbone", "--pool", "none")
    st = tmp_path / "maps.safetensors"
    done = invoke(*args, "-o", st)
    assert done.exit_code == 0, done.output
    tensors = load_file(st)
    assert sorted(tensors) == out
    pq_path = tmp_path / "maps.parquet"
    assert invoke(*args, "-o", pq_path).exit_code == 0
    table = pq.read_table(pq_path)
    assert isinstance(table.schema.field("stage3").type, pa.FixedShapeTensorType)
    npy = tmp_path / "maps.npy"
    assert invoke(*args, "--stage", "stage3", "-o", npy).exit_code == 0
    matrix = np.load(npy)
    worst = 0.0
    for n, maps in enumerate(expected):
        for i, name in enumerate(out):
            want = maps[i][0]
            assert tensors[name].shape[1:] == tuple(want.shape)
            worst = max(worst, _rel(torch.from_numpy(tensors[name][n]), want))
            column = table.column(name).combine_chunks().to_numpy_ndarray()[n]
            worst = max(worst, _rel(torch.from_numpy(column.copy()), want))
        worst = max(worst, _rel(torch.from_numpy(matrix[n]), maps[1][0]))
    assert worst < 1e-4, worst
    # pooled: global average of the same maps, in jsonl / csv too
    pooled = invoke("embed", photos[0], "-m", folder, "--backbone", "--format", "jsonl")
    record = jsonl(pooled.stdout)[0]
    assert list(record)[1:] == out
    want = expected[0][1][0].mean(dim=(-2, -1))
    assert _rel(torch.tensor(record["stage3"]), want) < 1e-4
    csv_out = invoke("embed", photos[0], "-m", folder, "--backbone", "--format", "csv")
    header = csv_out.stdout.splitlines()[0].split(",")
    assert header[:3] == ["path", "error", "stage1_0"] and "stage3_23" in header
    missing = invoke("embed", photos[0], "-m", folder, "--backbone", "--stage", "stage2")
    assert missing.exit_code == 2
    assert "no LayerNorm for stage2 (hidden_states_norms.*; it has: stage1, stage3)" in (
        missing.output
    )


def test_plain_stages_and_refusals(v1_checkpoint: Path, photos: list[Path], tmp_path: Path) -> None:
    pooled = invoke("embed", photos[0], "-m", v1_checkpoint, "--stage", "stage2", "--stage", "stem")
    assert pooled.exit_code == 0, pooled.output
    record = jsonl(pooled.stdout)[0]
    assert list(record) == ["path", "stage2", "stem"]
    assert len(record["stage2"]) == 16 and len(record["stem"]) == 8
    # the default stays the pooled feature
    assert "embedding" in jsonl(invoke("embed", photos[0], "-m", v1_checkpoint).stdout)[0]
    refusals: list[tuple[list[Any], str]] = [
        (["--backbone"], "no backbone LayerNorms"),
        (["--stage", "stage2", "--backbone"], "no backbone LayerNorms"),
        (["--stage", "stage9"], "stages are stem, stage1"),
        (["--stage", "stage1", "--pool", "none"], "-o FILE.npy, FILE.safetensors or FILE.parquet"),
        (["--stage", "stage1", "--pool", "max"], "'max' is not one of avg, none"),
        (["--stage", "stem", "--stage", "stage1", "-o", tmp_path / "x.npy"], "npy holds one"),
    ]
    for extra, message in refusals:
        out = invoke("embed", photos[0], "-m", v1_checkpoint, *extra)
        assert out.exit_code == 2, (extra, out.output)
        assert message in out.output, (extra, out.output)
        assert len(out.output.strip().splitlines()) == 1


def test_out_indices_in_config_json_is_honoured(tmp_path: Path, photos: list[Path]) -> None:
    reference = hf_backbone(False, ["stage2", "stage4"], seed=5)
    folder = factories.save_hf(reference, tmp_path / "bb")
    config = json.loads((folder / "config.json").read_text())
    config.pop("out_features")
    config["out_indices"] = [2, 4]
    (folder / "config.json").write_text(json.dumps(config))
    out = invoke("embed", photos[0], "-m", folder, "--backbone", "--format", "jsonl")
    assert out.exit_code == 0, out.output
    assert list(jsonl(out.stdout)[0]) == ["path", "stage2", "stage4"]


def test_resume_refuses_other_stages(v1_checkpoint: Path, photos: list[Path], tmp_path: Path):
    target = tmp_path / "f.jsonl"
    assert (
        invoke(
            "embed", *photos[:2], "-m", v1_checkpoint, "--stage", "stage1", "-o", target
        ).exit_code
        == 0
    )
    other = invoke(
        "embed", *photos, "-m", v1_checkpoint, "--stage", "stage2", "-o", target, "--resume"
    )
    assert other.exit_code == 2 and "features" in other.output
    same = invoke(
        "embed", *photos, "-m", v1_checkpoint, "--stage", "stage1", "-o", target, "--resume"
    )
    assert same.exit_code == 0, same.output
    assert len(jsonl(target.read_text())) == len(photos)
