"""`convnext classify`: top-k labels for images."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from convnext_cli.choices import ClassifyFormat, Scores
from convnext_cli.cli.jobs import Job, run_job
from convnext_cli.cli.options import InputsArg, shared_options
from convnext_cli.errors import UsageError
from convnext_cli.limits import parse_top_k
from convnext_cli.serve.client import use_server


def _top_k(text: str | int) -> int:
    """``-k N`` (N >= 1) or ``-k all`` (every class, as 0): limits.parse_top_k, the check
    the Python API's ``top_k`` goes through too."""
    try:
        return parse_top_k(text)
    except UsageError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--top-k: ")) from None


TopKOpt = Annotated[
    int,
    typer.Option(
        "--top-k",
        "-k",
        metavar="N",
        parser=_top_k,
        help="Labels per image, or all.",
    ),
]
ScoresOpt = Annotated[
    Scores,
    typer.Option(
        "--scores",
        case_sensitive=False,
        help="probs (softmax), logits or log-probs; records say which.",
    ),
]
ClassifyFormatOpt = Annotated[
    ClassifyFormat,
    typer.Option(
        "--format",
        case_sensitive=False,
        help="auto: the -o extension, else a table on a terminal, JSON lines when piped. "
        "parquet and html need -o.",
    ),
]


@shared_options
def classify(
    inputs: InputsArg,
    top_k: TopKOpt = 5,
    scores: ScoresOpt = "probs",
    fmt: ClassifyFormatOpt = "auto",
    **shared: Any,
) -> None:
    """Classify images: top-k labels with softmax scores, one record per input, in order.

    Exit code 0: every input succeeded; 1: some failed (each has an error record); 2: usage
    error, or no input found.

    Examples:
      $ convnext classify photos/ -k 3
      $ convnext classify photos/ -r -o labels.jsonl
      $ convnext classify cat.jpg -m facebook/convnextv2-tiny-22k-384
      $ find . -name '*.png' -print0 | convnext classify - -0 -o labels.csv
      $ convnext classify shards/*.tar -o labels.parquet --resume
    """
    options = {
        **shared,
        "inputs": inputs,
        "top_k": top_k,
        "fmt": fmt,
        "scores": scores,
    }
    job = Job.from_options("classify", options)
    use_server(job, no_server=shared.get("no_server", False))  # a running `convnext serve`
    raise typer.Exit(run_job(job))
