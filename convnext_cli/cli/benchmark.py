"""`convnext benchmark`: throughput and latency, model-only and end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from convnext_cli.checkpoints import DEFAULT_MODEL
from convnext_cli.cli.batch_run import resolve_decode_choice
from convnext_cli.cli.errors import handle_errors, say
from convnext_cli.cli.options import DecodeOpt, DeviceOpt, ModelOpt, WorkersOpt
from convnext_cli.errors import UsageError


@handle_errors
def benchmark(
    model: ModelOpt = DEFAULT_MODEL,
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", "-b", help="Comma-separated batch sizes to sweep.")
    ] = "1,8,32",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="Comma-separated dtypes to sweep: auto, float32, float16, bfloat16.",
        ),
    ] = "auto",
    device: DeviceOpt = "auto",
    channels_last: Annotated[
        bool,
        typer.Option(
            "--channels-last/--no-channels-last",
            help="NHWC memory layout (what classify and embed use).",
        ),
    ] = True,
    compile_model: Annotated[
        bool, typer.Option("--compile", help="Run the model through torch.compile first.")
    ] = False,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            help="Also time end to end (decode + preprocess + model) over this folder's images.",
            show_default=False,
        ),
    ] = None,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed iterations.")] = 3,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Timed iterations.")] = 10,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Also save: a plot of throughput against batch size (.png, .svg; needs "
            "matplotlib) or the JSON report (.json).",
            show_default=False,
        ),
    ] = None,
    workers: WorkersOpt = None,
    decode: DecodeOpt = "auto",
) -> None:
    """Measure images/s and per-batch latency (p50/p90/p99) over batch sizes and dtypes."""
    from convnext_cli import benchmark as bench
    from convnext_cli.checkpoints import build_model, load_checkpoint
    from convnext_cli.device import resolve_device, resolve_dtype
    from convnext_cli.pipeline import Runner

    fmt = fmt.lower()
    if fmt not in ("table", "json"):
        raise UsageError(f"unknown --format {fmt!r} (use table or json)")
    if output is not None and output.suffix.lower() not in (".png", ".svg", ".json"):
        raise UsageError(f"-o {output}: use a .png or .svg (plot) or .json (report) file")
    sizes = bench.parse_int_list(batch_sizes)
    torch_device = resolve_device(device)
    dtypes = []
    for name in (d.strip() for d in dtype.split(",") if d.strip()):
        resolved, reason = resolve_dtype(name, torch_device)
        if reason:
            say(f"note: --dtype auto chose {str(resolved).removeprefix('torch.')}: {reason}")
        if resolved not in dtypes:
            dtypes.append(resolved)
    paths = bench.image_files(str(images)) if images is not None else []
    jpeg_on_device = resolve_decode_choice(decode, torch_device) if paths else False

    checkpoint = load_checkpoint(model)
    extra = {
        "channels_last": channels_last,
        "compile": compile_model,
        "warmup": warmup,
        "iters": iters,
    }
    if paths:
        extra["images"] = len(paths)
        extra["decode"] = "gpu" if jpeg_on_device else "cpu"  # as --decode names them
    report = bench.Report(bench.describe_environment(torch_device, checkpoint, extra))
    edge = checkpoint.preprocess.shortest_edge
    for torch_dtype in dtypes:
        net = build_model(checkpoint, torch_device, torch_dtype, channels_last=channels_last)
        forward = net
        if compile_model:
            import torch

            from convnext_cli.cpu_fusion import unfuse_blocks

            say("note: compiling the model (the first iterations include compile time)")
            unfuse_blocks(net)
            forward = torch.compile(net)
        for size in sizes:
            say(f"timing model-only, {str(torch_dtype).removeprefix('torch.')}, batch {size}")
            report.rows.append(
                bench.time_model(
                    forward, torch_device, torch_dtype, size, edge, channels_last, warmup, iters
                )
            )
        if paths:
            runner = Runner(
                net, checkpoint.preprocess, torch_device, torch_dtype, channels_last, jpeg_on_device
            )
            runner.logits_fn = forward
            for size in sizes:
                say(f"timing end-to-end, {str(torch_dtype).removeprefix('torch.')}, batch {size}")
                report.rows.append(
                    bench.time_end_to_end(
                        lambda p, b, r=runner: r.classify(
                            p, top_k=5, batch_size=b, workers=workers
                        ),
                        paths,
                        torch_device,
                        torch_dtype,
                        size,
                        warmup,
                    )
                )
        del net, forward
    if fmt == "json":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_table(report)
    if output is not None:
        if output.suffix.lower() == ".json":
            output.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        else:
            bench.plot(report, str(output))
        say(f"wrote {output}")


def print_table(report) -> None:
    from rich.console import Console
    from rich.table import Table

    header = report.header
    console = Console(file=sys.stdout, highlight=False)
    console.print(
        f"[bold]{header['model']}[/bold]  {header['architecture']}  "
        f"{header['parameters_m']}M params, {header['image_size']}px\n"
        f"{header['device_name']} ({header['device']})  torch {header['torch']}  "
        f"torchvision {header['torchvision']}  convnext-cli {header['convnext_cli']}  "
        f"channels_last={header['channels_last']} compile={header['compile']}"
    )
    table = Table(show_header=True, header_style="bold")
    for name, justify in (
        ("mode", "left"),
        ("dtype", "left"),
        ("batch", "right"),
        ("images/s", "right"),
        ("p50 ms", "right"),
        ("p90 ms", "right"),
        ("p99 ms", "right"),
        ("peak MB", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in report.rows:
        table.add_row(
            r.mode,
            r.dtype,
            str(r.batch_size),
            f"{r.images_per_s:.1f}",
            f"{r.p50_ms:.1f}",
            f"{r.p90_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.peak_memory_mb:.0f}",
        )
    console.print(table)
    kinds = sorted({r.memory_kind for r in report.rows})
    console.print(f"peak memory: {', '.join(kinds)}", style="dim")
