"""`convnext classify`: top-k labels for images."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from convnext_cli.cli.jobs import Job, run_job
from convnext_cli.cli.options import ClassifyFormat, InputsArg, shared_options
from convnext_cli.limits import MAX_TOP_K

TopKOpt = Annotated[
    int, typer.Option("--top-k", "-k", min=1, max=MAX_TOP_K, metavar="N", help="Labels per image.")
]
ClassifyFormatOpt = Annotated[
    ClassifyFormat,
    typer.Option(
        "--format",
        case_sensitive=False,
        help="auto: the -o extension, else a table on a terminal and JSON lines otherwise. "
        "parquet and html need -o.",
    ),
]


@shared_options
def classify(
    inputs: InputsArg,
    top_k: TopKOpt = 5,
    fmt: ClassifyFormatOpt = ClassifyFormat.auto,
    **shared: Any,
) -> None:
    """Classify images: top-k labels with softmax scores, one record per input, in order.

    Exit code 0 when every input succeeded, 1 when any failed (the others are still
    reported), 2 for usage errors; see the README for the rest.

    Examples:
      $ convnext classify photos/ -k 3
      $ convnext classify photos/ -r -o labels.jsonl
      $ convnext classify cat.jpg -m facebook/convnextv2-tiny-22k-384
      $ convnext classify photos/ --format json > labels.json
      $ find . -name '*.png' -print0 | convnext classify - -0 -o labels.csv
      $ convnext classify shards/*.tar -o labels.parquet --resume
    """
    options = {**shared, "inputs": inputs, "top_k": top_k, "fmt": fmt}
    raise typer.Exit(run_job(Job.from_options("classify", options)))
