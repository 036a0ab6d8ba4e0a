"""`convnext embed` through the command line: transformers' pooler_output, every format.

The oracle is transformers itself: ``AutoImageProcessor`` + the base model
(``ConvNextModel`` / ``ConvNextV2Model``, the classifier's backbone for classifier
checkpoints) on the same RGB image, compared with ``pooler_output`` per photo.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import shutil
from pathlib import Path
from typing import Any

import factories
import helpers
import numpy as np
import pytest
import torch
from helpers import jsonl, relative_error
from PIL import Image

RELATIVE_TOLERANCE = 1e-3
CPU = ("--dtype", "float32", "--device", "cpu")
invoke = functools.partial(helpers.invoke, workers=0)  # decode in this process unless told


@torch.no_grad()
def reference_embeddings(folder: Path, paths: list[Path]) -> np.ndarray:
    """transformers' pooler_output, one image at a time (its processor, its base model)."""
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(folder)
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]  # the backbone is fully loaded
    model.eval()
    rows = []
    for path in paths:
        batch = processor(Image.open(path).convert("RGB"), return_tensors="pt")
        rows.append(model(**batch).pooler_output[0].numpy())
    return np.stack(rows)


@pytest.fixture(scope="module")
def v1_headless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A V1 ConvNextModel (no classifier) with the ImageNet 224 / 0.875 / bicubic processor."""
    folder = tmp_path_factory.mktemp("v1_headless")
    return factories.save_hf(factories.hf_model(head=False, seed=11), folder)


@pytest.fixture(scope="module")
def v2_headless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A V2 ConvNextV2Model (no classifier), 256 short side, crop 0.9, bilinear."""
    folder = tmp_path_factory.mktemp("v2_headless")
    pre = dict(
        factories.IMAGENET_PREPROCESSOR,
        size={"shortest_edge": 256},
        crop_pct=0.9,
        resample=2,
    )
    return factories.save_hf(factories.hf_model(v2=True, head=False, seed=12), folder, pre)


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> list[Path]:
    """Two good photos around one empty file."""
    folder = tmp_path_factory.mktemp("embed_mixed")
    good_a = shutil.copy(photos[0], folder / "a.png")
    empty = folder / "b_empty.jpg"
    empty.write_bytes(b"")
    good_c = shutil.copy(photos[-1], folder / "c.jpg")
    return [Path(good_a), empty, Path(good_c)]


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "checkpoint", ["v1_checkpoint", "v2_checkpoint", "v1_headless", "v2_headless"]
)
def test_embed_matches_transformers_pooler_output(
    checkpoint: str, request: pytest.FixtureRequest, photos: list[Path]
) -> None:
    folder: Path = request.getfixturevalue(checkpoint)
    result = invoke("embed", *photos, "-m", folder, "-b", "4", *CPU)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["path"] for r in records] == [str(p) for p in photos]
    ours = np.array([r["embedding"] for r in records], dtype=np.float32)
    want = reference_embeddings(folder, photos)
    assert ours.shape == want.shape
    worst = worst_l2 = 0.0
    for path, got, expected in zip(photos, ours, want, strict=True):
        assert np.abs(expected).max() > 0.1, "near-zero features prove nothing"
        error = relative_error(got, expected)
        assert error <= RELATIVE_TOLERANCE, f"{checkpoint} {path.name}: relative error {error}"
        l2 = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
        assert l2 <= RELATIVE_TOLERANCE, f"{checkpoint} {path.name}: relative L2 {l2}"
        worst, worst_l2 = max(worst, error), max(worst_l2, l2)
    print(f"{checkpoint}: worst max-abs/max relative {worst:.2e}, relative L2 {worst_l2:.2e}")


@pytest.mark.parametrize("checkpoint", ["v1_checkpoint", "v2_headless"])
def test_normalize_gives_unit_vectors_parallel_to_raw(
    checkpoint: str, request: pytest.FixtureRequest, photos: list[Path]
) -> None:
    folder: Path = request.getfixturevalue(checkpoint)
    inputs = photos[:3]
    raw = invoke("embed", *inputs, "-m", folder, *CPU)
    unit = invoke("embed", *inputs, "-m", folder, "--normalize", *CPU)
    assert raw.exit_code == 0 and unit.exit_code == 0, (raw.stderr, unit.stderr)
    raw_rows = np.array([r["embedding"] for r in jsonl(raw.stdout)], dtype=np.float64)
    unit_rows = np.array([r["embedding"] for r in jsonl(unit.stdout)], dtype=np.float64)
    assert [r["path"] for r in jsonl(unit.stdout)] == [str(p) for p in inputs]
    np.testing.assert_allclose(np.linalg.norm(unit_rows, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw_rows, axis=1), 1.0, atol=1e-2)
    expected = raw_rows / np.linalg.norm(raw_rows, axis=1, keepdims=True)
    np.testing.assert_allclose(unit_rows, expected, atol=1e-5)
    cosine = (unit_rows * expected).sum(1)
    assert cosine.min() > 1 - 1e-6


# --------------------------------------------------------------------------- formats


def test_jsonl_json_and_csv_agree(v1_checkpoint: Path, mixed_inputs: list[Path]) -> None:
    common = ["-m", v1_checkpoint, "-b", "2", *CPU]
    as_jsonl = invoke("embed", *mixed_inputs, *common)
    assert as_jsonl.exit_code == 1, as_jsonl.stderr
    records = jsonl(as_jsonl.stdout)
    assert [r["path"] for r in records] == [str(p) for p in mixed_inputs]
    assert set(records[0]) == {"path", "embedding"} and set(records[2]) == {"path", "embedding"}
    assert records[1] == {"path": str(mixed_inputs[1]), "error": "empty file"}
    dim = len(records[0]["embedding"])
    assert dim == 32 and len(records[2]["embedding"]) == dim
    assert all(isinstance(v, float) for v in records[0]["embedding"])
    assert "Traceback" not in as_jsonl.stderr and "embedded 2 of 3 images in " in as_jsonl.stderr

    as_json = invoke("embed", *mixed_inputs, *common, "--format", "json")
    assert as_json.exit_code == 1
    array = json.loads(as_json.stdout)
    assert isinstance(array, list) and len(array) == 3
    assert array[1] == records[1]
    for got, want in zip((array[0], array[2]), (records[0], records[2]), strict=True):
        assert got["path"] == want["path"]
        np.testing.assert_allclose(got["embedding"], want["embedding"], rtol=0, atol=1e-6)

    as_csv = invoke("embed", *mixed_inputs, *common, "--format", "csv")
    assert as_csv.exit_code == 1
    rows = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert rows[0] == ["path", "error", *(f"f{i}" for i in range(dim))]
    assert [r[0] for r in rows[1:]] == [str(p) for p in mixed_inputs]
    assert all(len(r) == 2 + dim for r in rows)
    assert rows[2][1] == "empty file" and rows[2][2:] == [""] * dim
    for row, want in zip((rows[1], rows[3]), (records[0], records[2]), strict=True):
        assert row[1] == ""
        got = np.array([float(v) for v in row[2:]])
        np.testing.assert_allclose(got, want["embedding"], rtol=0, atol=1e-6)


def test_text_output_file(v1_checkpoint: Path, photos: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "emb.jsonl"
    result = invoke("embed", *photos[:2], "-m", v1_checkpoint, "-o", out, *CPU)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert [r["path"] for r in jsonl(out.read_text())] == [str(p) for p in photos[:2]]


def _matrix_with_a_failed_input(
    inputs: list[Path], common: list[object], tmp_path: Path, fmt: str
) -> tuple[list[dict[str, Any]], Path, Any]:
    """The JSON-lines records of ``inputs``, then the same run to ``features.FMT``, which
    exits 1 (one input fails) and prints nothing: (records, that file, the run)."""
    records = jsonl(invoke("embed", *inputs, *common).stdout)
    out = tmp_path / f"features.{fmt}"
    result = invoke("embed", *inputs, *common, "--format", fmt, "-o", out)
    assert result.exit_code == 1
    assert result.stdout == ""
    return records, out, result


def test_npy_matrix_and_paths_sidecar(
    v1_checkpoint: Path, mixed_inputs: list[Path], tmp_path: Path
) -> None:
    common = ["-m", v1_checkpoint, "-b", "2", *CPU]
    records, out, result = _matrix_with_a_failed_input(mixed_inputs, common, tmp_path, "npy")
    matrix = np.load(out)
    assert matrix.dtype == np.float32 and matrix.shape == (2, 32)
    sidecar = tmp_path / "features.paths.txt"
    assert sidecar.read_text().splitlines() == [str(mixed_inputs[0]), str(mixed_inputs[2])]
    np.testing.assert_allclose(matrix[0], records[0]["embedding"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(matrix[1], records[2]["embedding"], rtol=0, atol=1e-6)
    assert str(mixed_inputs[1]) in result.stderr and "empty file" in result.stderr
    assert str(mixed_inputs[0]) not in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob(".convnext-*"))  # the spool file is cleaned up

    clean = tmp_path / "clean.npy"
    ok = invoke("embed", mixed_inputs[0], mixed_inputs[2], *common, "--format", "npy", "-o", clean)
    assert ok.exit_code == 0, ok.stderr
    np.testing.assert_array_equal(np.load(clean), matrix)
    assert (tmp_path / "clean.paths.txt").read_text().splitlines() == [
        str(mixed_inputs[0]),
        str(mixed_inputs[2]),
    ]


def test_safetensors_matrix_paths_and_errors(
    v2_checkpoint: Path, mixed_inputs: list[Path], tmp_path: Path
) -> None:
    from safetensors import safe_open

    common = ["-m", v2_checkpoint, "-b", "2", *CPU]
    records, out, result = _matrix_with_a_failed_input(
        mixed_inputs, common, tmp_path, "safetensors"
    )
    assert str(mixed_inputs[1]) in result.stderr and "Traceback" not in result.stderr
    with safe_open(str(out), "pt") as f:
        assert list(f.keys()) == ["embeddings"]
        matrix = f.get_tensor("embeddings")
        metadata = f.metadata()
    assert matrix.dtype == torch.float32 and tuple(matrix.shape) == (2, 32)
    assert json.loads(metadata["paths"]) == [str(mixed_inputs[0]), str(mixed_inputs[2])]
    assert json.loads(metadata["errors"]) == {str(mixed_inputs[1]): "empty file"}
    np.testing.assert_allclose(matrix[0].numpy(), records[0]["embedding"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(matrix[1].numpy(), records[2]["embedding"], rtol=0, atol=1e-6)

    clean = tmp_path / "clean.safetensors"
    ok = invoke("embed", mixed_inputs[0], *common, "--format", "safetensors", "-o", clean)
    assert ok.exit_code == 0, ok.stderr
    with safe_open(str(clean), "pt") as f:
        assert "errors" not in f.metadata()
        assert json.loads(f.metadata()["paths"]) == [str(mixed_inputs[0])]
        torch.testing.assert_close(f.get_tensor("embeddings"), matrix[:1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_binary_format_without_output_is_usage_error(
    fmt: str, v1_checkpoint: Path, photos: list[Path]
) -> None:
    result = invoke("embed", photos[0], "-m", v1_checkpoint, "--format", fmt, *CPU)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "-o" in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "npy", "safetensors"])
def test_unwritable_output_is_usage_error_for_every_format(
    fmt: str, v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    """-o in a folder that does not exist: exit 2 naming the file, the same for every format."""
    out = tmp_path / "no-such-folder" / f"features.{fmt}"
    result = invoke("embed", photos[0], "-m", v1_checkpoint, "--format", fmt, "-o", out, *CPU)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(out) in lines[-1]
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- broken inputs


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> Path:
    folder = tmp_path_factory.mktemp("embed_broken")
    shutil.copy(photos[1], folder / "a_good.png")
    (folder / "b_empty.jpg").write_bytes(b"")
    (folder / "c_text.jpg").write_text("this is a text file, not a JPEG\n")
    shutil.copy(photos[4], folder / "d_good.jpg")
    shutil.copy(photos[5], folder / "e_good.JPG")
    (folder / "readme.txt").write_text("not an image extension: not an input")
    return folder


EXPECTED_NAMES = ["a_good.png", "b_empty.jpg", "c_text.jpg", "d_good.jpg", "e_good.JPG"]


@pytest.mark.parametrize("workers", [0, 1])
def test_mixed_folder_every_input_accounted_for(
    workers: int, v1_checkpoint: Path, broken_folder: Path
) -> None:
    result = invoke("embed", broken_folder, "-m", v1_checkpoint, "-b", "2", *CPU, workers=workers)
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert "embedded 3 of 5 images in " in result.stderr and "  2 failed: " in result.stderr
    records = jsonl(result.stdout)
    assert [Path(r["path"]).name for r in records] == EXPECTED_NAMES
    by_name = {Path(r["path"]).name: r for r in records}
    for name in ("a_good.png", "d_good.jpg", "e_good.JPG"):
        assert set(by_name[name]) == {"path", "embedding"} and len(by_name[name]["embedding"]) == 32
    assert by_name["b_empty.jpg"] == {
        "path": str(broken_folder / "b_empty.jpg"),
        "error": "empty file",
    }
    text_error = by_name["c_text.jpg"]["error"]
    assert text_error == "not a recognised image format"
    assert "\n" not in text_error


def test_mixed_folder_workers_do_not_change_numbers(
    v1_checkpoint: Path, broken_folder: Path
) -> None:
    in_process = jsonl(invoke("embed", broken_folder, "-m", v1_checkpoint, "-b", "2", *CPU).stdout)
    pooled = jsonl(
        invoke("embed", broken_folder, "-m", v1_checkpoint, "-b", "2", *CPU, workers=2).stdout
    )
    assert [r["path"] for r in in_process] == [r["path"] for r in pooled]
    for a, b in zip(in_process, pooled, strict=True):
        assert a.get("error") == b.get("error")
        if "embedding" in a:
            np.testing.assert_allclose(a["embedding"], b["embedding"], rtol=0, atol=1e-6)


def test_mixed_folder_binary_formats(
    v1_checkpoint: Path, broken_folder: Path, tmp_path: Path
) -> None:
    from safetensors import safe_open

    good = [str(broken_folder / n) for n in ("a_good.png", "d_good.jpg", "e_good.JPG")]
    bad = [str(broken_folder / n) for n in ("b_empty.jpg", "c_text.jpg")]
    common = ["-m", v1_checkpoint, "-b", "2", *CPU]

    npy = invoke("embed", broken_folder, *common, "--format", "npy", "-o", tmp_path / "m.npy")
    assert npy.exit_code == 1 and "Traceback" not in npy.stderr
    assert np.load(tmp_path / "m.npy").shape == (3, 32)
    assert (tmp_path / "m.paths.txt").read_text().splitlines() == good
    for path in bad:
        assert path in npy.stderr

    st_path = tmp_path / "m.safetensors"
    st = invoke("embed", broken_folder, *common, "--format", "safetensors", "-o", st_path)
    assert st.exit_code == 1 and "Traceback" not in st.stderr
    with safe_open(str(st_path), "pt") as f:
        assert tuple(f.get_slice("embeddings").get_shape()) == (3, 32)
        assert json.loads(f.metadata()["paths"]) == good
        assert sorted(json.loads(f.metadata()["errors"])) == bad
