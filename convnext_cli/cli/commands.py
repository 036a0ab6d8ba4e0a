"""The `convnext` command line's Typer application: the commands assembled, each with its
errors mapped to one line and an exit code and its ``-h/--help``
(:func:`convnext_cli.cli.main` runs it; :mod:`convnext_cli.cli.quick` runs the simple
warm calls without it)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from convnext_cli import __version__
from convnext_cli.cli.benchmark import benchmark
from convnext_cli.cli.classify import classify
from convnext_cli.cli.convert import convert
from convnext_cli.cli.embed import embed
from convnext_cli.cli.env import env
from convnext_cli.cli.errors import handle_errors
from convnext_cli.cli.help import HelpCommand, HelpGroup, reflow
from convnext_cli.cli.options import HelpOpt, with_help_option
from convnext_cli.cli.serve import serve

app = typer.Typer(
    name="convnext",
    cls=HelpGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_help_option=False,  # -h/--help is HelpOpt (no <bool> metavar)
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, pwsh)
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
        typer.Option(
            "--version",
            "-V",
            metavar="",
            callback=_version,
            is_eager=True,
            help="Show the version.",
        ),
    ] = False,
    help: HelpOpt = False,
) -> None:
    """Fast, exact ConvNeXt and ConvNeXt V2 image classification and embeddings.

    Models come from the Hugging Face Hub (default facebook/convnext-tiny-224), a local
    Hub-layout folder or a single weights file.  `convnext COMMAND --help` shows each
    command's options and examples.

    Examples:
      $ convnext classify photos/ -k 3
      $ convnext classify photos/ -r -o labels.jsonl
      $ convnext embed photos/ -o features.npy
      $ convnext convert convnext_tiny_1k_224_ema.pth convnext-tiny/
      $ convnext classify photos/ -m convnext-tiny/
      $ convnext benchmark -b 1,8 --images photos/
      $ convnext env
      $ convnext serve --detach
    """


def register(app: typer.Typer, name: str, command: Callable[..., Any]) -> None:
    """Add a command: its errors mapped to one stderr line and an exit code
    (:func:`~convnext_cli.cli.errors.handle_errors`), and ``-h/--help``.  Every command goes
    through here, so none can forget either."""
    help_text = reflow(inspect.getdoc(command))
    app.command(name, cls=HelpCommand, help=help_text, add_help_option=False)(
        with_help_option(handle_errors(command))
    )


register(app, "classify", classify)
register(app, "embed", embed)
register(app, "convert", convert)
register(app, "benchmark", benchmark)
register(app, "env", env)
register(app, "serve", serve)
