"""The `convnext` command line: this module only assembles the commands.

Nothing here imports torch, PIL, safetensors or huggingface_hub: `convnext --help` stays
fast, and each command imports what it needs when it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from convnext_cli.interrupts import install_startup_handlers

if Path(sys.argv[0]).stem == "convnext":
    # the `convnext` script: Ctrl-C while typer, rich and the commands are imported ends
    # with one line and exit 130 (python -m convnext_cli installs this in __main__)
    install_startup_handlers()

from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from convnext_cli import __version__  # noqa: E402
from convnext_cli.cli.benchmark import benchmark  # noqa: E402
from convnext_cli.cli.classify import classify  # noqa: E402
from convnext_cli.cli.convert import convert  # noqa: E402
from convnext_cli.cli.embed import embed  # noqa: E402
from convnext_cli.cli.env import env  # noqa: E402

app = typer.Typer(
    name="convnext",
    help="Fast, exact ConvNeXt and ConvNeXt V2 image classification and embeddings.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"convnext-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Fast, exact ConvNeXt and ConvNeXt V2 image classification and embeddings."""


app.command("classify")(classify)
app.command("embed")(embed)
app.command("convert")(convert)
app.command("benchmark")(benchmark)
app.command("env")(env)


def main() -> None:
    app()
