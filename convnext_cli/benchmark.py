"""Throughput and latency: model-only (random input) and end to end (decode + preprocess + model).

Timing follows the usual rules: warm-up iterations first, ``torch.cuda.synchronize`` around
every timed region on CUDA (``torch.mps.synchronize`` on MPS), latency measured per batch,
throughput as images over the summed batch times.  Peak memory is CUDA's max allocated
memory (reset per configuration) on a GPU, the process's peak resident set on a CPU.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from convnext_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from convnext_cli.checkpoints import Checkpoint


@dataclass
class Row:
    mode: str  # "model" or "end-to-end"
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


@dataclass
class Report:
    header: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"header": self.header, "rows": [asdict(r) for r in self.rows]}


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise UsageError(f"batch sizes must be positive integers, got {text!r}")
    return values


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of the samples."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def synchronizer(device: torch.device) -> Callable[[], None]:
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def reset_peak_memory(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20, "mps driver allocated"
    import resource

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return rss_kb * scale / 2**20, "process peak RSS"


def describe_environment(device: torch.device, checkpoint: Checkpoint, extra: dict) -> dict:
    import torch
    import torchvision

    from convnext_cli import __version__

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = "Apple MPS"
    else:
        name = platform.processor() or platform.machine()
        name = f"{_cpu_model() or name} ({torch.get_num_threads()} threads)"
    config = checkpoint.config
    params = sum(v.numel() for v in checkpoint.state_dict.values())
    return {
        "device": str(device),
        "device_name": name,
        "model": checkpoint.source,
        "architecture": f"{config.model_type} depths={config.depths} widths={config.hidden_sizes}",
        "parameters_m": round(params / 1e6, 2),
        "image_size": checkpoint.preprocess.shortest_edge,
        "convnext_cli": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        **extra,
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def time_model(
    model: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    image_size: int,
    channels_last: bool,
    warmup: int,
    iters: int,
) -> Row:
    """Model-only: the same random batch, `warmup` untimed then `iters` timed forwards."""
    import torch

    sync = synchronizer(device)
    pixels = torch.randn(batch_size, 3, image_size, image_size, device=device).to(dtype)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    reset_peak_memory(device)
    latencies: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(pixels)
        sync()
        for _ in range(iters):
            start = time.perf_counter()
            model(pixels)
            sync()
            latencies.append(time.perf_counter() - start)
    return _row("model", dtype, batch_size, batch_size * iters, latencies, device)


def time_end_to_end(
    run: Callable[[Sequence[str], int], Any],
    paths: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    warmup: int,
) -> Row:
    """Decode + preprocess + model over every image; latency = time between finished batches."""
    sync = synchronizer(device)
    if warmup:
        for _ in run(paths[: batch_size * min(warmup, 2)], batch_size):
            pass
    reset_peak_memory(device)
    latencies: list[float] = []
    count = 0
    sync()
    start = last = time.perf_counter()
    for results in run(paths, batch_size):
        sync()
        now = time.perf_counter()
        latencies.append(now - last)
        last = now
        count += len(results)
    total = time.perf_counter() - start
    row = _row("end-to-end", dtype, batch_size, count, latencies, device)
    row.seconds = round(total, 4)
    row.images_per_s = round(count / total, 2) if total > 0 else 0.0
    return row


def _row(
    mode: str,
    dtype: torch.dtype,
    batch_size: int,
    images: int,
    latencies: list[float],
    device: torch.device,
) -> Row:
    total = sum(latencies)
    memory, kind = peak_memory(device)
    ms = [t * 1000 for t in latencies]
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
        peak_memory_mb=round(memory, 1),
        memory_kind=kind,
    )


def image_files(folder: str) -> list[str]:
    from pathlib import Path

    from convnext_cli.inputs import folder_images

    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"--images {folder}: not a folder")
    found = folder_images(path, recursive=True)
    if not found:
        raise UsageError(f"--images {folder}: no images found")
    return found


def plot(report: Report, path: str) -> None:
    """Throughput against batch size, one line per (mode, dtype); .png or .svg."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("plotting needs matplotlib: pip install 'convnext-cli[plot]'") from exc
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[Row]] = {}
    for row in report.rows:
        series.setdefault((row.mode, row.dtype), []).append(row)
    for (mode, dtype), rows in sorted(series.items()):
        rows.sort(key=lambda r: r.batch_size)
        ax.plot(
            [r.batch_size for r in rows],
            [r.images_per_s for r in rows],
            marker="o",
            label=f"{mode}, {dtype}",
        )
    ax.set_xscale("log", base=2)
    sizes = sorted({r.batch_size for r in report.rows})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    header = report.header
    ax.set_title(f"{os.path.basename(str(header['model']))} on {header['device_name']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
