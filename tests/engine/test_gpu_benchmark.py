"""The benchmark's GPU truths, checked on the CPU: start-up apart from the steady rate,
model+copy rows beside model rows, and with a mocked ``torch.cuda``: per-batch latency from
CUDA events with one synchronisation per row, the device sampler's peak used memory and
utilisation (``n/a`` without NVML), the table's CUDA columns at 80 columns."""

from __future__ import annotations

import io
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from rich.console import Console
from test_benchmark import FakeClock, fake_runner

from convnext_cli.checkpoints.checkpoint import build_model, load_checkpoint
from convnext_cli.engine import decode_pool
from convnext_cli.engine.benchmark import BenchmarkRunner, DeviceSampler, SweepOptions
from convnext_cli.engine.pipeline import Runner
from convnext_cli.engine.staging import fixed_shape
from convnext_cli.outputs.benchmark_report import print_report


def test_end_to_end_start_up_is_reported_apart_from_the_steady_rate() -> None:
    """The images are cycled to the pipeline's fill plus the steady window; the steady rate
    is taken over the window only (one worker: it decodes 2 batches ahead, the fill is 3)."""
    clock = FakeClock()
    paths = tuple(f"img{i}.jpg" for i in range(4))
    options = SweepOptions(
        batch_sizes=(2,), warmup=0, iters=1, images=paths, workers=1, steady_batches=5
    )
    # the first batch starts the workers (2 s), the two behind it come at once (decoded
    # meanwhile), then one batch every 0.1 s
    bench = BenchmarkRunner(fake_runner(clock, [2.0, 0.0, 0.0] + [0.1] * 5), options)  # type: ignore[arg-type]
    bench.clock = clock
    assert bench.fill_batches(2) == 3
    row = bench.time_end_to_end(2)
    assert row.images == 16  # 4 files cycled to 8 batches of 2
    assert row.startup_s == 2.0
    assert row.steady_batches == 5
    assert row.steady_images_per_s == pytest.approx(20.0)  # 10 images in 0.5 s
    assert row.images_per_s == round(16 / 2.5, 2)


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


# --- CUDA figures with a mocked torch.cuda: events, the device sampler, the table ------------


class DeviceClock:
    """A host clock and a device timeline: a fake forward is queued at once (the host
    moves 1 ms) and runs on the device for its seconds after what is queued before it;
    synchronising brings the host to the device's end."""

    def __init__(self) -> None:
        self.now = 0.0  # the host's perf_counter
        self.device_end = 0.0  # when the work queued so far ends on the device
        self.syncs = 0

    def __call__(self) -> float:
        return self.now

    def queue(self, seconds: float) -> None:
        self.device_end = max(self.device_end, self.now) + seconds
        self.now += 0.001

    def synchronize(self, *args: object) -> None:
        self.syncs += 1
        self.now = max(self.now, self.device_end)


def fake_cuda(
    monkeypatch: pytest.MonkeyPatch,
    clock: DeviceClock,
    used_mb: list[float],
    utilisation: list[float] | None,
) -> None:
    """torch.cuda as the benchmark uses it: Event (timed on the fake device timeline),
    synchronize, peak-memory stats, mem_get_info (the next of `used_mb`, then the last),
    utilization (the next of `utilisation`; None: no NVML)."""

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.at: float | None = None

        def record(self, stream: object = None) -> None:
            self.at = max(clock.device_end, clock.now)  # after what is queued before it

        def elapsed_time(self, end: FakeEvent) -> float:
            assert self.at is not None and end.at is not None
            return (end.at - self.at) * 1000

    readings = iter(used_mb)
    last = [used_mb[0]]

    def mem_get_info(device: object = None) -> tuple[int, int]:
        last[0] = next(readings, last[0])
        total = 80_000 * 2**20
        return total - int(last[0] * 2**20), total

    def device_memory_used(device: object = None) -> int:
        raise ModuleNotFoundError("pynvml")

    busy = iter(utilisation or [])

    def utilization(device: object = None) -> int:
        if utilisation is None:
            raise ModuleNotFoundError("pynvml does not seem to be installed")
        return int(next(busy, utilisation[-1]))

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", clock.synchronize)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 300 * 2**20)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "device_memory_used", device_memory_used, raising=False)
    monkeypatch.setattr(torch.cuda, "utilization", utilization)


def cuda_bench(clock: DeviceClock, forward_seconds: list[float], **options: Any) -> BenchmarkRunner:
    steps = iter(forward_seconds)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        clock.queue(next(steps))
        return pixels

    def classify(paths, top_k, batch_size, workers):  # noqa: ANN001, ANN202
        for start in range(0, len(paths), batch_size):
            clock.queue(next(steps))
            clock.synchronize()  # the batch's results read back to the host
            clock.syncs -= 1  # (the pipeline's own readback, not the benchmark's)
            yield paths[start : start + batch_size]

    runner = SimpleNamespace(
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        spec=SimpleNamespace(shortest_edge=4),
        channels_last=True,
        jpeg_on_device=False,
        logits_fn=forward,
        classify=classify,
        compiled=True,
        compile_mode="max-autotune",
        model=None,
    )
    bench = BenchmarkRunner(runner, SweepOptions(**options))  # type: ignore[arg-type]
    bench.clock = clock
    bench.random_batch = lambda batch_size: torch.zeros(batch_size, 3, 4, 4)  # type: ignore[method-assign]
    return bench


def test_cuda_model_rows_time_each_forward_with_events_and_synchronise_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = DeviceClock()
    fake_cuda(monkeypatch, clock, used_mb=[1000.0, 2500.0], utilisation=[90, 96])
    timed = [0.010, 0.012, 0.011, 0.010, 0.030]
    # max-autotune captures CUDA graphs too: three untimed forwards, whatever --warmup says
    bench = cuda_bench(clock, [0.05] * 3 + timed, batch_sizes=(8,), warmup=1, iters=len(timed))
    row = bench.time_model(8)
    # one synchronisation after the warm-up, one at the end of the timed forwards
    assert clock.syncs == 2
    assert row.latency_clock == "cuda events"
    assert row.p50_ms == pytest.approx(11.0) and row.p99_ms == pytest.approx(29.28, abs=0.01)
    # the total is the wall clock between the two synchronisations: the device's time
    assert row.seconds == pytest.approx(sum(timed), abs=1e-4)
    assert row.images_per_s == pytest.approx(8 * len(timed) / sum(timed), rel=1e-3)
    assert row.compile_mode == "max-autotune"
    assert row.device_peak_mb == 2500.0 and row.peak_memory_mb == 300.0
    # a row shorter than NVML's sample period has no utilisation of its own: n/a
    assert row.gpu_util_pct is None


def test_cuda_end_to_end_rows_do_not_synchronise_per_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = DeviceClock()
    fake_cuda(monkeypatch, clock, used_mb=[1200.0, 3100.0], utilisation=None)
    paths = tuple(f"img{i}.jpg" for i in range(8))
    bench = cuda_bench(clock, [1.0] + [0.1] * 6, batch_sizes=(2,), warmup=0, iters=1,
                       images=paths, workers=1, steady_batches=3)  # fmt: skip
    row = bench.time_end_to_end(2)
    assert clock.syncs == 2  # before and after the run, none per batch
    # max-autotune: four batches of fill (its CUDA graphs recorded), then three timed
    assert row.images == 14 and row.startup_s == pytest.approx(1.0, abs=0.01)
    assert row.steady_batches == 3 and row.steady_images_per_s == pytest.approx(20.0, rel=0.05)
    assert row.latency_clock.startswith("wall clock")
    assert row.device_peak_mb == 3100.0
    assert row.gpu_util_pct is None  # no NVML: n/a, not a failure


def test_the_sampler_baseline_and_the_table_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = DeviceClock()
    fake_cuda(monkeypatch, clock, used_mb=[900.0, 1500.0], utilisation=None)
    bench = cuda_bench(clock, [0.01] * 10, batch_sizes=(4,), warmup=0, iters=2, copy_rows=False)
    monkeypatch.setattr(
        "convnext_cli.engine.benchmark.describe_environment",
        lambda runner, name: {
            "model": "m", "architecture": "convnext", "parameters_m": 28.6, "image_size": 224,
            "device": "cuda", "device_name": "NVIDIA H200", "torch": "2", "torchvision": "0",
            "convnext_cli": "0",
        },
    )  # fmt: skip
    report = bench.sweep()
    header = report.header
    assert header["device_used_before_mb"] == 900.0
    assert header["device_memory_source"] == "mem_get_info"  # NVML absent
    assert header["compile_mode"] == "max-autotune"
    (row,) = report.rows
    row.images_per_s, row.p99_ms = 25_123.4, 1234.5  # wide figures still fit
    console = Console(record=True, width=80, file=io.StringIO(), color_system=None)
    print_report(report, console, bars=False)
    text = console.export_text()
    assert all(len(ln) <= 80 for ln in text.splitlines()) and "…" not in text, text
    assert "dev MB" in text and "GPU %" in text and "n/a" in text
    assert "model: cuda events" in text and "compile=max-autotune" in text


def test_the_sampler_thread_catches_a_peak_between_its_first_and_last_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = DeviceClock()
    readings = [1000.0, 1500.0, 4000.0, 1300.0, 1200.0]
    fake_cuda(monkeypatch, clock, used_mb=readings, utilisation=[50, 90])
    sampler = DeviceSampler(torch.device("cuda"), interval_s=0.005)
    ticks = iter(range(1000))
    sampler.clock = lambda: 0.5 * next(ticks)  # half a second between readings
    with sampler:
        deadline = time.monotonic() + 10
        while len(sampler._memory) < len(readings) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert sampler.peak_mb == 4000.0  # read by the thread: neither the first nor the last
    # the row starts at 0 s; the reading half a second in (50) is left out: NVML's figure
    # then still covers what ran before the row
    assert sampler.mean_utilisation == pytest.approx(90.0)
    assert sampler.memory_source == "mem_get_info"


def test_cpu_rows_have_no_device_figures(v1_checkpoint: Path) -> None:
    checkpoint = load_checkpoint(str(v1_checkpoint))
    cpu = torch.device("cpu")
    runner = Runner(build_model(checkpoint, cpu, torch.float32), checkpoint.preprocess, cpu,
                    torch.float32)  # fmt: skip
    bench = BenchmarkRunner(runner, SweepOptions(batch_sizes=(2,), warmup=0, iters=2))
    report = bench.sweep()
    (row,) = report.rows
    assert row.device_peak_mb is None and row.gpu_util_pct is None
    assert row.latency_clock == "wall clock" and row.compile_mode == "eager"
    assert "device_used_before_mb" not in report.header and not bench.sampler.active
    console = Console(record=True, width=80, file=io.StringIO(), color_system=None)
    print_report(report, console, bars=False)
    assert "dev MB" not in console.export_text()


def test_reduce_overhead_rows_record_their_cuda_graph_before_timing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CUDA graph trees run once, then record: both happen before the timed forwards (and
    before the sampler thread starts), whatever --warmup says."""
    clock = DeviceClock()
    fake_cuda(monkeypatch, clock, used_mb=[1000.0], utilisation=None)
    # three untimed forwards of 1 s, then two timed ones of 10 ms
    bench = cuda_bench(clock, [1.0, 1.0, 1.0, 0.01, 0.01], batch_sizes=(2,), warmup=0, iters=2)
    bench.runner.compile_mode = "reduce-overhead"
    row = bench.time_model(2)
    assert row.compile_mode == "reduce-overhead"
    assert row.p99_ms == pytest.approx(10.0) and row.seconds == pytest.approx(0.02, abs=1e-3)


# --- measurements that cannot lie: compiled rows prove it, the steady window ----------------


class Small(torch.nn.Module):
    """A model small enough for Inductor on the CPU to compile in a second or two."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def compiled_small_runner() -> SimpleNamespace:
    model = Small().eval()
    return SimpleNamespace(
        device=torch.device("cpu"),
        dtype=torch.float32,
        spec=SimpleNamespace(shortest_edge=8),
        channels_last=False,
        jpeg_on_device=False,
        model=model,
        logits_fn=torch.compile(model, dynamic=False),
        compiled=True,
        compile_mode="default",
    )


def test_a_compiled_row_past_dynamos_recompile_limit_says_it_ran_eager() -> None:
    """Ten batch sizes of one compiled forward, Inductor on the CPU: dynamo keeps 8 graphs
    per function and would run the 9th and 10th eagerly without a word; those rows say so,
    are timed on the eager model and are not comparable (never compared with a target)."""
    bench = BenchmarkRunner(
        compiled_small_runner(),  # type: ignore[arg-type]
        SweepOptions(batch_sizes=(1,), warmup=0, iters=2, copy_rows=False),
    )
    bench.watch.reset(0)  # dynamo forgets earlier graphs; its own limit (8) stays
    assert bench.watch.limit() == 8
    rows = [bench.time_model(size) for size in range(1, 11)]
    assert [r.compile_status for r in rows[:8]] == ["compiled"] * 8
    assert [r.compiles for r in rows[:8]] == [1] * 8
    assert [r.compiled_total for r in rows[:8]] == list(range(1, 9))
    for row in rows[8:]:
        assert row.compile_status == "fell back to eager: dynamo's recompile limit (8) hit"
        assert row.compile_mode == "default" and not row.comparable
        assert row.compiles == 0 and row.images_per_s > 0
    assert all(r.comparable for r in rows[:8])


def test_a_sweep_starts_from_a_fresh_dynamo_and_allows_its_batch_sizes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Graphs compiled before the sweep (another runner, another dtype) do not count
    against the sweep: it resets dynamo and allows a graph per batch size."""
    monkeypatch.setattr(
        "convnext_cli.engine.benchmark.describe_environment", lambda runner, name: {}
    )
    runner = compiled_small_runner()
    with torch.inference_mode():
        for size in range(1, 9):  # eight graphs already: the limit reached
            runner.logits_fn(torch.randn(size, 3, 8, 8))
    options = SweepOptions(batch_sizes=(9, 10), warmup=0, iters=1, copy_rows=False)
    report = BenchmarkRunner(runner, options).sweep()  # type: ignore[arg-type]
    assert [r.compile_status for r in report.rows] == ["compiled", "compiled"]
    assert [r.compiled_total for r in report.rows] == [1, 2]


def test_the_steady_end_to_end_rate_is_the_decoders_own(
    v1_checkpoint: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode workers that take a known time per image (a stand-in decoder, forked with
    the workers) and a model that costs nothing: the benchmark's steady rate is the
    decoders', within 10%, not inflated by the batches decoded while the pipeline filled
    (nor by a worker that never started)."""
    checkpoint = load_checkpoint(str(v1_checkpoint))
    cpu = torch.device("cpu")
    runner = Runner(build_model(checkpoint, cpu, torch.float32), checkpoint.preprocess, cpu,
                    torch.float32)  # fmt: skip
    runner.logits_fn = lambda batch: torch.zeros(batch.shape[0], 1000)
    shape = fixed_shape(runner.spec)
    assert shape is not None
    # per image, per worker: two workers decode 10 images a second, slow enough that a
    # loaded machine's scheduling delays stay far below the 10% allowed
    seconds = 0.2

    def stand_in(ref: object, spec: object, jpeg_on_device: bool) -> torch.Tensor:
        time.sleep(seconds)
        return torch.zeros(shape, dtype=torch.uint8)

    monkeypatch.setattr(decode_pool, "decode_one", stand_in)
    options = SweepOptions(batch_sizes=(4,), warmup=0, iters=1,
                           images=tuple(map(str, photos)), workers=2)  # fmt: skip
    row = BenchmarkRunner(runner, options).time_end_to_end(4)
    assert row.steady_batches == 20 and row.images == 4 * 25  # 5 batches of fill
    assert row.steady_images_per_s == pytest.approx(2 / seconds, rel=0.10)
