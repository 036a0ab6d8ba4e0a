"""`convnext benchmark`: options in, a report out as a table (with a bar chart on a terminal),
JSON, or a saved plot.  The measuring loop is
:class:`convnext_cli.engine.benchmark.BenchmarkRunner`."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from convnext_cli.choices import COMPILE_MODES, DTYPES, ReportFormat
from convnext_cli.cli.errors import say
from convnext_cli.cli.options import model_options
from convnext_cli.cli.progress import configure, note
from convnext_cli.errors import OutputError, UsageError
from convnext_cli.limits import (
    MAX_BATCH_SIZE,
    MAX_BATCH_SIZES,
    MAX_ITERS,
    MAX_WARMUP,
    check_environment,
    is_int,
)
from convnext_cli.startup import STDOUT_CLOSED_MESSAGE, stdout_closed

if TYPE_CHECKING:
    from convnext_cli.engine.benchmark import Report, SweepOptions
    from convnext_cli.engine.loading import ModelSource, RunOptions
    from convnext_cli.outputs.files import OutputFile

OUTPUT_SUFFIXES = (".png", ".svg", ".json")


# this command's own options (the shared ones come from cli/options.py)
BatchSizesOpt = Annotated[
    str,
    typer.Option(
        "--batch-sizes",
        "-b",
        metavar="N,N,...",
        help="Comma-separated batch sizes to sweep (default: 1,8,32; on CUDA 1,32,256, as "
        "timm's benchmark).",
        show_default=False,
    ),
]
DtypesOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        metavar="DTYPE,...",
        help=f"Comma-separated dtypes to sweep, each one of: {', '.join(DTYPES)}.",
    ),
]
ChannelsLastOpt = Annotated[
    bool,
    typer.Option(
        "--channels-last/--no-channels-last",
        metavar="",
        help="NHWC memory layout, as classify and embed run; --no-channels-last: NCHW.",
    ),
]
CompileFirstOpt = Annotated[
    bool,
    typer.Option("--compile", metavar="", help="Run the model through torch.compile first."),
]
CompileModeOpt = Annotated[
    str | None,
    typer.Option(
        "--compile-mode",
        metavar="MODE",
        help="torch.compile mode, implies --compile: default, reduce-overhead (CUDA graphs, "
        "CUDA only), max-autotune or max-autotune-no-cudagraphs.",
        show_default=False,
    ),
]
ImagesOpt = Annotated[
    Path | None,
    typer.Option(
        "--images",
        metavar="DIR",
        help="Also time end to end (decode + preprocess + model) over this folder's images.",
        show_default=False,
    ),
]


def count_option(name: str, low: int, high: int, help: str) -> Any:
    """An iteration count in low..high, the range said in the help text (``what (low to
    high). more``) rather than as Typer's ``[low<=x<=high]`` metavar, which widens the table
    past 80 columns."""

    def check(value: int) -> int:
        if not low <= value <= high:
            raise typer.BadParameter(f"{value} is not in the range {low} to {high}")
        return value

    what, _, more = help.partition(". ")
    said = f"{what} ({low} to {high})." + (f" {more}" if more else "")
    return typer.Option(name, callback=check, metavar="N", help=said)


WarmupOpt = Annotated[int, count_option("--warmup", 0, MAX_WARMUP, "Untimed iterations")]
ItersOpt = Annotated[
    int,
    count_option(
        "--iters",
        1,
        MAX_ITERS,
        "Timed iterations. A row whose p99 latency is over 1.5x its p50 (with 5 or more "
        "timed batches) is flagged noisy.",
    ),
]
ReportFormatOpt = Annotated[
    ReportFormat,
    typer.Option(
        "--format",
        case_sensitive=False,
        help="table (with a bar chart of images/s on a terminal when no -o) or json.",
    ),
]
BenchQuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        metavar="",
        help="No notes and no progress lines on stderr (the report still prints; errors too).",
    ),
]
SaveOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        metavar="FILE",
        help="Also save: a plot of throughput against batch size (.png, .svg; needs "
        "matplotlib) or the JSON report (.json).",
        show_default=False,
    ),
]


@model_options
def benchmark(
    batch_sizes: BatchSizesOpt = "",
    dtype: DtypesOpt = "auto",
    channels_last: ChannelsLastOpt = True,
    compile_model: CompileFirstOpt = False,
    compile_mode: CompileModeOpt = None,
    images: ImagesOpt = None,
    warmup: WarmupOpt = 3,
    iters: ItersOpt = 10,
    fmt: ReportFormatOpt = "table",
    output: SaveOpt = None,
    quiet: BenchQuietOpt = False,
    **model: Any,
) -> None:
    """Measure images/s and per-batch latency (p50/p90/p99) over batch sizes and dtypes.

    The model alone runs on random input of its own resolution; --images adds end-to-end
    rows (decode + preprocess + model) over a folder of images.

    Examples:
      $ convnext benchmark -b 1,8,32 --dtype float32,bfloat16
      $ convnext benchmark --device cuda --dtype float16 -o throughput.png
      $ convnext benchmark -m facebook/convnextv2-tiny-22k-224 --images photos/
      $ convnext benchmark --compile --format json > bench.json
    """
    configure(quiet=quiet, bar=False)
    check_environment()
    if stdout_closed():  # the report always goes to stdout
        raise OutputError(STDOUT_CLOSED_MESSAGE)
    if output is not None and output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"-o {output}: use a .png or .svg (plot) or .json (report) file")
    device, workers, decode = model.pop("device"), model.pop("workers"), model.pop("decode")
    if not batch_sizes:
        from convnext_cli.engine.device import resolve_device

        batch_sizes = "1,32,256" if resolve_device(device).type == "cuda" else "1,8,32"
    compile_model = compile_model or compile_mode_given(compile_mode)
    sizes, dtypes = tuple(parse_batch_sizes(batch_sizes)), parse_dtypes(dtype)
    paths = benchmark_images(images) if images is not None else []

    from convnext_cli.engine.benchmark import SweepOptions
    from convnext_cli.engine.loading import ModelSource, RunOptions

    run = RunOptions(
        device=device,
        decode=decode if paths else "cpu",
        compile=compile_model,
        channels_last=channels_last,
        compile_mode=compile_mode or "default",
    )
    options = SweepOptions(sizes, warmup, iters, tuple(paths), workers)
    with saving(output, paths, model["model"]) as saved:  # refused or opened before the run
        show(measure(ModelSource(**model), run, dtypes, options), fmt, saved)
    if output is not None:
        note(f"wrote {output}")


def compile_mode_given(compile_mode: str | None) -> bool:
    """--compile-mode: checked; given, it turns --compile on."""
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise UsageError(
            f"--compile-mode: unknown mode {compile_mode!r} "
            f"(choose from {', '.join(COMPILE_MODES)})"
        )
    return compile_mode is not None


def measure(
    source: ModelSource, run: RunOptions, dtypes: list[str], options: SweepOptions
) -> Report:
    """The sweep, its progress and its notes on stderr (noise, speed hints)."""
    from convnext_cli.engine.benchmark import runners_for, sweep
    from convnext_cli.outputs.benchmark_report import (
        mark_single_batches,
        noise_note,
        speed_notes,
    )

    runners = runners_for(source, run, dtypes, on_note=lambda text: note(f"note: {text}"))
    report = sweep(runners, options, model_name=source.model, on_step=note)
    for said in mark_single_batches(report):  # before the table and the JSON are made
        note(said)
    noise = noise_note(report)
    if noise:
        note(noise)
    for said in speed_notes(report):
        (say if said.startswith("warning:") else note)(said)
    return report


def parse_batch_sizes(text: str) -> list[int]:
    """-b's comma list: each a whole number in 1..MAX_BATCH_SIZE, at most MAX_BATCH_SIZES."""
    parts = [v for v in text.split(",") if v.strip()]
    if not parts:
        raise UsageError(f"-b: expected comma-separated integers, got {text!r}")
    if len(parts) > MAX_BATCH_SIZES:
        raise UsageError(f"-b: at most {MAX_BATCH_SIZES} batch sizes, got {len(parts)}")
    if not all(is_int(v) for v in parts):
        raise UsageError(f"-b: expected comma-separated integers, got {text!r}")
    values = [int(v) for v in parts]
    if any(not 1 <= v <= MAX_BATCH_SIZE for v in values):
        raise UsageError(
            f"-b: batch sizes must be positive integers up to {MAX_BATCH_SIZE}, got {text!r}"
        )
    return list(dict.fromkeys(values))


def parse_dtypes(text: str) -> list[str]:
    """--dtype's comma list, each value checked against DTYPES (a one-line usage error)."""
    names = [d.strip().lower() for d in text.split(",") if d.strip()]
    if not names:
        raise UsageError(f"--dtype: no dtype given (choose from {', '.join(DTYPES)})")
    for name in names:
        if name not in DTYPES:
            raise UsageError(f"--dtype: unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return list(dict.fromkeys(names))


def benchmark_images(folder: Path) -> list[str]:
    from convnext_cli.inputs.expand import folder_images

    if not folder.is_dir():
        raise UsageError(f"--images {folder}: not a folder")
    found = folder_images(folder, recursive=True)
    if not found:
        raise UsageError(f"--images {folder}: no images found")
    return found


@contextlib.contextmanager
def saving(output: Path | None, images: list[str], model: str) -> Iterator[OutputFile | None]:
    """``-o``'s file, with the protection every output has (outputs/files.py): refused over
    an ``--images`` photo or a checkpoint file, opened beside the target before the run (a
    missing or read-only folder is one line, exit 2, before anything is measured) and moved
    into place when the block ends; dropped on an error or a signal."""
    from convnext_cli.outputs.files import refuse_overwriting, replacing

    if output is None:
        yield None
        return
    refuse_overwriting([output], images, model)
    with replacing(output) as saved:
        yield saved


def show(report: Report, fmt: str, saved: OutputFile | None) -> None:
    """JSON or the table on stdout (bars too on a terminal without -o); then -o's file."""
    from rich.console import Console

    from convnext_cli.outputs.benchmark_report import print_report, save_plot

    if fmt == "json":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        bars = saved is None and sys.stdout.isatty()
        print_report(report, Console(file=sys.stdout, highlight=False), bars=bars)
    if saved is not None:
        suffix = Path(str(saved.display)).suffix.lower()
        if suffix == ".json":
            saved.write((json.dumps(report.to_dict(), indent=2) + "\n").encode())
        else:
            save_plot(report, saved.file, suffix.lstrip("."))
