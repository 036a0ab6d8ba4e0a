"""`convnext classify`: top-k labels for images."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from convnext_cli.choices import ClassifyFormat, Scores
from convnext_cli.cli.jobs import Job, run_job
from convnext_cli.cli.options import InputsArg, shared_options
from convnext_cli.limits import MAX_TOP_K, is_int
from convnext_cli.serve.client import use_server


def _top_k(text: str | int) -> int:
    """``-k N`` (N >= 1) or ``-k all`` (every class, as 0)."""
    if isinstance(text, int):
        return text
    if text.strip().lower() == "all":
        return 0
    if not is_int(text):
        raise typer.BadParameter(f"{text!r}: a number from 1 to {MAX_TOP_K}, or all")
    value = int(text)
    if not 1 <= value <= MAX_TOP_K:
        raise typer.BadParameter(f"{value}: a number from 1 to {MAX_TOP_K}, or all")
    return value


TopKOpt = Annotated[
    int,
    typer.Option(
        "--top-k",
        "-k",
        metavar="N|all",
        parser=_top_k,
        help="Labels per image; all: every class (the full distribution).",
    ),
]
ScoresOpt = Annotated[
    Scores,
    typer.Option(
        "--scores",
        case_sensitive=False,
        help="probs: softmax; logits: the classifier's raw outputs; log-probs: log-softmax. "
        "Records other than probs say which (a scores field, a logit/log_prob CSV column).",
    ),
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
    scores: ScoresOpt = "probs",
    fmt: ClassifyFormatOpt = "auto",
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
      $ convnext classify cat.jpg -k all --scores logits -o logits.jsonl
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
