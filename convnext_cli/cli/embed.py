"""`convnext embed`: pooled features (transformers' pooler_output) for search and clustering."""

from __future__ import annotations

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
def embed(
    inputs: InputsArg,
    model: ModelOpt = DEFAULT_MODEL,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="auto (the -o extension, else jsonl), jsonl, json or csv (stdout or -o); "
            "npy (+ FILE.paths.txt) or safetensors (paths in its metadata) need -o.",
        ),
    ] = "auto",
    output: OutputOpt = None,
    normalize: Annotated[
        bool, typer.Option("--normalize", help="L2-normalise every embedding.")
    ] = False,
    batch_size: BatchOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    recursive: RecursiveOpt = False,
    null: NullOpt = False,
    workers: WorkersOpt = None,
    compile_model: CompileOpt = False,
    decode: DecodeOpt = "auto",
) -> None:
    """Embed images: the pooled feature (global average pool + final LayerNorm) per input.

    Works with classifier and headless (feature) checkpoints.  A failed input gets an error
    record (jsonl/json/csv) or, for npy/safetensors, is left out of the matrix and named
    on stderr; the paths written beside the matrix say which row is which.
    """
    fmt = choose_format("embed", fmt, output, stdout_is_terminal=False)
    paths = gather_inputs(inputs, recursive, null_separated=null)
    refuse_overwriting(output_targets(fmt, output), paths, model)
    writer = open_writer("embed", fmt, output)  # an unwritable -o fails before loading

    def batches():  # type: ignore[no-untyped-def]
        runner = load_runner(model, device, dtype, compile_model, decode=decode)
        return runner.embed(paths, normalize=normalize, batch_size=batch_size, workers=workers)

    raise typer.Exit(write_results(writer, batches, total=len(paths), output=output))
