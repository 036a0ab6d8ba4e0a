"""The `convnext` command line: this module only assembles the commands.

Nothing here imports torch, PIL, safetensors or huggingface_hub: `convnext --help` stays
fast, and each command imports what it needs when it runs.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from convnext_cli import startup
from convnext_cli.engine import _interrupts as interrupts
from convnext_cli.engine._interrupts import install_startup_handlers

if Path(sys.argv[0]).stem == "convnext":
    # the `convnext` script: Ctrl-C while typer, rich and the commands are imported ends
    # with one line and exit 130 (convnext_cli/__init__.py installed the same handler at
    # its first line; python -m convnext_cli installs this in __main__); closed standard
    # streams and a malformed COLUMNS are set straight before typer and rich are imported
    install_startup_handlers()
    startup.prepare()

from collections.abc import Callable  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402

from convnext_cli import __version__  # noqa: E402
from convnext_cli.cli.benchmark import benchmark  # noqa: E402
from convnext_cli.cli.classify import classify  # noqa: E402
from convnext_cli.cli.convert import convert  # noqa: E402
from convnext_cli.cli.embed import embed  # noqa: E402
from convnext_cli.cli.env import env  # noqa: E402
from convnext_cli.cli.errors import debug_enabled, handle_errors, say  # noqa: E402
from convnext_cli.cli.help import HelpCommand, HelpGroup, reflow  # noqa: E402
from convnext_cli.cli.options import HelpOpt, with_help_option  # noqa: E402
from convnext_cli.cli.serve import serve  # noqa: E402
from convnext_cli.errors import ConvNextError, one_line  # noqa: E402

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


def main() -> None:
    """The `convnext` script: run the command, then leave without the interpreter's teardown
    (``interrupts.leave``: stdout and stderr flushed, every output already in place)."""
    startup.prepare()  # again for callers of main(): cheap, and a no-op the second time
    try:
        app()
        code: int | str | None = 0
    except SystemExit as done:  # how typer ends every command
        code = done.code if isinstance(done.code, (int, str)) or done.code is None else 1
    except ConvNextError as exc:  # outside a command: --help or --version into a closed stdout
        if debug_enabled():  # CONVNEXT_DEBUG=1: the traceback, as inside a command
            raise
        say(f"error: {one_line(exc)}")
        code = exc.exit_code
    interrupts.leave(code)
