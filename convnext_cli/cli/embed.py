"""`convnext embed`: pooled features (transformers' pooler_output) for search and clustering."""

from __future__ import annotations

from typing import Annotated

import typer

from convnext_cli.choices import DEFAULT_MODEL
from convnext_cli.cli.batch_run import Job, run_job
from convnext_cli.cli.errors import handle_errors
from convnext_cli.cli.options import (
    BatchOpt,
    CompileOpt,
    DecodeOpt,
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    ForceResumeOpt,
    IdColumnOpt,
    ImageColumnOpt,
    InputsArg,
    ModelOpt,
    NullOpt,
    OutputOpt,
    RayAddressOpt,
    RecursiveOpt,
    ReplicasOpt,
    ResumeOpt,
    RetryErrorsOpt,
    ShardOpt,
    VerboseOpt,
    WorkersOpt,
)


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
    shard: ShardOpt = None,
    resume: ResumeOpt = False,
    retry_errors: RetryErrorsOpt = False,
    force_resume: ForceResumeOpt = False,
    image_column: ImageColumnOpt = None,
    id_column: IdColumnOpt = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    replicas: ReplicasOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Embed images: the pooled feature (global average pool + final LayerNorm) per input.

    Works with classifier and headless (feature) checkpoints.  A failed input gets an error
    record (jsonl/json/csv) or, for npy/safetensors, is left out of the matrix and named
    on stderr; the paths written beside the matrix say which row is which.
    """
    raise typer.Exit(run_job(Job.from_options("embed", locals())))
