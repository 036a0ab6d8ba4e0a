"""Non-finite model outputs never reach the results: a row whose logits, probabilities or
embedding are not all finite gets the error "model produced non-finite values", the other
rows keep theirs, and JSON/CSV output holds no NaN or Infinity."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import factories
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint
from convnext_cli.cli import app
from convnext_cli.engine.pipeline import NON_FINITE, Runner
from convnext_cli.imaging.preprocess import PreprocessSpec

CPU = torch.device("cpu")


def results(runner: Runner, paths: list[str], embed: bool = False, **kwargs) -> list:
    batches = runner.embed(paths, **kwargs) if embed else runner.classify(paths, **kwargs)
    return [r for batch in batches for r in batch]


@pytest.fixture()
def black_and_white(tmp_path: Path, photos: list[Path]) -> list[str]:
    paths = []
    for name, colour in [("black", 0), ("white", 255)]:
        path = tmp_path / f"{name}.png"
        Image.new("RGB", (40, 30), (colour,) * 3).save(path)
        paths.append(str(path))
    return [*paths, str(photos[0])]


@pytest.fixture()
def huge_stem_weight(tmp_path: Path) -> Path:
    """Raw 0..255 pixels (no rescale, no normalisation) and one stem weight of 1e37: a black
    image gives finite outputs, any other overflows float32 to inf (NaN after the norm)."""
    model = factories.hf_model(seed=4)
    with torch.no_grad():
        model.convnext.embeddings.patch_embeddings.weight[0, 0, 0, 0] = 1e37
    pre = dict(factories.IMAGENET_PREPROCESSOR, do_rescale=False, do_normalize=False)
    return factories.save_hf(model, tmp_path / "huge", pre)


def cpu_runner(folder: Path, spec: PreprocessSpec | None = None) -> Runner:
    """A float32 CPU runner for a checkpoint folder (its own preprocessing unless ``spec``)."""
    checkpoint = load_checkpoint(str(folder))
    model = build_model(checkpoint, CPU, torch.float32)
    return Runner(model, spec or checkpoint.preprocess, CPU, torch.float32)


@pytest.mark.parametrize("embed", [False, True])
def test_zero_std_makes_every_row_an_error(
    v1_checkpoint: Path, black_and_white: list[str], embed: bool
) -> None:
    spec = PreprocessSpec(shortest_edge=224, crop_pct=0.875, image_std=(0.0, 0.0, 0.0))
    got = results(cpu_runner(v1_checkpoint, spec), black_and_white, embed, workers=0)
    assert [r.error for r in got] == [NON_FINITE] * 3
    assert all(r.predictions == [] and r.embedding is None for r in got)


@pytest.mark.parametrize("embed", [False, True])
def test_only_the_non_finite_rows_fail(
    huge_stem_weight: Path, black_and_white: list[str], embed: bool
) -> None:
    got = results(cpu_runner(huge_stem_weight), black_and_white, embed, workers=0, batch_size=8)
    assert [r.error for r in got] == [None, NON_FINITE, NON_FINITE]
    if embed:
        assert got[0].embedding is not None and torch.isfinite(got[0].embedding).all()
    else:
        assert got[0].predictions and all(math.isfinite(p.score) for p in got[0].predictions)


def test_inf_in_the_weights_is_refused_at_load(tmp_path: Path, black_and_white: list[str]) -> None:
    """An inf in the classifier's bias: the checkpoint is refused before any image, one line."""
    model = factories.hf_model(seed=5)
    with torch.no_grad():
        model.classifier.bias[3] = math.inf
    folder = factories.save_hf(model, tmp_path / "inf")
    cpu = ["-m", str(folder), "--device", "cpu", "--dtype", "float32", "--workers", "0"]
    for command in ("classify", "embed"):
        out = CliRunner().invoke(app, [command, *black_and_white, "--format", "jsonl", *cpu])
        assert out.exit_code == 2, out.stderr
        assert out.stdout == ""
        (line,) = out.stderr.splitlines()
        assert line.startswith("error: ") and "inf" in line.lower()


def test_overflow_through_the_cli(huge_stem_weight: Path, black_and_white: list[str]) -> None:
    """Finite weights whose activations overflow float32: the overflowing rows are error
    records, the black image keeps its predictions; JSON and CSV hold no NaN or Infinity."""
    cpu = ["-m", str(huge_stem_weight), "--device", "cpu", "--dtype", "float32", "--workers", "0"]

    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in output"))

    runner = CliRunner()
    out = runner.invoke(app, ["classify", *black_and_white, "--format", "json", *cpu])
    assert out.exit_code == 1, out.stderr
    records = strict(out.stdout)
    assert [r["path"] for r in records] == black_and_white
    assert [r.get("error") for r in records] == [None, NON_FINITE, NON_FINITE]
    assert all(math.isfinite(p["score"]) for p in records[0]["predictions"])

    out = runner.invoke(app, ["classify", *black_and_white, "--format", "csv", *cpu])
    assert out.exit_code == 1
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    errors = [r for r in rows if r["error"]]
    assert [r["error"] for r in errors] == [NON_FINITE] * 2
    assert all(r["score"] == "" and r["label"] == "" for r in errors)
    assert all(math.isfinite(float(r["score"])) for r in rows if not r["error"])

    out = runner.invoke(app, ["embed", *black_and_white, "--format", "jsonl", *cpu])
    assert out.exit_code == 1, out.stderr
    lines = [strict(line) for line in out.stdout.splitlines()]
    assert [r.get("error") for r in lines] == [None, NON_FINITE, NON_FINITE]
    assert len(lines[0]["embedding"]) == 32
