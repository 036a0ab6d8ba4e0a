"""`convnext embed`: pooled features (transformers' pooler_output) for search and clustering."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from convnext_cli.choices import EmbedFormat
from convnext_cli.cli.jobs import Job, run_job
from convnext_cli.cli.options import InputsArg, embed_options
from convnext_cli.serve.client import use_server

EmbedFormatOpt = Annotated[
    EmbedFormat,
    typer.Option(
        "--format",
        case_sensitive=False,
        help="auto: the -o extension, else a table on a terminal, JSON lines when piped. "
        "npy (-o NAME.npy also writes NAME.paths.txt), safetensors and parquet need -o.",
    ),
]
StageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--stage",
        metavar="NAME",
        help="A stage's output instead of the pooled feature: stem, stage1 .. stageN "
        "(transformers' hidden_states[0..N]); repeat for several.",
    ),
]
PoolOpt = Annotated[
    str,
    typer.Option(
        "--pool",
        metavar="POOL",
        help="With --stage/--backbone: avg (global average, (C,)) or none (the whole "
        "(C, H, W) map; npy, safetensors and parquet only).",
    ),
]
BackboneOpt = Annotated[
    bool,
    typer.Option(
        "--backbone",
        metavar="",
        help="transformers' ConvNextBackbone feature_maps: each stage through its own "
        "LayerNorm (the checkpoint must hold them); without --stage, config.json's "
        "out_features.",
    ),
]
NormalizeOpt = Annotated[
    bool, typer.Option("--normalize", metavar="", help="L2-normalise every embedding.")
]


@embed_options
def embed(
    inputs: InputsArg,
    fmt: EmbedFormatOpt = "auto",
    normalize: NormalizeOpt = False,
    stage: StageOpt = None,
    pool: PoolOpt = "avg",
    backbone: BackboneOpt = False,
    **shared: Any,
) -> None:
    """Embed images: the pooled feature (global average pool + final LayerNorm) per input.

    Works with classifier and headless (feature) checkpoints.  A failed input gets an error
    record (jsonl/json/csv) or, for npy/safetensors, is left out of the matrix and named
    on stderr; the paths written beside the matrix say which row is which.

    Examples:
      $ convnext embed photos/ -o features.npy
      $ convnext embed photos/ --normalize -o features.safetensors
      $ convnext embed imgs/ -m facebook/convnextv2-tiny-22k-224 -o emb.parquet
      $ convnext embed cat.jpg | jq '.embedding | length'
      $ convnext embed photos/ --stage stage2 --stage stage4 -o stages.safetensors
      $ convnext embed photos/ --stage stage3 --pool none -o maps.npy
      $ convnext embed imgs/ -m ./backbone --backbone --pool none -o maps.parquet
    """
    options = {
        **shared,
        "inputs": inputs,
        "fmt": fmt,
        "normalize": normalize,
        "stages": list(stage or []),
        "pool": pool,
        "backbone": backbone,
    }
    job = Job.from_options("embed", options)
    use_server(job, no_server=shared.get("no_server", False))  # a running `convnext serve`
    raise typer.Exit(run_job(job))
