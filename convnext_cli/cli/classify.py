"""`convnext classify`: top-k labels for images."""

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
    """Classify images: top-k labels with softmax scores, one record per input, in order.

    Exit code 0 when every input succeeded, 1 when any failed (the others are still
    reported), 2 for usage errors; see the README for the rest.
    """
    raise typer.Exit(run_job(Job.from_options("classify", locals())))
