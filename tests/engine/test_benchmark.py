"""`convnext benchmark` on the CPU: a real sweep, its report, its plot, and its refusals."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from convnext_cli.cli import app
from convnext_cli.engine.benchmark import (
    NOISE_MIN_BATCHES,
    NOISY_P99_OVER_P50,
    BenchmarkRunner,
    Report,
    Row,
    SweepOptions,
    make_row,
    percentile,
    sweep,
)
from convnext_cli.engine.device import resolve_dtype
from convnext_cli.errors import DeviceError
from convnext_cli.outputs.benchmark_report import ThroughputBars, noise_note, print_report

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
    assert header["noise_rule"].startswith("p99 > 1.5x p50")
    for row in rows:
        assert row["images_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert isinstance(row["noisy"], bool) and row["spread"] >= 1.0
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        # end to end: the 3 images cycled to 2 batches of fill (no workers) + 20 steady ones
        per_row = 22 if row["mode"] == "end-to-end" else 3
        assert row["images"] == row["batch_size"] * per_row
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


# --- the core runner, with a fake clock: noisy rows flagged, steady rows not ------------------


class FakeClock:
    """perf_counter stand-in: time moves only when a fake forward or batch says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_runner(clock: FakeClock, step_seconds: list[float]) -> SimpleNamespace:
    """Just enough of a pipeline Runner for BenchmarkRunner.time_model / time_end_to_end:
    each forward (or each batch end to end) takes the next of `step_seconds`."""
    steps = iter(step_seconds)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        clock.now += next(steps)
        return pixels

    def classify(paths, top_k, batch_size, workers):  # noqa: ANN001, ANN202
        for start in range(0, len(paths), batch_size):
            clock.now += next(steps)
            yield paths[start : start + batch_size]

    return SimpleNamespace(
        device=torch.device("cpu"),
        dtype=torch.float32,
        spec=SimpleNamespace(shortest_edge=4),
        channels_last=False,
        jpeg_on_device=False,
        logits_fn=forward,
        classify=classify,
    )


def timed_model_row(timed: list[float], warmup: int = 0) -> Row:
    clock = FakeClock()
    options = SweepOptions(batch_sizes=(4,), warmup=warmup, iters=len(timed))
    bench = BenchmarkRunner(fake_runner(clock, [0.01] * warmup + timed), options)  # type: ignore[arg-type]
    bench.clock = clock
    return bench.time_model(4)


def test_steady_model_timings_are_not_flagged() -> None:
    row = timed_model_row([0.100, 0.101, 0.099, 0.102, 0.100, 0.098, 0.103, 0.100], warmup=2)
    assert row.p50_ms == pytest.approx(100.0, abs=0.6)
    assert row.images == 4 * 8 and row.images_per_s == pytest.approx(40.0, rel=0.01)
    assert row.spread < 1.1 and row.noisy is False


def test_a_latency_spike_is_flagged_noisy() -> None:
    row = timed_model_row([0.1] * 9 + [0.4])
    assert row.p50_ms == pytest.approx(100.0) and row.p99_ms > 300
    assert row.spread > NOISY_P99_OVER_P50 and row.noisy is True
    assert asdict(row)["noisy"] is True  # what --format json writes


def test_too_few_batches_are_never_flagged() -> None:
    row = timed_model_row([0.1, 0.1, 0.5])  # 3 < NOISE_MIN_BATCHES: a spread, but no verdict
    assert 3 < NOISE_MIN_BATCHES and row.spread > NOISY_P99_OVER_P50
    assert row.noisy is False


def test_end_to_end_pipeline_fill_is_not_noise_but_a_later_spike_is() -> None:
    def e2e_row(batch_seconds: list[float]) -> Row:
        clock = FakeClock()
        paths = tuple(f"img{i}.jpg" for i in range(4))
        # one worker: 3 batches of fill, then 5 steady ones (the files cycled)
        options = SweepOptions(
            batch_sizes=(2,), warmup=0, iters=1, images=paths, workers=1, steady_batches=5
        )
        bench = BenchmarkRunner(fake_runner(clock, batch_seconds), options)  # type: ignore[arg-type]
        bench.clock = clock
        return bench.time_end_to_end(2)

    filled = e2e_row([2.0] + [0.1] * 7)  # the first batch waits for the decoding workers
    assert filled.images == 16 and filled.p99_ms > 1000
    assert filled.noisy is False
    spiky = e2e_row([2.0] + [0.1] * 6 + [0.5])
    assert spiky.noisy is True


def synthetic_report(noisy: bool = False) -> Report:
    rows = [
        make_row("model", "float32", 1, 10, [0.1] * 10),  # 10 images/s
        make_row("model", "float32", 8, 80, [0.2] * 10),  # 40
        make_row("model", "bfloat16", 1, 20, [0.1] * 10),  # 20
        make_row("model", "bfloat16", 8, 80, [0.1] * 9 + ([0.5] if noisy else [0.1])),
    ]
    return Report({"noise_rule": "p99 > 1.5x p50 over >= 5 timed batches"}, rows)


def test_noise_note_and_json_for_a_noisy_report() -> None:
    quiet, loud = synthetic_report(), synthetic_report(noisy=True)
    assert quiet.noisy_rows == [] and noise_note(quiet) is None
    assert [r.batch_size for r in loud.noisy_rows] == [8]
    note = noise_note(loud)
    assert note is not None and "\n" not in note
    assert "1 of 4 rows" in note and "--iters" in note and "--warmup" in note
    assert [r["noisy"] for r in json.loads(json.dumps(loud.to_dict()))["rows"]] == [
        False,
        False,
        False,
        True,
    ]


def rendered(renderable: object, width: int = 80) -> list[str]:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


def test_terminal_bars_scale_to_the_fastest_row() -> None:
    lines = rendered(ThroughputBars(synthetic_report()))
    assert lines[0].startswith("images/s by batch size")
    assert [ln for ln in lines if not ln.lstrip().startswith("b=")][1:] == [
        "model, float32",
        "model, bfloat16",
    ]
    bars = {
        ln.split()[0] + "/" + ln.split()[-1]: ln for ln in lines if ln.lstrip().startswith("b=")
    }
    assert set(bars) == {"b=1/10.0", "b=8/40.0", "b=1/20.0", "b=8/80.0"}
    assert all(len(ln) <= 80 for ln in lines)
    full = bars["b=8/80.0"].count("█")
    assert full >= 60  # the fastest row spans the width left beside the labels
    for key, rate in (("b=1/10.0", 10), ("b=8/40.0", 40), ("b=1/20.0", 20)):
        assert abs(bars[key].count("█") - full * rate / 80) <= 1, key
    # values line up in one column, after the bars
    assert len({ln.rindex(" ") for ln in bars.values()}) == 1


def test_terminal_bars_follow_the_width_and_mark_noisy_rows() -> None:
    narrow = rendered(ThroughputBars(synthetic_report(noisy=True)), width=50)
    assert all(len(ln) <= 50 for ln in narrow)
    noisy = [ln for ln in narrow if ln.rstrip().endswith("!")]
    assert len(noisy) == 1 and "b=8" in noisy[0]
    assert max(ln.count("█") for ln in narrow) < 40


def test_table_marks_noisy_rows_and_fits_80_columns() -> None:
    report = synthetic_report(noisy=True)
    report.header.update(
        model="m", architecture="convnext", parameters_m=1.0, image_size=224, device="cpu",
        device_name="cpu", torch="2", torchvision="0", convnext_cli="0", channels_last=True,
        compile=False,
    )  # fmt: skip
    for row in report.rows:
        row.mode = "end-to-end"
    console = Console(record=True, width=80, file=io.StringIO(), color_system=None)
    print_report(report, console, bars=False)
    text = console.export_text()
    assert all(len(ln) <= 80 for ln in text.splitlines()) and "…" not in text
    marked = [ln for ln in text.splitlines() if " ! " in ln]
    assert len(marked) == 1 and "bfloat16" in marked[0] and " 8 " in marked[0]
    assert "! noisy: p99 > 1.5x p50" in text and "█" not in text
    console = Console(record=True, width=80, file=io.StringIO(), color_system=None)
    print_report(report, console, bars=True)
    assert "█" in console.export_text()


# --- the core API on a real model, and the command's choices ----------------------------------


def test_core_sweep_over_runners_built_one_at_a_time(v1_checkpoint: Path) -> None:
    from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint
    from convnext_cli.engine.pipeline import Runner

    checkpoint = load_checkpoint(str(v1_checkpoint))
    built: list[str] = []

    def runners() -> Iterator[Runner]:
        for dtype in (torch.float32, torch.bfloat16):
            built.append(str(dtype))
            net = build_model(checkpoint, "cpu", dtype)
            yield Runner(net, checkpoint.preprocess, torch.device("cpu"), dtype)

    steps: list[str] = []
    options = SweepOptions(batch_sizes=(1, 2), warmup=0, iters=2)
    report = sweep(runners(), options, model_name="tiny", on_step=steps.append)
    assert built == ["torch.float32", "torch.bfloat16"]
    assert [(r.dtype, r.batch_size) for r in report.rows] == [
        ("float32", 1),
        ("float32", 2),
        ("bfloat16", 1),
        ("bfloat16", 2),
    ]
    assert steps[0] == "timing model-only, float32, batch 1" and len(steps) == 4
    header = report.header
    assert header["model"] == "tiny" and header["iters"] == 2 and header["compile"] is False
    assert header["image_size"] == 224 and "images" not in header


def test_sweep_options_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        SweepOptions(batch_sizes=())
    with pytest.raises(ValueError):
        SweepOptions(iters=0)


def test_dtype_and_format_are_validated_in_one_line(v1_checkpoint: Path) -> None:
    bad = runner.invoke(app, ["benchmark", "-m", str(v1_checkpoint), "--dtype", "float32,float8"])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == (
        "error: --dtype: unknown dtype 'float8' (choose from auto, float32, float16, bfloat16)"
    )
    bad = runner.invoke(app, ["benchmark", "-m", str(v1_checkpoint), "--format", "xml"])
    assert bad.exit_code == 2 and "table" in bad.stderr and "json" in bad.stderr
    bad = runner.invoke(app, ["benchmark", "-m", str(v1_checkpoint), "-b", "0"])
    assert bad.exit_code == 2 and "positive" in bad.stderr


def test_help_shows_choices_metavars_and_examples() -> None:
    result = runner.invoke(app, ["benchmark", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    text = re.sub(r"[\s│]+", " ", result.stdout)  # help text as words, whatever the wrapping
    assert "--format FORMAT table (" in text and ") or json." in text  # one way, no a|b
    assert "auto, float32, float16, bfloat16" in text
    for metavar in ("N,N,...", "DTYPE,...", "DIR", "FILE"):
        assert metavar in text
    assert "$ convnext benchmark" in text


def test_bar_chart_on_a_terminal_only(v1_checkpoint: Path, tmp_path: Path) -> None:
    """A real pty at 80 columns: table then bars; the same run with -o FILE: no bars."""
    args = ["-m", str(v1_checkpoint), "-b", "1,2", "--dtype", "float32", "--device", "cpu"]
    args += ["--iters", "2", "--warmup", "0", "--format", "TABLE"]
    screen = run_in_pty(args, columns=80)
    assert "images/s by batch size" in screen and "█" in screen
    assert "p99 ms" in screen and screen.index("p99 ms") < screen.index("images/s by batch")
    assert all(len(line) <= 80 for line in screen.splitlines())
    saved = run_in_pty([*args, "-o", str(tmp_path / "report.json")], columns=80)
    assert "p99 ms" in saved and "█" not in saved
    assert json.loads((tmp_path / "report.json").read_text())["rows"]


def run_in_pty(args: list[str], columns: int) -> str:
    """stdout of `convnext benchmark ARGS` on a pty `columns` wide, escapes stripped."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "convnext_cli", "benchmark", *args],
        stdout=child,
        stderr=subprocess.PIPE,
        env={**env, "TERM": "xterm-256color"},
    )
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_compile_mode_option(v1_checkpoint: Path) -> None:
    """--compile-mode implies --compile and names the mode in the rows; reduce-overhead on
    the CPU (no CUDA graphs there) is one note, not a traceback; a wrong mode, one line."""
    bad = runner.invoke(app, ["benchmark", "-m", str(v1_checkpoint), "--compile-mode", "fast"])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == (
        "error: --compile-mode: unknown mode 'fast' (choose from default, reduce-overhead, "
        "max-autotune, max-autotune-no-cudagraphs)"
    )
    args = ["benchmark", "-m", str(v1_checkpoint), "-b", "1", "--dtype", "float32"]
    args += ["--device", "cpu", "--iters", "1", "--warmup", "0", "--format", "json"]
    result = runner.invoke(app, [*args, "--compile-mode", "reduce-overhead"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["header"]["compile"] is True
    assert report["header"]["compile_mode"] == "default"
    assert [r["compile_mode"] for r in report["rows"]] == ["default"]
    assert [r["latency_clock"] for r in report["rows"]] == ["wall clock"]
    assert [r["device_peak_mb"] for r in report["rows"]] == [None]
    notes = [ln for ln in result.stderr.splitlines() if "CUDA graphs" in ln]
    assert len(notes) == 1 and "compiling as default on cpu" in notes[0]
    assert "Traceback" not in result.stderr
