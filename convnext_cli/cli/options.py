"""Option and argument aliases shared by the commands (one definition, one help text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

InputsArg = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders, globs, or '-' to read paths from stdin (one a line; "
        "NUL-separated with -0).",
        show_default=False,
    ),
]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Hub id (optionally id@revision), Hub-layout folder, or a single weights file "
        "(transformers, facebookresearch, timm or torchvision layout).",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto, float32, float16 or bfloat16. auto is float32, except bfloat16 on CPUs "
        "with AMX units (said on stderr).",
    ),
]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        "-b",
        min=1,
        help="Images per batch. Default: 8 on the CPU (activations stay in cache), 32 on a GPU.",
        show_default=False,
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=0,
        help="Decoding worker processes (0: decode in the main process). Default: none for "
        "a single batch; on a GPU the cores but one, on the CPU one per four cores (max 8).",
        show_default=False,
    ),
]
RecursiveOpt = Annotated[
    bool, typer.Option("--recursive", "-r", help="Descend into sub-folders of folder inputs.")
]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Write results to FILE instead of stdout ('-': stdout); its extension (.jsonl, "
        ".json, .csv, .npy, .safetensors) picks the format unless --format says. Written "
        "beside FILE and moved into place; never over an input or a checkpoint.",
        show_default=False,
    ),
]
NullOpt = Annotated[
    bool,
    typer.Option("--null", "-0", help="Paths on stdin ('-') are NUL-separated (find -print0)."),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="Run the model through torch.compile (slow first batch; pays off on long runs).",
    ),
]
DecodeOpt = Annotated[
    str,
    typer.Option(
        "--decode",
        help="Where JPEGs are decoded: auto (on the GPU when the model runs on CUDA), cpu "
        "(Pillow, bit-exact with transformers) or gpu (nvjpeg through torchvision).",
    ),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        metavar="I/N",
        help="Take only shard I of N (0 <= I < N): every N-th input by listing order, starting "
        "at the I-th; N runs with I = 0..N-1 cover every input exactly once.",
        show_default=False,
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue an interrupted run into the same -o FILE (jsonl, csv, parquet): inputs "
        "already recorded there are skipped, new records are added.",
    ),
]
RetryErrorsOpt = Annotated[
    bool,
    typer.Option("--retry-errors", help="With --resume: do inputs that got an error again."),
]
ForceResumeOpt = Annotated[
    bool,
    typer.Option(
        "--force-resume",
        help="With --resume: add to FILE even if another model, top-k or preprocessing wrote it.",
    ),
]
ImageColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--image-column",
        metavar="NAME",
        help="Parquet inputs: the column of encoded image bytes (default: the first of image, "
        "jpg, png, img, bytes, image_bytes).",
        show_default=False,
    ),
]
IdColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--id-column",
        metavar="NAME",
        help="Parquet inputs: the column whose value is the record's path (default: id, key, "
        "__key__, path or file_name if present, else FILE#ROW).",
        show_default=False,
    ),
]
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        help="local (this process and its decode workers) or ray (Ray Data: a local Ray, or "
        "a cluster with --ray-address / RAY_ADDRESS; needs the ray extra).",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        metavar="ADDR",
        help="--engine ray: the cluster to join (default: RAY_ADDRESS, else a local Ray).",
        show_default=False,
    ),
]
ReplicasOpt = Annotated[
    int | None,
    typer.Option(
        "--replicas",
        min=1,
        metavar="N",
        help="--engine ray: model replicas (default: one per GPU; CPU actors without GPUs).",
        show_default=False,
    ),
]
VerboseOpt = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="--engine ray: show Ray's own logs and progress."),
]
