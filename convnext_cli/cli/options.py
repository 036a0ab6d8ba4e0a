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
