"""convert's file modes (the umask, as `cp`), env's cuDNN version, benchmark's table and
notes (80 columns, an end-to-end row faster than the model, float16 on the CPU)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from convnext_cli.engine.benchmark import Report, Row

REPO = Path(__file__).resolve().parents[2]
HUB_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def convert(*args: object, umask: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "convnext_cli", "convert", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        umask=umask,
    )


def modes(folder: Path) -> dict[str, int]:
    return {name: stat.S_IMODE((folder / name).stat().st_mode) for name in HUB_FILES}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_convert_files_get_the_mode_cp_would_give(
    umask: int, v1_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = convert(v1_checkpoint, out, umask=umask)
    assert result.returncode == 0, result.stderr
    assert set(modes(out).values()) == {0o666 & ~umask}, modes(out)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_forced_convert_keeps_the_modes_of_the_files_it_replaces(
    v1_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert convert(v1_checkpoint, out, umask=0o022).returncode == 0
    for name in HUB_FILES:
        os.chmod(out / name, 0o640)
    result = convert(v1_checkpoint, out, "--force", umask=0o077)
    assert result.returncode == 0, result.stderr
    assert set(modes(out).values()) == {0o640}


@pytest.mark.parametrize(
    ("number", "written"),
    [(92400, "9.24.0"), (90100, "9.1.0"), (8902, "8.9.2"), (8700, "8.7.0")],
)
def test_env_writes_the_cudnn_version_as_cudnn_does(
    monkeypatch: pytest.MonkeyPatch, number: int, written: str
) -> None:
    """torch reports cuDNN as one number (92400); `convnext env` writes it as cuDNN does."""
    import torch
    from typer.testing import CliRunner

    from convnext_cli.cli import app

    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: number)
    result = CliRunner().invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cudnn"] == written
    text = CliRunner().invoke(app, ["env"])
    assert f"cuDNN {written};" in text.stdout


def bench_row(mode: str, dtype: str, batch: int, rate: float, ms: float = 1234.5) -> Row:
    return Row(mode, dtype, batch, 10, 10 / rate, rate, ms, ms * 9, ms * 9.9, 123456.0,
               "process peak RSS", spread=9.9, noisy=True)  # fmt: skip


def bench_report(*rows: Row, device: str = "cpu") -> Report:
    header = dict(
        model="facebook/convnext-tiny-224", architecture="convnext", parameters_m=28.6,
        image_size=224, device=device, device_name="AMD EPYC", torch="2", torchvision="0",
        convnext_cli="0", channels_last=True, compile=False, warmup=3, iters=10,
        noise_rule="p99 > 1.5x p50",
    )  # fmt: skip
    return Report(header, list(rows))


def test_benchmark_table_keeps_every_header_at_80_columns() -> None:
    import io

    from rich.console import Console

    from convnext_cli.outputs.benchmark_report import print_report

    report = bench_report(
        bench_row("end-to-end", "bfloat16", 128, 1234.5, 12345.6),
        bench_row("model", "bfloat16", 128, 99999.9, 12345.6),
    )
    console = Console(record=True, width=80, file=io.StringIO(), color_system=None)
    print_report(report, console, bars=False)
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text and "peak MB" in text, text


def test_benchmark_warns_of_a_cold_model_row_and_notes_float16_on_cpu() -> None:
    from convnext_cli.outputs.benchmark_report import speed_notes

    report = bench_report(
        bench_row("model", "float32", 8, 20.0),
        bench_row("end-to-end", "float32", 8, 25.0),  # faster than the model alone
        bench_row("model", "float32", 1, 10.0),
        bench_row("end-to-end", "float32", 1, 9.0),
    )
    notes = speed_notes(report)
    assert len(notes) == 1 and notes[0].startswith("warning: end-to-end float32 b=8 ran faster")
    assert "--warmup" in notes[0]
    fp16 = bench_report(bench_row("model", "float16", 1, 0.3))
    assert any("float16 on the CPU is emulated" in n for n in speed_notes(fp16))
    on_gpu = bench_report(bench_row("model", "float16", 1, 300.0), device="cuda:0")
    assert speed_notes(on_gpu) == []
