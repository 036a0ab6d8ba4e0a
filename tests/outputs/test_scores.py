"""classify --scores probs|logits|log-probs and -k all: the values equal transformers' logits
(and their softmax / log-softmax), every format says what it holds, --resume refuses to mix."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import invoke, jsonl

CPU = ["--format", "jsonl", "--device", "cpu", "--dtype", "float32"]


def _reference_logits(checkpoint: Path, photos: list[Path]) -> torch.Tensor:
    """transformers' logits for the photos, preprocessed by our pipeline (embed is separate)."""
    import transformers

    from convnext_cli.engine.loading import ModelSource, RunOptions, load_runner
    from convnext_cli.imaging.decoding import decode_file

    runner = load_runner(ModelSource(str(checkpoint)), RunOptions("cpu", "float32")).runner
    reference = transformers.AutoModelForImageClassification.from_pretrained(checkpoint).eval()
    rows = []
    for photo in photos:
        pixels = runner.spec.resize_and_crop(decode_file(photo))
        batch = runner.spec.normalize(pixels[None], torch.float32)
        with torch.no_grad():
            rows.append(reference(pixel_values=batch).logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["probs", "logits", "log-probs"])
def test_scores_equal_transformers(kind: str, v2_checkpoint: Path, photos: list[Path]) -> None:
    out = invoke("classify", *photos[:3], "-m", v2_checkpoint, "-k", "all", "--scores", kind, *CPU)
    assert out.exit_code == 0, out.output
    records = jsonl(out.stdout)
    logits = _reference_logits(v2_checkpoint, photos[:3])
    expected = {
        "probs": logits.softmax(-1),
        "logits": logits,
        "log-probs": logits.log_softmax(-1),
    }[kind]
    worst = 0.0
    for record, row in zip(records, expected, strict=True):
        assert record.get("scores") == (None if kind == "probs" else kind)
        assert len(record["predictions"]) == 7  # -k all: every class
        got = torch.zeros(7, dtype=torch.float64)
        for p in record["predictions"]:
            got[p["index"]] = p["score"]
        scale = row.abs().max().item()
        worst = max(worst, ((got - row.double()).abs().max() / scale).item())
        ranked = [p["index"] for p in record["predictions"]]
        assert ranked == row.argsort(descending=True).tolist()
    assert worst < 1e-4, worst


def test_every_format_says_what_it_holds(
    v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    args = ("classify", photos[0], "-m", v1_checkpoint, "-k", "3", "--scores", "logits")
    out = invoke(*args, "--format", "json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)[0]["scores"] == "logits"
    out = invoke(*args, "--format", "csv")
    header = next(csv.reader(io.StringIO(out.stdout)))
    assert header == ["path", "rank", "label", "index", "logit", "error"]
    out = invoke(*args[:-1], "log-probs", "--format", "csv")
    assert next(csv.reader(io.StringIO(out.stdout)))[4] == "log_prob"
    target = tmp_path / "x.parquet"
    assert invoke(*args, "-o", target).exit_code == 0
    meta = json.loads(pq.read_schema(target).metadata[b"convnext_cli"])
    assert meta["scores"] == "logits"
    table = pq.read_table(target)
    assert len(table.column("predictions")[0].as_py()) == 3
    html = tmp_path / "x.html"
    assert invoke(*args, "-o", html).exit_code == 0
    assert "(logits)" in html.read_text()
    # the default stays as it was: no marker anywhere
    plain = invoke("classify", photos[0], "-m", v1_checkpoint, "--format", "jsonl")
    assert "scores" not in jsonl(plain.stdout)[0]
    assert "score" in next(
        csv.reader(
            io.StringIO(
                invoke("classify", photos[0], "-m", v1_checkpoint, "--format", "csv").stdout
            )
        )
    )


def test_top_k_all_and_bad_values(v1_checkpoint: Path, photos: list[Path]) -> None:
    out = invoke("classify", photos[0], "-m", v1_checkpoint, "-k", "all", "--format", "jsonl")
    assert out.exit_code == 0
    predictions = jsonl(out.stdout)[0]["predictions"]
    assert len(predictions) == 1000
    assert abs(sum(p["score"] for p in predictions) - 1) < 1e-4
    # 0 is every class too (limits.parse_top_k: the CLI and the Python API's one rule)
    out = invoke("classify", photos[0], "-m", v1_checkpoint, "-k", "0", "--format", "jsonl")
    assert out.exit_code == 0 and len(jsonl(out.stdout)[0]["predictions"]) == 1000
    for bad in ("some", "2.5", "-1", "100001"):
        out = invoke("classify", photos[0], "-m", v1_checkpoint, "-k", bad)
        assert out.exit_code == 2, bad
    out = invoke("classify", photos[0], "-m", v1_checkpoint, "--scores", "odds")
    assert out.exit_code == 2


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_resume_refuses_to_mix_scores(
    suffix: str, v1_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    target = tmp_path / f"out.{suffix}"
    first = invoke("classify", *photos[:2], "-m", v1_checkpoint, "-o", target, "--scores", "logits")
    assert first.exit_code == 0, first.output
    mixed = invoke("classify", *photos, "-m", v1_checkpoint, "-o", target, "--resume")
    assert mixed.exit_code == 2
    assert "scores" in mixed.output
    same = invoke(
        "classify", *photos, "-m", v1_checkpoint, "-o", target, "--resume", "--scores", "logits"
    )
    assert same.exit_code == 0, same.output
