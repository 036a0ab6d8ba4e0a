"""`convnext classify`: top-k labels for images."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from convnext_cli.checkpoints import DEFAULT_MODEL
from convnext_cli.cli.batch_run import (
    gather_inputs,
    load_runner,
    refuse_overwriting,
    write_results,
)
from convnext_cli.cli.errors import handle_errors
from convnext_cli.cli.options import (
    BatchOpt,
    CompileOpt,
    DecodeOpt,
    DeviceOpt,
    DtypeOpt,
    InputsArg,
    ModelOpt,
    NullOpt,
    OutputOpt,
    RecursiveOpt,
    WorkersOpt,
)
from convnext_cli.output import choose_format, open_writer, output_targets


@handle_errors
def classify(
    inputs: InputsArg,
    model: ModelOpt = DEFAULT_MODEL,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels per image.")] = 5,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="auto (the -o extension; else a table on a terminal, JSON lines otherwise), "
            "table, json, jsonl or csv.",
        ),
    ] = "auto",
    output: OutputOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    recursive: RecursiveOpt = False,
    null: NullOpt = False,
    workers: WorkersOpt = None,
    compile_model: CompileOpt = False,
    decode: DecodeOpt = "auto",
) -> None:
    """Classify images: top-k labels with softmax scores, one record per input, in order.

    Exit code 0 when every input succeeded, 1 when any failed (the others are still
    reported), 2 for usage errors; see the README for the rest.
    """
    fmt = choose_format("classify", fmt, output, sys.stdout.isatty())
    paths = gather_inputs(inputs, recursive, null_separated=null)
    refuse_overwriting(output_targets(fmt, output), paths, model)
    writer = open_writer("classify", fmt, output, top_k)  # an unwritable -o fails before loading

    def batches():  # type: ignore[no-untyped-def]
        runner = load_runner(model, device, dtype, compile_model, decode=decode)
        return runner.classify(paths, top_k=top_k, batch_size=batch_size, workers=workers)

    raise typer.Exit(write_results(writer, batches, total=len(paths), output=output))
