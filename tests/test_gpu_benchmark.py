"""The benchmark's GPU truths, checked on the CPU: start-up apart from the steady rate,
model+copy rows beside model rows."""

from __future__ import annotations

from pathlib import Path

import torch
from test_benchmark import FakeClock, fake_runner

from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint
from convnext_cli.engine.benchmark import BenchmarkRunner, SweepOptions
from convnext_cli.engine.pipeline import Runner


def test_end_to_end_start_up_is_reported_apart_from_the_steady_rate() -> None:
    clock = FakeClock()
    paths = tuple(f"img{i}.jpg" for i in range(16))
    options = SweepOptions(batch_sizes=(2,), warmup=0, iters=1, images=paths)
    bench = BenchmarkRunner(fake_runner(clock, [2.0] + [0.1] * 7), options)  # type: ignore[arg-type]
    bench.clock = clock
    row = bench.time_end_to_end(2)
    assert row.startup_s == 2.0
    assert row.steady_images_per_s == 20.0  # 14 images in 0.7 s
    assert row.images_per_s == round(16 / 2.7, 2)


def test_model_and_model_plus_copy_rows(v1_checkpoint: Path) -> None:
    checkpoint = load_checkpoint(str(v1_checkpoint))
    cpu = torch.device("cpu")
    runner = Runner(build_model(checkpoint, cpu, torch.float32), checkpoint.preprocess, cpu,
                    torch.float32)  # fmt: skip
    default = BenchmarkRunner(runner, SweepOptions(batch_sizes=(2,), warmup=0, iters=1)).sweep()
    assert [r.mode for r in default.rows] == ["model"]  # on the CPU the copy is nothing
    options = SweepOptions(batch_sizes=(1, 2), warmup=0, iters=2, copy_rows=True)
    report = BenchmarkRunner(runner, options).sweep()
    assert [(r.mode, r.batch_size) for r in report.rows] == [
        ("model", 1), ("model+copy", 1), ("model", 2), ("model+copy", 2)
    ]  # fmt: skip
    assert all(r.images_per_s > 0 for r in report.rows)
