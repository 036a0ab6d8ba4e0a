"""`convnext benchmark` on the CPU: a real sweep, its report, its plot, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from convnext_cli.benchmark import percentile
from convnext_cli.cli import app
from convnext_cli.device import resolve_dtype
from convnext_cli.errors import DeviceError

runner = CliRunner()


def test_percentile_interpolates() -> None:
    assert percentile([1.0], 99) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)


def test_sweep_json_report(v1_checkpoint: Path, photos: list[Path], tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    for p in photos[:3]:
        (images / p.name).write_bytes(p.read_bytes())
    plot = tmp_path / "plot.png"
    result = runner.invoke(
        app,
        [
            "benchmark",
            "-m",
            str(v1_checkpoint),
            "-b",
            "1,2",
            "--dtype",
            "float32,bfloat16",
            "--device",
            "cpu",
            "--warmup",
            "1",
            "--iters",
            "3",
            "--images",
            str(images),
            "--format",
            "json",
            "-o",
            str(plot),
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    header = report["header"]
    assert header["device"] == "cpu" and header["torch"] == torch.__version__
    assert header["images"] == 3
    rows = report["rows"]
    combos = {(r["mode"], r["dtype"], r["batch_size"]) for r in rows}
    assert combos == {
        (m, d, b) for m in ("model", "end-to-end") for d in ("float32", "bfloat16") for b in (1, 2)
    }
    for row in rows:
        assert row["images_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["images"] == (3 if row["mode"] == "end-to-end" else row["batch_size"] * 3)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output(v1_checkpoint: Path) -> None:
    result = runner.invoke(
        app,
        [
            "benchmark",
            "-m",
            str(v1_checkpoint),
            "-b",
            "2",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--iters",
            "1",
            "--warmup",
            "0",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "images/s" in result.stdout and "p99 ms" in result.stdout and "float32" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_cuda_absent_is_a_clear_error(v1_checkpoint: Path) -> None:
    result = runner.invoke(app, ["benchmark", "-m", str(v1_checkpoint), "--device", "cuda"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: CUDA was requested but no CUDA GPU is available"


def test_bfloat16_refused_where_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    with pytest.raises(DeviceError, match="bfloat16 is not supported on Old GPU"):
        resolve_dtype("bfloat16", torch.device("cuda"))


def test_bad_batch_sizes_and_outputs(v1_checkpoint: Path) -> None:
    bad = runner.invoke(app, ["benchmark", "-m", str(v1_checkpoint), "-b", "8,x"])
    assert bad.exit_code == 2 and "comma-separated integers" in bad.stderr
    bad = runner.invoke(app, ["benchmark", "-m", str(v1_checkpoint), "-o", "plot.pdf"])
    assert bad.exit_code == 2 and ".png or .svg" in bad.stderr
