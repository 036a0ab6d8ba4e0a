"""TensorFlow checkpoints (``tf_model.h5``) read without TensorFlow, through h5py.

transformers 5 has no TensorFlow models, so the files are built here with h5py in the
layout Keras 2's ``save_weights`` gives transformers' ``TFConvNext...`` models (one HDF5
group per top-level layer, ``weight_names`` attributes, datasets at the variables' names),
from a randomised PyTorch model through the inverse of transformers' documented mapping
(``modeling_tf_pytorch_utils.convert_tf_weight_name_to_pt_weight_name``, reproduced below
and checked against every generated name).  The logits must equal the PyTorch model's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import factories
import pytest
import torch
from helpers import invoke, jsonl

h5py = pytest.importorskip("h5py")

from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint  # noqa: E402
from convnext_cli.checkpoints.layouts import CheckpointLayout  # noqa: E402

CONV = ("patch_embeddings", "dwconv", "downsampling_layer.1")
NORMS = ("layernorm", "downsampling_layer.0")


def tf_to_pt_name(tf_name: str, shape: tuple[int, ...]) -> tuple[str, str]:
    """transformers' convert_tf_weight_name_to_pt_weight_name (the parts ConvNeXt uses)."""
    tf_name = tf_name.replace(":0", "")
    tf_name = re.sub(r"/[^/]*___([^/]*)/", r"/\1/", tf_name)
    tf_name = tf_name.replace("_._", "/")
    tf_name = re.sub(r"//+", "/", tf_name)
    parts = tf_name.split("/")
    if len(parts) > 1:
        parts = parts[1:]
    if parts[-1] == "kernel" and len(shape) == 4:
        transpose = "conv2d"
    elif parts[-1] in ("kernel", "embeddings", "embedding", "out_projs"):
        transpose = "simple"
    else:
        transpose = "no"
    if parts[-1] in ("kernel", "embeddings", "gamma"):
        parts[-1] = "weight"
    if parts[-1] == "beta":
        parts[-1] = "bias"
    return ".".join(parts), transpose


def pt_to_tf(key: str, value: torch.Tensor) -> tuple[str, str, torch.Tensor]:
    """(top-level Keras layer, variable name without the model's name, value in TF layout)."""
    parts = re.sub(r"(stages|layers|downsampling_layer)\.(\d+)", r"\1#\2", key).split(".")
    parts = [p.replace("#", ".") for p in parts]
    owner, last = parts[-2], parts[-1]
    if owner in CONV and last == "weight":
        parts[-1], value = "kernel", value.permute(2, 3, 1, 0)  # (out, in, kh, kw) -> TF
    elif owner in ("pwconv1", "pwconv2", "classifier") and last == "weight":
        parts[-1], value = "kernel", value.t()
    elif owner in NORMS:
        parts[-1] = {"weight": "gamma", "bias": "beta"}[last]
    return parts[0], "/".join(parts) + ":0", value.contiguous()


def save_tf_h5(model, path: Path, model_name: str) -> None:
    """A Keras 2 HDF5 weights file as ``TFPreTrainedModel.save_pretrained`` writes it."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, value in model.state_dict().items():
        layer, name, tf_value = pt_to_tf(key, value.detach())
        full = f"{model_name}/{name}"
        pt_name, transpose = tf_to_pt_name(full, tuple(tf_value.shape))
        assert pt_name == key, (full, pt_name, key)  # transformers' own mapping gives it back
        assert transpose == (
            "conv2d"
            if tf_value.ndim == 4 and "kernel" in name
            else "simple"
            if "kernel" in name
            else "no"
        )
        groups.setdefault(layer, []).append((full, tf_value))
    with h5py.File(path, "w") as f:
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        f.attrs["layer_names"] = [name.encode() for name in groups]
        for layer, weights in groups.items():
            group = f.create_group(layer)
            group.attrs["weight_names"] = [name.encode() for name, _ in weights]
            for name, value in weights:
                group.create_dataset(name, data=value.numpy())


def tf_folder(tmp_path: Path, v2: bool, head: bool = True) -> tuple[Path, torch.nn.Module]:
    reference = factories.hf_model(v2=v2, seed=11 if v2 else 12, layer_scale=0.5, head=head)
    pt = factories.save_hf(reference, tmp_path / "pt")
    folder = tmp_path / "tf"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(pt / name, folder / name)
    base = "tf_conv_next_v2" if v2 else "tf_conv_next"
    suffix = "_for_image_classification" if head else "_model"
    save_tf_h5(reference, folder / "tf_model.h5", base + suffix)
    return folder, reference.eval()


@pytest.mark.parametrize("v2", [False, True])
def test_tf_h5_gives_the_pytorch_logits(v2: bool, tmp_path: Path, photos: list[Path]) -> None:
    folder, reference = tf_folder(tmp_path, v2)
    checkpoint = load_checkpoint(str(folder))
    assert checkpoint.layout is CheckpointLayout.KERAS
    ours = build_model(checkpoint)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(pixel_values=pixels).logits
        got = ours(pixels)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4
    # the CLI, end to end: a folder with only tf_model.h5, and the file alone
    out = invoke("classify", photos[0], "-m", folder, "--format", "jsonl", "-k", "2")
    assert out.exit_code == 0, out.output
    alone = invoke(
        "classify", photos[0], "-m", folder / "tf_model.h5", "--format", "jsonl", "-k", "2"
    )
    assert alone.exit_code == 0, alone.output
    assert [p["index"] for p in jsonl(out.stdout)[0]["predictions"]] == [
        p["index"] for p in jsonl(alone.stdout)[0]["predictions"]
    ]


def test_headless_tf_model_and_convert(tmp_path: Path) -> None:
    import transformers

    folder, reference = tf_folder(tmp_path, v2=False, head=True)
    out_dir = tmp_path / "converted"
    done = invoke("convert", folder, out_dir)
    assert done.exit_code == 0, done.output
    assert (out_dir / "model.safetensors").is_file()
    back = transformers.AutoModelForImageClassification.from_pretrained(out_dir).eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            back(pixel_values=pixels).logits,
            reference(pixel_values=pixels).logits,
            atol=1e-5,
            rtol=0,
        )
    headless, base = tf_folder(tmp_path / "h", v2=True, head=False)
    feature = build_model(load_checkpoint(str(headless)))
    with torch.no_grad():
        torch.testing.assert_close(
            feature.embed(pixels), base(pixel_values=pixels).pooler_output, atol=1e-4, rtol=0
        )


def test_hostile_h5_files_are_one_line(tmp_path: Path, photos: list[Path]) -> None:
    folder, _ = tf_folder(tmp_path, v2=False)
    good = (folder / "tf_model.h5").read_bytes()
    cases = {
        "truncated.h5": good[: len(good) // 2],
        "garbage.h5": b"\x89HDF\r\n\x1a\n" + b"\xff" * 200,
        "not-hdf5.h5": b"PK\x03\x04" + b"\x00" * 100,
        "empty.h5": b"",
        "scrambled.h5": good[:96] + bytes(b ^ 0x5A for b in good[96:4096]) + good[4096:],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with h5py.File(tmp_path / "ints.h5", "w") as f:
        f.create_dataset(
            "convnext/m/convnext/embeddings/patch_embeddings/kernel:0",
            data=torch.zeros(4, 4, 3, 8, dtype=torch.int64).numpy(),
        )
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\x00" * 4096)
    with h5py.File(tmp_path / "external.h5", "w") as f:
        f.create_dataset(
            "convnext/m/convnext/embeddings/patch_embeddings/kernel:0",
            shape=(4, 4, 3, 8),
            dtype="f4",
            external=[(str(outside), 0, 4096)],
        )
    with h5py.File(tmp_path / "huge.h5", "w") as f:  # 40 GB claimed, nothing stored
        f.create_dataset(
            "convnext/m/convnext/layernorm/gamma:0",
            shape=(100_000, 100_000),
            dtype="f4",
            chunks=(1000, 1000),
        )
    with h5py.File(tmp_path / "link.h5", "w") as f:
        f["convnext/x"] = h5py.ExternalLink(str(folder / "tf_model.h5"), "/convnext")
    for name in [*cases, "ints.h5", "external.h5", "huge.h5", "link.h5"]:
        out = invoke("classify", photos[0], "-m", tmp_path / name)
        assert out.exit_code == 2, (name, out.output)
        lines = out.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, out.output)
        assert "Traceback" not in out.output
        assert name in lines[0], lines[0]
        print(lines[0])


def test_without_h5py_the_error_names_the_extra(tmp_path: Path, photos: list[Path]) -> None:
    folder, _ = tf_folder(tmp_path, v2=False)
    code = "import sys; sys.modules['h5py'] = None\nfrom convnext_cli.cli import main; main()\n"
    done = subprocess.run(
        [sys.executable, "-c", code, "classify", str(photos[0]), "-m", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'convnext-cli[tf]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
