"""`convnext classify`: top-k labels for images."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from convnext_cli.checkpoints import DEFAULT_MODEL
from convnext_cli.cli.batch_run import gather_inputs, load_runner, open_output, stream_results
from convnext_cli.cli.errors import handle_errors
from convnext_cli.cli.options import (
    BatchOpt,
    CompileOpt,
    DecodeOpt,
    DeviceOpt,
    DtypeOpt,
    InputsArg,
    ModelOpt,
    OutputOpt,
    RecursiveOpt,
    WorkersOpt,
)
from convnext_cli.errors import UsageError
from convnext_cli.output import CLASSIFY_FORMATS, classify_writer


@handle_errors
def classify(
    inputs: InputsArg,
    model: ModelOpt = DEFAULT_MODEL,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels per image.")] = 5,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="auto (a table on a terminal, JSON lines when piped), table, json, jsonl or csv.",
        ),
    ] = "auto",
    output: OutputOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    recursive: RecursiveOpt = False,
    workers: WorkersOpt = None,
    compile_model: CompileOpt = False,
    decode: DecodeOpt = "auto",
) -> None:
    """Classify images: top-k labels with softmax scores, one record per input, in order.

    Exit code 0 when every input succeeded, 1 when any failed (the others are still
    reported), 2 for usage errors.
    """
    fmt = fmt.lower()
    if fmt not in CLASSIFY_FORMATS:
        raise UsageError(f"unknown --format {fmt!r} (use {', '.join(CLASSIFY_FORMATS)})")
    if fmt == "auto":
        fmt = "table" if output is None and sys.stdout.isatty() else "jsonl"
    paths = gather_inputs(inputs, recursive)
    with open_output(output) as stream:
        writer = classify_writer(fmt, stream, top_k)
        runner = load_runner(model, device, dtype, compile_model, decode=decode)
        batches = runner.classify(paths, top_k=top_k, batch_size=batch_size, workers=workers)
        code = stream_results(batches, writer, total=len(paths))
    raise typer.Exit(code)
