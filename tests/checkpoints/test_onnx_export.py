"""convnext convert SOURCE model.onnx: an ONNX model whose logits, run by ONNX Runtime on
the sample photos, equal this tool's within 1e-4 (relative); dynamic batch; preprocessing
and labels in its metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from convnext_cli.engine.loading import ModelSource, RunOptions, load_runner  # noqa: E402
from convnext_cli.imaging.decoding import decode_file  # noqa: E402
from convnext_cli.imaging.preprocess import PreprocessSpec  # noqa: E402


def _ours(checkpoint: Path, photos: list[Path]) -> tuple[torch.Tensor, np.ndarray]:
    """Our logits (the CLI's model on the CPU in float32), and the preprocessed batch."""
    runner = load_runner(ModelSource(str(checkpoint)), RunOptions("cpu", "float32")).runner
    pixels = torch.stack([runner.spec.resize_and_crop(decode_file(p)) for p in photos])
    batch = runner.spec.normalize(pixels, torch.float32)
    with torch.inference_mode():
        return runner.model(batch.contiguous(memory_format=torch.channels_last)), batch.numpy()


@pytest.mark.parametrize("which", ["v1_checkpoint", "v2_checkpoint"])
def test_onnx_runtime_logits_match_ours(
    which: str, request: pytest.FixtureRequest, photos: list[Path], tmp_path: Path
) -> None:
    checkpoint = request.getfixturevalue(which)
    target = tmp_path / "model.onnx"
    done = invoke("convert", checkpoint, target)
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == str(target)
    model = onnx.load(str(target))
    meta = {p.key: p.value for p in model.metadata_props}
    # the preprocessing in the metadata is the checkpoint's; the labels are its labels
    spec = PreprocessSpec.from_dict(json.loads(meta["preprocessor_config"]))
    expected_pre = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert json.loads(meta["preprocessor_config"]) == expected_pre
    config = json.loads((checkpoint / "config.json").read_text())
    assert json.loads(meta["id2label"]) == config["id2label"]
    assert meta["input"] == "pixel_values" and meta["output"] == "logits"

    ours, batch = _ours(checkpoint, photos)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic
    got = session.run(["logits"], {"pixel_values": batch})[0]
    one = session.run(["logits"], {"pixel_values": batch[:1]})[0]
    error = float(np.abs(got - ours.numpy()).max() / np.abs(ours.numpy()).max())
    print(f"{which}: max relative error ONNX Runtime vs ours {error:.2e}")
    assert error < 1e-4
    assert np.abs(one - got[:1]).max() / np.abs(got).max() < 1e-4
    assert (got.argmax(-1) == ours.numpy().argmax(-1)).all()
    # the preprocessing ONNX users would apply from the metadata gives the same batch
    again = torch.stack([spec.resize_and_crop(decode_file(p)) for p in photos])
    np.testing.assert_allclose(spec.normalize(again, torch.float32).numpy(), batch, atol=1e-6)


def test_onnx_refusals(v1_checkpoint: Path, tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep")
    out = invoke("convert", v1_checkpoint, target)
    assert out.exit_code == 2 and "exists (use --force" in out.output
    assert target.read_bytes() == b"keep"
    folder = tmp_path / "dir"
    folder.mkdir()
    out = invoke("convert", v1_checkpoint, folder, "--to", "onnx")
    assert out.exit_code == 2 and "is a folder" in out.output
    weights = v1_checkpoint / "model.safetensors"
    out = invoke("convert", weights, weights, "--to", "onnx", "--force")
    assert out.exit_code == 2 and "is the source itself" in out.output
