"""Showing a benchmark report: the table, a throughput bar chart for the terminal, the
noisy-run note, and the matplotlib plot that ``-o plot.png`` saves.

Presentation only: the numbers come from :mod:`convnext_cli.engine.benchmark`; nothing here
imports torch.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text

from convnext_cli.errors import UsageError

if TYPE_CHECKING:
    from convnext_cli.engine.benchmark import Report, Row

NOISY_MARK = "!"
BAR_STYLES = {"model": "cyan", "end-to-end": "magenta"}
_EIGHTHS = " ▏▎▍▌▋▊▉"  # partial blocks, 1/8 to 7/8 of a character cell


def header_text(report: Report) -> Text:
    """Short lines (they fit 80 columns): the model; its shape; the machine; the settings;
    the library versions."""
    h = report.header
    text = Text()
    text.append(str(h["model"]), style="bold")
    text.append(f"\n{h['architecture']}  {h['parameters_m']}M params  {h['image_size']}px")
    text.append(
        f"\n{h['device_name']} ({h['device']})\nchannels_last={h['channels_last']}"
        f" compile={h.get('compile_mode', h['compile'])} warmup={h.get('warmup')}"
        f" iters={h.get('iters')}"
    )
    text.append(
        f"\ntorch {h['torch']}  torchvision {h['torchvision']}  convnext-cli {h['convnext_cli']}",
        style="dim",
    )
    return text


def on_device(report: Report) -> bool:
    """Whether the rows carry the device sampler's columns (CUDA: device MB, GPU %)."""
    return any(r.device_peak_mb is not None or r.gpu_util_pct is not None for r in report.rows)


def _figure(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def results_table(report: Report) -> Table:
    """One row per (mode, dtype, batch size); a noisy row's p99 carries NOISY_MARK.  A
    compile column when the rows' compile modes differ (the header names a common one);
    on CUDA the device's peak used memory and the mean GPU utilisation."""
    table = Table(show_header=True, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    compiles = len({r.compile_mode for r in report.rows}) > 1
    device = on_device(report)
    names = ["mode", "dtype"] + (["compile"] if compiles else [])
    names += ["batch", "images/s", "p50 ms", "p90 ms", "p99 ms", "peak MB"]
    names += ["dev MB", "GPU %"] if device else []
    for name in names:
        justify = "left" if name in ("mode", "dtype", "compile") else "right"
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in report.rows:
        p99 = Text(f"{r.p99_ms:.1f}")
        if report.noisy_rows:  # a mark on noisy rows, the same width of blank on the others
            p99.append(f" {NOISY_MARK}" if r.noisy else "  ", style="bold yellow")
        cells: list[str | Text] = [r.mode, r.dtype]
        if compiles:
            cells.append(r.compile_mode)
        cells += [
            str(r.batch_size),
            f"{r.images_per_s:.1f}",
            f"{r.p50_ms:.1f}",
            f"{r.p90_ms:.1f}",
            p99,
            f"{r.peak_memory_mb:.0f}",
        ]
        if device:
            cells += [_figure(r.device_peak_mb), _figure(r.gpu_util_pct)]
        table.add_row(*cells)
    return table


def fitted_table(report: Report, width: int) -> Table:
    """:func:`results_table`, its columns one space apart instead of two when that is what
    lets every header and value fit ``width`` cells (no ``peak …``); with CUDA's two more
    columns, the edges dropped too if that is still not enough."""
    table = results_table(report)
    measure = Console(width=10_000, file=io.StringIO()).measure
    if measure(table).maximum > width:
        table.padding = (0, 0, 0, 1)
    if measure(table).maximum > width:
        table.padding = (0, 0, 0, 0)
        table.show_edge = False
    return table


def speed_notes(report: Report) -> list[str]:
    """Warnings and notes on what the rows mean: an end-to-end row faster than the model
    alone (same dtype and batch size: the model's warm-up was too short, its first batches
    were timed cold), and float16 on the CPU (emulated there: far slower than float32)."""
    notes = []
    model = {(r.dtype, r.batch_size): r for r in report.rows if r.mode == "model"}
    for row in report.rows:
        alone = model.get((row.dtype, row.batch_size))
        if row.mode == "end-to-end" and alone and row.images_per_s > alone.images_per_s:
            notes.append(
                f"warning: end-to-end {row.dtype} b={row.batch_size} ran faster "
                f"({row.images_per_s:.1f} images/s) than the model alone "
                f"({alone.images_per_s:.1f}): the model's timing looks cold (too short a "
                "warm-up); try more --warmup and --iters"
            )
    device = str(report.header.get("device", ""))
    if device.startswith("cpu") and any(r.dtype == "float16" for r in report.rows):
        notes.append(
            "note: float16 on the CPU is emulated (no float16 arithmetic there), so it runs "
            "far slower than float32; bfloat16 is the CPU's reduced-precision mode"
        )
    return notes


def table_footer(report: Report) -> Text:
    """What the figures are: the memory columns' sources, and the clock of each mode's
    latencies (images/s: the wall clock over the row)."""
    kinds = ", ".join(sorted({r.memory_kind for r in report.rows}))
    text = Text(f"peak memory: {kinds}", style="dim")
    if on_device(report):
        text.append(
            "\ndev MB: the GPU's used memory at its peak (CUDA context, weights, allocator"
            "\n  cache, nvjpeg, other processes); GPU %: mean utilisation (n/a: no NVML)",
            style="dim",
        )
    clocks: dict[str, list[str]] = {}
    for r in report.rows:
        modes = clocks.setdefault(r.latency_clock, [])
        if r.mode not in modes:
            modes.append(r.mode)
    said = "; ".join(f"{', '.join(modes)}: {clock}" for clock, modes in clocks.items())
    text.append(f"\nlatency clock: {said}; images/s: wall clock", style="dim")
    if report.noisy_rows:
        rule = report.header.get("noise_rule", "p99 far above p50")
        text.append(f"\n{NOISY_MARK} noisy: {rule}", style="yellow")
    return text


def timed_batches(row: Row, header: dict[str, object]) -> int | None:
    """How many batches a row timed: end to end, its images in batches (a last partial one
    included); model only, ``--iters`` (None when the header does not say)."""
    if row.mode == "end-to-end":
        return -(-row.images // row.batch_size) if row.images else 0
    iters = header.get("iters")
    return iters if isinstance(iters, int) else None


ONE_BATCH_RULE = "or a single timed batch (no spread to judge by)"


def mark_single_batches(report: Report) -> list[str]:
    """Rows that timed a single batch marked noisy (one latency says nothing about the
    spread; the report's noise rule says so too), and the notes for them; and a note when
    ``--images`` holds fewer images than a batch: end-to-end rows cycle them, so each row
    still times full batches, of the same few files."""
    notes = []
    images = report.header.get("images")
    sizes = sorted({r.batch_size for r in report.rows if r.mode == "end-to-end"})
    if isinstance(images, int) and images and sizes and images < sizes[-1]:
        over = ", ".join(str(b) for b in sizes if b > images)
        notes.append(
            f"note: --images has {images} images, fewer than batch {over}: the end-to-end "
            "rows reuse them (cycled) to time full batches; a folder of varied photos "
            "measures decoding better"
        )
    single = [r for r in report.rows if timed_batches(r, report.header) in (0, 1)]
    for row in single:
        row.noisy = True
    if single:
        rule = str(report.header.get("noise_rule", ""))
        if ONE_BATCH_RULE not in rule:
            report.header["noise_rule"] = f"{rule}, {ONE_BATCH_RULE}".lstrip(", ")
    if any(r.mode != "end-to-end" for r in single):
        notes.append("note: --iters 1 times one batch a row: those rows are marked noisy")
    return notes


def noise_note(report: Report) -> str | None:
    """The one stderr line for a report with noisy rows (None when there are none); rows
    noisy for timing a single batch have their own note (:func:`mark_single_batches`)."""
    noisy = [r for r in report.noisy_rows if (timed_batches(r, report.header) or 2) > 1]
    if not noisy:
        return None
    worst = max(noisy, key=lambda r: r.spread)
    return (
        f"note: {len(noisy)} of {len(report.rows)} rows look noisy (p99 up to {worst.spread}x "
        "p50): try more --iters and --warmup, or a quieter machine"
    )


class ThroughputBars:
    """Images/s per batch size as horizontal bars, one group per (mode, dtype), all on one
    scale, as wide as the console allows."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def groups(self) -> dict[tuple[str, str], list[Row]]:
        groups: dict[tuple[str, str], list[Row]] = {}
        for row in self.report.rows:
            groups.setdefault((row.mode, row.dtype), []).append(row)
        for rows in groups.values():
            rows.sort(key=lambda r: r.batch_size)
        return groups

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.lines(options.max_width)

    def lines(self, width: int) -> Iterator[Text]:
        rows = self.report.rows
        if not rows:
            return
        top = max(r.images_per_s for r in rows) or 1.0
        label_w = max(len(str(r.batch_size)) for r in rows) + 4  # "  b=" + size
        value_w = max(len(f"{r.images_per_s:.1f}") for r in rows) + 2  # room for " !"
        bar_w = max(width - label_w - value_w - 2, 10)
        yield Text("images/s by batch size (longer is faster)", style="bold")
        for (mode, dtype), group in self.groups().items():
            yield Text(f"{mode}, {dtype}", style="dim")
            for row in group:
                line = Text(f"b={row.batch_size}".rjust(label_w) + " ")
                line.append(bar(row.images_per_s / top, bar_w), style=BAR_STYLES.get(mode, ""))
                line.append(" " + f"{row.images_per_s:.1f}".rjust(value_w - 2))
                if row.noisy:
                    line.append(f" {NOISY_MARK}", style="bold yellow")
                yield line


def bar(fraction: float, width: int) -> str:
    """A bar `fraction` of `width` cells long, in eighths of a cell, padded to `width`."""
    eighths = round(max(0.0, min(fraction, 1.0)) * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full + (_EIGHTHS[part] if part else "")
    if not text and fraction > 0:
        text = _EIGHTHS[1]  # a measured rate never shows as nothing
    return text.ljust(width)


def print_report(report: Report, console: Console, bars: bool) -> None:
    """The table (with its header and footer), then the bar chart when `bars`."""
    console.print(header_text(report))
    console.print(fitted_table(report, console.width))
    console.print(table_footer(report))
    if bars:
        console.print()
        console.print(Group(ThroughputBars(report)))


def save_plot(report: Report, out: BinaryIO, fmt: str) -> None:
    """Throughput against batch size, one line per (mode, dtype), as ``fmt`` (png or svg)
    into ``out`` (the ``-o`` file opened by cli/benchmark.py's protection)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("plotting needs matplotlib: pip install 'convnext-cli[plot]'") from exc
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (mode, dtype), rows in sorted(ThroughputBars(report).groups().items()):
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
    fig.savefig(out, format=fmt)
    plt.close(fig)
