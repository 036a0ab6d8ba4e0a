"""`convnext embed`: pooled features (transformers' pooler_output) for search and clustering."""

from __future__ import annotations

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
from convnext_cli.output import BINARY_FORMATS, EMBED_FORMATS, MatrixWriter, embed_writer


@handle_errors
def embed(
    inputs: InputsArg,
    model: ModelOpt = DEFAULT_MODEL,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="jsonl, json or csv (stdout or -o); npy (+ FILE.paths.txt) or safetensors "
            "(paths in its metadata) need -o.",
        ),
    ] = "jsonl",
    output: OutputOpt = None,
    normalize: Annotated[
        bool, typer.Option("--normalize", help="L2-normalise every embedding.")
    ] = False,
    batch_size: BatchOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    recursive: RecursiveOpt = False,
    workers: WorkersOpt = None,
    compile_model: CompileOpt = False,
    decode: DecodeOpt = "auto",
) -> None:
    """Embed images: the pooled feature (global average pool + final LayerNorm) per input.

    Works with classifier and headless (feature) checkpoints.  A failed input gets an error
    record (jsonl/json/csv) or, for npy/safetensors, is left out of the matrix and named
    on stderr; the paths written beside the matrix say which row is which.
    """
    fmt = fmt.lower()
    if fmt not in EMBED_FORMATS:
        raise UsageError(f"unknown --format {fmt!r} (use {', '.join(EMBED_FORMATS)})")
    if fmt in BINARY_FORMATS and output is None:
        raise UsageError(f"--format {fmt} writes a binary file: name it with -o FILE")
    paths = gather_inputs(inputs, recursive)
    if fmt in BINARY_FORMATS:
        matrix = MatrixWriter(output, fmt)  # fails on an unwritable -o before loading
        try:
            runner = load_runner(model, device, dtype, compile_model, decode=decode)
            batches = runner.embed(
                paths, normalize=normalize, batch_size=batch_size, workers=workers
            )
            code = stream_results(batches, matrix, total=len(paths), report_errors=True)
        except BaseException:
            matrix.abort()
            raise
    else:
        with open_output(output) as stream:
            writer = embed_writer(fmt, stream)
            runner = load_runner(model, device, dtype, compile_model, decode=decode)
            batches = runner.embed(
                paths, normalize=normalize, batch_size=batch_size, workers=workers
            )
            code = stream_results(batches, writer, total=len(paths))
    raise typer.Exit(code)
