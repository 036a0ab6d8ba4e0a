"""The `convnext` command line: :func:`main`, and the Typer application of
:mod:`convnext_cli.cli.commands` (``app``, ``register``), imported when first asked for.

A simple warm call (classify or embed of file paths with ``convnext serve`` running) is run
by :mod:`convnext_cli.cli.quick` without importing Typer, rich or pydantic at all; anything
else goes to the Typer application.  Nothing here imports torch, PIL, safetensors or
huggingface_hub: `convnext --help` stays fast, and each command imports what it needs when
it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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


def main() -> None:
    """The `convnext` script: run the command, then leave without the interpreter's teardown
    (``interrupts.leave``: stdout and stderr flushed, every output already in place)."""
    startup.prepare()  # again for callers of main(): cheap, and a no-op the second time
    from convnext_cli.cli import quick

    quick_code = quick.run(sys.argv[1:])  # a simple warm call: no Typer, rich or pydantic
    if quick_code is not None:
        interrupts.leave(quick_code)
    from convnext_cli.cli.commands import app
    from convnext_cli.cli.errors import debug_enabled
    from convnext_cli.errors import ConvNextError, one_line
    from convnext_cli.outputs.names import say

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


def __getattr__(name: str) -> Any:
    """``app`` and ``register`` (:mod:`convnext_cli.cli.commands`), imported on first use."""
    if name in ("app", "register"):
        from convnext_cli.cli import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'convnext_cli.cli' has no attribute {name!r}")
