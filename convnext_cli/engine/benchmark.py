"""Throughput and latency of a loaded runner: model-only (random input) and end to end.

The measuring loop of ``convnext benchmark``, apart from its options and presentation
(the shape of timm's ``benchmark.py``)::

    options = SweepOptions(batch_sizes=(1, 8, 32), warmup=3, iters=10, images=paths)
    report = BenchmarkRunner(runner, options).sweep()      # one runner: one device, one dtype
    report = sweep(runners, options, model_name="...")     # several dtypes, loaded one at a time

Timing follows the usual rules: warm-up iterations first, then the timed ones.  On CUDA a
model-only row's per-batch latency comes from ``torch.cuda.Event(enable_timing=True)`` pairs
recorded around each forward and read after one synchronisation at the end of the row, so
that the host keeps queuing work as a real run does; the row's total (and so its images/s)
is the wall clock between two synchronisations.  Elsewhere each forward is timed by the
wall clock with a synchronisation after it (``torch.mps.synchronize`` on MPS, nothing on
the CPU).  Each row's ``latency_clock`` says which clock its p50/p90/p99 are from; end to
end it is the wall clock between finished batches (their results on the host; no extra
synchronisation, which would stall the batch queued behind).

Model-only rows start from a normalised batch on the device ("model"); on CUDA
"model+copy" rows start from a uint8 batch in pinned host memory (copy and normalisation
included).  End-to-end rows report the first batch
(worker start-up, pipeline fill) as ``startup_s``, apart from ``steady_images_per_s``.
Compiled models compile one static graph per batch size, so rows do not depend on the
order of ``-b``; each row names its compile mode (``eager`` when not compiled).

Peak memory is CUDA's max allocated memory (reset per row) on a GPU, the process's peak
resident set on a CPU.  On CUDA a :class:`DeviceSampler` thread also reads the device's used
memory and ``torch.cuda.utilization`` during every timed row: ``device_peak_mb`` is the
device's used memory at its highest (everything on the GPU: the CUDA context, the weights,
the caching allocator's reserve, nvjpeg's own buffers, and any other process on it; the
header's ``device_used_before_mb`` is the same reading before the first row), and
``gpu_util_pct`` the mean utilisation (NVML, from ``nvidia-ml-py``; ``None``, shown ``n/a``,
where it cannot be read).  Elsewhere both are ``None``.

A row is flagged ``noisy`` when its p99 batch latency is more than ``NOISY_P99_OVER_P50``
times its p50 over at least ``NOISE_MIN_BATCHES`` timed batches (end to end, the first
batch is left out of that check: it includes starting the decoding workers).  Nothing here
prints: progress goes to the caller's ``on_step`` callback.
"""

from __future__ import annotations

import contextlib
import itertools
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from convnext_cli.engine._environment import cpu_model
from convnext_cli.engine.device import resolve_device, resolve_dtype
from convnext_cli.engine.gpu.sampler import DeviceSampler
from convnext_cli.engine.loading import ModelSource, RunOptions, load_runner
from convnext_cli.engine.pipeline import Runner

NOISY_P99_OVER_P50 = 1.5
NOISE_MIN_BATCHES = 5
NOISE_RULE = f"p99 > {NOISY_P99_OVER_P50}x p50 over >= {NOISE_MIN_BATCHES} timed batches"
STEADY_BATCHES = 20  # end to end: batches in the steady window, after the pipeline's fill


@dataclass
class Row:
    mode: str  # "model", "model+copy" or "end-to-end"
    dtype: str
    batch_size: int
    images: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    peak_memory_mb: float
    memory_kind: str  # "cuda max allocated" or "process peak RSS"
    spread: float = 0.0  # p99 / p50 over the batches the noise check looks at
    noisy: bool = False  # spread above NOISY_P99_OVER_P50 with enough batches to tell
    # end to end: the first batch (starting the decode workers, filling the pipeline) apart
    # from the steady rate over the batches after it
    startup_s: float = 0.0
    steady_images_per_s: float = 0.0
    compile_mode: str = "eager"  # or the torch.compile mode (choices.COMPILE_MODES)
    latency_clock: str = "wall clock"  # what p50/p90/p99 come from (see the module doc)
    # CUDA only (None elsewhere): the device's used memory at its peak over the row, and
    # the mean GPU utilisation sampled during it (None also where NVML cannot be read)
    device_peak_mb: float | None = None
    gpu_util_pct: float | None = None
    # compiled rows prove it (see CompileWatch): "compiled", "eager" (not compiled), or
    # "fell back to eager: <why>" / "compiled during the timed iterations" (not comparable)
    compile_status: str = "eager"
    compiles: int = 0  # graphs dynamo compiled during this row (its warm-up included)
    compiled_total: int = 0  # graphs compiled since the sweep's dynamo reset (vs. its limit)
    steady_batches: int = 0  # end to end: the batches the steady rate is taken over

    @property
    def comparable(self) -> bool:
        """Whether the row measured what it is labelled (an eager row, or one that ran
        compiled throughout): only such rows are compared with a target."""
        return self.compile_status in ("eager", "compiled")


@dataclass
class Report:
    header: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    @property
    def noisy_rows(self) -> list[Row]:
        return [r for r in self.rows if r.noisy]

    def to_dict(self) -> dict[str, Any]:
        return {"header": self.header, "rows": [asdict(r) for r in self.rows]}


@dataclass(frozen=True)
class SweepOptions:
    """How to measure: batch sizes, untimed and timed iterations, images for end to end."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup: int = 3
    iters: int = 10
    images: tuple[str, ...] = ()  # also time end to end over these files when given
    workers: int | None = None  # decoding workers end to end (None: the pipeline's default)
    # also time "model+copy" rows (uint8 pinned host batch -> copy, normalise, model);
    # None: on CUDA only, where the copy is real work
    copy_rows: bool | None = None
    # end to end: the steady rate is taken over this many batches after the pipeline is full
    # (the images are cycled to have enough of them)
    steady_batches: int = STEADY_BATCHES

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive, got {self.batch_sizes}")
        if self.steady_batches < 1:
            raise ValueError(f"need steady_batches >= 1, got {self.steady_batches}")
        if self.warmup < 0 or self.iters < 1:
            raise ValueError(f"need warmup >= 0 and iters >= 1, got {self.warmup}, {self.iters}")


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of the samples."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_spread(latencies_ms: Sequence[float]) -> tuple[float, bool]:
    """(p99 / p50, noisy) of per-batch latencies; noisy needs NOISE_MIN_BATCHES of them."""
    if not latencies_ms:
        return 0.0, False
    p50 = statistics.median(latencies_ms)
    spread = percentile(latencies_ms, 99) / p50 if p50 > 0 else 0.0
    noisy = len(latencies_ms) >= NOISE_MIN_BATCHES and spread > NOISY_P99_OVER_P50
    return round(spread, 2), noisy


def make_row(
    mode: str,
    dtype: torch.dtype | str,
    batch_size: int,
    images: int,
    latencies: Sequence[float],
    memory: tuple[float, str] = (0.0, ""),
) -> Row:
    """A row from per-batch latencies in seconds (end to end, the first is pipeline fill)."""
    total = sum(latencies)
    ms = [t * 1000 for t in latencies]
    steady = ms[1:] if mode == "end-to-end" else ms
    spread, noisy = latency_spread(steady)
    return Row(
        mode=mode,
        dtype=str(dtype).removeprefix("torch."),
        batch_size=batch_size,
        images=images,
        seconds=round(total, 4),
        images_per_s=round(images / total, 2) if total > 0 else 0.0,
        p50_ms=round(statistics.median(ms), 2),
        p90_ms=round(percentile(ms, 90), 2),
        p99_ms=round(percentile(ms, 99), 2),
        peak_memory_mb=round(memory[0], 1),
        memory_kind=memory[1],
        spread=spread,
        noisy=noisy,
    )


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20, "mps driver allocated"
    import resource

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return rss_kb * scale / 2**20, "process peak RSS"


def describe_environment(runner: Runner, model_name: str) -> dict[str, Any]:
    """The report's header: what ran where, with which library versions."""
    import torchvision

    from convnext_cli import __version__

    device = runner.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = "Apple MPS"
    else:
        name = platform.processor() or platform.machine()
        name = f"{cpu_model() or name} ({torch.get_num_threads()} threads)"
    config = runner.model.config
    params = sum(p.numel() for p in runner.model.state_dict().values())
    return {
        "device": str(device),
        "device_name": name,
        "model": model_name,
        "architecture": f"{config.model_type} depths={config.depths} widths={config.hidden_sizes}",
        "parameters_m": round(params / 1e6, 2),
        "image_size": runner.spec.shortest_edge,
        "convnext_cli": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


class CompileWatch:
    """What dynamo compiles while rows are timed, so that a compiled row proves it ran
    compiled.

    dynamo keeps at most ``recompile_limit`` (8) compiled graphs per function (a batch
    size, a dtype, a compile mode each take one; model instances share them); past it, it
    runs the function *eagerly* without a word.  So the sweep resets dynamo for each
    runner (:meth:`reset`), and each row runs under ``fail_on_recompile_limit_hit``
    (:meth:`strict`): a graph past the limit raises, and the row says it fell back.  The
    counts come from ``torch._dynamo.utils.counters["frames"]``: ``ok`` frames compiled,
    ``total`` frames dynamo tried (a difference is a frame it gave up on)."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.base = self.count() if active else (0, 0)
        self.graphs = 0  # the recompile limit the rows run under (0: dynamo's own)

    @staticmethod
    def count() -> tuple[int, int]:
        """(frames compiled, frames tried) since the process started."""
        if "torch._dynamo" not in sys.modules:
            return 0, 0
        from torch._dynamo.utils import counters

        return counters["frames"]["ok"], counters["frames"]["total"]

    def reset(self, graphs: int) -> None:
        """Forget every compiled graph (``torch._dynamo.reset``), and allow `graphs` per
        function (at least dynamo's own limit)."""
        if not self.active:
            return
        import torch._dynamo
        import torch._dynamo.config as dynamo_config

        torch._dynamo.reset()
        self.graphs = max(dynamo_config.recompile_limit, graphs)
        self.base = self.count()

    @property
    def total(self) -> int:
        """Graphs compiled since the last :meth:`reset`."""
        return self.count()[0] - self.base[0]

    def limit(self) -> int:
        import torch._dynamo.config as dynamo_config

        return self.graphs or int(dynamo_config.recompile_limit)

    def strict(self) -> contextlib.AbstractContextManager[Any]:
        """dynamo raises instead of running eagerly past its recompile limit (the sweep's,
        for the time of a row only)."""
        if not self.active:
            return contextlib.nullcontext()
        import torch._dynamo.config as dynamo_config

        return dynamo_config.patch(fail_on_recompile_limit_hit=True, recompile_limit=self.limit())

    def limit_errors(self) -> tuple[type[BaseException], ...]:
        if not self.active:
            return ()
        from torch._dynamo.exc import FailOnRecompileLimitHit

        return (FailOnRecompileLimitHit,)

    def status(self, before: tuple[int, int], warmed: tuple[int, int]) -> str:
        """A compiled row's status from the counts before it, after its warm-up and now."""
        now = self.count()
        if now[1] - now[0] > before[1] - before[0]:
            return "fell back to eager: dynamo gave up compiling a frame"
        if now[0] > warmed[0]:
            return "compiled during the timed iterations (warm-up too short)"
        return "compiled"


class BenchmarkRunner:
    """Times one loaded runner (one device, one dtype) over the options' batch sizes:
    model-only on a random batch, then end to end over the options' images if any."""

    def __init__(
        self,
        runner: Runner,
        options: SweepOptions,
        model_name: str = "",
        on_step: Callable[[str], None] | None = None,
    ) -> None:
        self.runner = runner
        self.options = options
        self.model_name = model_name
        self.on_step = on_step or (lambda message: None)
        self.device = runner.device
        self.sync = synchronizer(runner.device)
        self.clock: Callable[[], float] = time.perf_counter  # a test can put a fake clock here
        self.sampler = DeviceSampler(runner.device)
        # per-batch latency from CUDA events on CUDA (see the module doc)
        self.events = runner.device.type == "cuda"
        self.watch = CompileWatch(bool(getattr(runner, "compiled", False)))

    @property
    def dtype_name(self) -> str:
        return str(self.runner.dtype).removeprefix("torch.")

    @property
    def compile_mode(self) -> str:
        if not getattr(self.runner, "compiled", False):
            return "eager"
        return str(getattr(self.runner, "compile_mode", "default"))

    def header(self) -> dict[str, Any]:
        runner, options = self.runner, self.options
        header = describe_environment(runner, self.model_name)
        header.update(
            channels_last=runner.channels_last,
            compile=runner.logits_fn is not runner.model,
            compile_mode=self.compile_mode,
            warmup=options.warmup,
            iters=options.iters,
        )
        if self.sampler.active:
            header["device_used_before_mb"] = self.sampler.used_mb()
            header["device_memory_source"] = self.sampler.memory_source
        if options.images:
            header["images"] = len(options.images)
            header["decode"] = "gpu" if runner.jpeg_on_device else "cpu"  # as --decode names them
            header["steady_batches"] = options.steady_batches
        header["noise_rule"] = NOISE_RULE
        return header

    def sweep(self) -> Report:
        """Every batch size model-only, then (with images) every batch size end to end."""
        report = Report(self.header())
        # one static graph per batch size (Runner.compile: dynamic=False), compiled afresh
        # for this runner, so that no row depends on the order of -b or on earlier runners
        self.watch.reset(len(self.options.batch_sizes) + 2)
        copy_rows = self.options.copy_rows
        if copy_rows is None:
            copy_rows = self.device.type == "cuda"
        for size in self.options.batch_sizes:
            self.on_step(f"timing model-only, {self.dtype_name}, batch {size}")
            report.rows.append(self.time_model(size))
            if copy_rows:
                self.on_step(f"timing model+copy, {self.dtype_name}, batch {size}")
                report.rows.append(self.time_model(size, with_copy=True))
        if self.options.images:
            for size in self.options.batch_sizes:
                self.on_step(f"timing end-to-end, {self.dtype_name}, batch {size}")
                report.rows.append(self.time_end_to_end(size))
        return report

    def _model_steps(
        self, batch_size: int, with_copy: bool
    ) -> tuple[Callable[[], None], Callable[[], None]]:
        """(one forward as the row times it, the same forward on the eager model)."""
        runner = self.runner
        forward, eager = runner.logits_fn, getattr(runner, "model", runner.logits_fn)
        if with_copy:
            edge = runner.spec.shortest_edge
            host = torch.randint(0, 256, (batch_size, 3, edge, edge), dtype=torch.uint8)
            if self.device.type == "cuda":
                host = host.pin_memory()
            return (lambda: forward(runner._to_input(host))), (
                lambda: eager(runner._to_input(host))
            )
        pixels = self.random_batch(batch_size)
        return (lambda: forward(pixels)), (lambda: eager(pixels))

    def time_model(self, batch_size: int, with_copy: bool = False) -> Row:
        """Model-only: the same random batch, `warmup` untimed then `iters` timed forwards
        (a compiled model gets at least :meth:`least_warmup` untimed forwards).

        ``with_copy`` ("model+copy" rows): each forward starts from a uint8 batch in pinned
        host memory, copied to the device and normalised as a run does (on CUDA its latency
        runs from an event on the copy stream to one on the compute stream); the plain
        "model" rows start from a normalised batch already on the device.  A compiled row
        that dynamo would run eagerly (its recompile limit hit) is timed eagerly and says
        so (``compile_status``)."""
        step, eager_step = self._model_steps(batch_size, with_copy)
        warmup = max(self.options.warmup, self.least_warmup())
        status = "compiled" if self.watch.active else "eager"
        before = self.watch.count()
        reset_peak_memory(self.device)
        with torch.inference_mode(), self.watch.strict():
            try:
                self._repeat(step, warmup)
            except self.watch.limit_errors():
                status = f"fell back to eager: dynamo's recompile limit ({self.watch.limit()}) hit"
                step = eager_step
                self._repeat(step, warmup)
            warmed = self.watch.count()
            latencies, total = self._timed(step, self.options.iters, with_copy)
        if status == "compiled":
            status = self.watch.status(before, warmed)
        memory = peak_memory(self.device)
        mode = "model+copy" if with_copy else "model"
        images = batch_size * self.options.iters
        row = make_row(mode, self.runner.dtype, batch_size, images, latencies, memory)
        self._label(row, status, before)
        if self.events:
            row.latency_clock = "cuda events"
        row.seconds = round(total, 4)
        row.images_per_s = round(images / total, 2) if total > 0 else 0.0
        return self.sampler.fill(row)

    def _label(self, row: Row, status: str, before: tuple[int, int]) -> None:
        row.compile_mode = self.compile_mode
        row.compile_status = status
        row.compiles = self.watch.count()[0] - before[0]
        row.compiled_total = self.watch.total

    def _repeat(self, step: Callable[[], None], times: int) -> None:
        for _ in range(times):
            step()
        self.sync()

    def _timed(
        self, step: Callable[[], None], iters: int, with_copy: bool
    ) -> tuple[list[float], float]:
        """(per-forward seconds, seconds for all of them) with the sampler running."""
        with self.sampler:
            if self.events:
                return self._time_with_events(step, iters, with_copy)
            latencies = []
            for _ in range(iters):
                start = self.clock()
                step()
                self.sync()
                latencies.append(self.clock() - start)
            return latencies, sum(latencies)

    def least_warmup(self) -> int:
        """Untimed forwards a model-only row needs: a compiled model's compilation (one);
        with CUDA graphs (reduce-overhead, and max-autotune, which captures them too) also
        the graph's warm-up run and its recording (three), so that no graph is captured
        while the row is timed and the sampler runs."""
        mode = self.compile_mode
        return {"eager": 0, "reduce-overhead": 3, "max-autotune": 3}.get(mode, 1)

    def random_batch(self, batch_size: int) -> torch.Tensor:
        """A normalised-looking random batch on the device, in the runner's dtype and layout."""
        runner = self.runner
        edge = runner.spec.shortest_edge
        pixels = torch.randn(batch_size, 3, edge, edge, device=self.device).to(runner.dtype)
        if runner.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return pixels

    def _time_with_events(
        self, step: Callable[[], None], iters: int, with_copy: bool = False
    ) -> tuple[list[float], float]:
        """(per-forward seconds from CUDA event pairs, wall seconds for all of them): the
        forwards are queued back to back and the device synchronised once, at the end.
        With the copy, each pair starts on the runner's copy stream (where the batch's
        host-to-device copy runs) and ends on the compute stream."""
        copy_stream = None
        if with_copy and hasattr(self.runner, "copy_stream"):
            copy_stream = self.runner.copy_stream()
        pairs = []
        start = self.clock()
        for _ in range(iters):
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record(copy_stream)
            step()
            end.record()
            pairs.append((begin, end))
        self.sync()
        total = self.clock() - start
        return [begin.elapsed_time(end) / 1000 for begin, end in pairs], total

    def fill_batches(self, batch_size: int) -> int:
        """End to end: the batches before the steady window, the pipeline's fill (every
        decode worker started, the batches it decodes ahead taken) and a compiled model's
        warm-up."""
        from convnext_cli.engine.pipeline import plan_workers

        known = batch_size * (self.options.steady_batches + 64) + 1
        _, prefetch = plan_workers(self.options.workers, known, batch_size, self.device.type)
        return max(2, prefetch + 1, self.least_warmup() + 1)

    def time_end_to_end(self, batch_size: int) -> Row:
        """Decode + preprocess + model over the images, cycled to fill the pipeline and a
        steady window of ``steady_batches`` batches; latency = time between finished
        batches.  The steady rate is taken over the window only: after the fill, with every
        decode worker started (batches are split into one task per worker, so the first
        batches start them all) and a compiled model compiled.  A compiled model past
        dynamo's recompile limit is run again eagerly, and the row says so."""
        fill = self.fill_batches(batch_size)
        wanted = (fill + self.options.steady_batches) * batch_size
        paths = list(itertools.islice(itertools.cycle(self.options.images), wanted))
        before = self.watch.count()
        status = "compiled" if self.watch.active else "eager"
        try:
            marks, total = self._run_end_to_end(paths, batch_size)
        except self.watch.limit_errors():
            status = f"fell back to eager: dynamo's recompile limit ({self.watch.limit()}) hit"
            compiled = self.runner.logits_fn
            self.runner.logits_fn = self.runner.model
            try:
                marks, total = self._run_end_to_end(paths, batch_size)
            finally:
                self.runner.logits_fn = compiled
        if status == "compiled" and self.watch.status(before, before).startswith("fell"):
            status = self.watch.status(before, before)
        return self._end_to_end_row(batch_size, fill, marks, total, status, before)

    def _run_end_to_end(
        self, paths: list[str], batch_size: int
    ) -> tuple[list[tuple[float, float]], float]:
        """((clock, images done) after each batch with the clock's start first, seconds)."""
        reset_peak_memory(self.device)
        count = 0
        self.sync()
        with self.sampler, self.watch.strict():
            start = self.clock()
            marks: list[tuple[float, float]] = [(start, 0)]
            for results in self._classify(paths, batch_size):
                # a yielded batch's results are on the host already; a device-wide
                # synchronisation here would also wait for the batch queued behind it
                if not self.events:
                    self.sync()
                count += len(results)
                marks.append((self.clock(), count))
            self.sync()
            total = self.clock() - start
        return marks, total

    def _end_to_end_row(
        self,
        batch_size: int,
        fill: int,
        marks: list[tuple[float, float]],
        total: float,
        status: str,
        before: tuple[int, int],
    ) -> Row:
        count = int(marks[-1][1])
        latencies = [b - a for (a, _), (b, _) in itertools.pairwise(marks)]
        row = make_row(
            "end-to-end", self.runner.dtype, batch_size, count, latencies, peak_memory(self.device)
        )
        self._label(row, status, before)
        row.latency_clock = "wall clock, batch to batch"
        self.sampler.fill(row)
        row.seconds = round(total, 4)
        row.images_per_s = round(count / total, 2) if total > 0 else 0.0
        row.startup_s = round(latencies[0], 4) if latencies else 0.0
        if len(marks) > fill + 1:  # marks[0] is the start, marks[fill] the fill's end
            (t0, n0), (t1, n1) = marks[fill], marks[-1]
            row.steady_batches = len(marks) - 1 - fill
            row.steady_images_per_s = round((n1 - n0) / (t1 - t0), 2) if t1 > t0 else 0.0
        return row

    def _classify(self, paths: Sequence[str], batch_size: int) -> Iterable[Sequence[Any]]:
        return self.runner.classify(
            paths, top_k=5, batch_size=batch_size, workers=self.options.workers
        )


def sweep(
    runners: Iterable[Runner],
    options: SweepOptions,
    model_name: str = "",
    on_step: Callable[[str], None] | None = None,
) -> Report:
    """One report over several runners (e.g. one per dtype), taken one at a time so that a
    generator can load each only when the previous one is done; the header is the first's."""
    report: Report | None = None
    for runner in runners:
        part = BenchmarkRunner(runner, options, model_name, on_step).sweep()
        del runner  # let a generator free this model before it builds the next one
        if report is None:
            report = part
        else:
            report.rows.extend(part.rows)
    if report is None:
        raise ValueError("sweep needs at least one runner")
    return report


def runners_for(
    source: ModelSource,
    options: RunOptions,
    dtype_names: Sequence[str],
    on_note: Callable[[str], None] | None = None,
) -> Iterator[Runner]:
    """One runner per dtype (each dtype once, ``auto`` resolved first), each loaded through
    :func:`~convnext_cli.engine.loading.load_runner` only when the sweep asks for it."""
    device = resolve_device(options.device)
    seen: list[torch.dtype] = []
    for name in dtype_names:
        dtype, _ = resolve_dtype(name, device)
        if dtype in seen:
            continue
        seen.append(dtype)
        loaded = load_runner(source, replace(options, dtype=name), on_note)
        yield loaded.runner
        del loaded
