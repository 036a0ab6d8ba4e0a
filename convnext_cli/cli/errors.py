"""Mapping exceptions to one stderr line and an exit code; tracebacks only with CONVNEXT_DEBUG=1.

Exit codes (one table, :mod:`convnext_cli.errors`): 0 every input succeeded, 1 at least one
input failed, 2 usage error (bad flag, model, checkpoint, no inputs, output that cannot be
written), 70 internal error (a bug: EX_SOFTWARE), 130 Ctrl-C, 143 SIGTERM, 141 the reader of
stdout went away (``| head``; quiet, as a shell reports SIGPIPE).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

from convnext_cli.engine import _interrupts as interrupts
from convnext_cli.errors import (
    EXIT_PIPE_CLOSED,
    EXIT_SOFTWARE,
    ConvNextError,
    OutputClosed,
    one_line,
)
from convnext_cli.outputs.files import silence_stdout
from convnext_cli.outputs.names import say

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get("CONVNEXT_DEBUG", "") not in ("", "0")


def exit_code_for(exc: BaseException) -> int | None:
    """What a command that raised ``exc`` exits with, its one line said on stderr; None:
    ``exc`` goes on (not the project's to answer, or CONVNEXT_DEBUG=1: the traceback)."""
    if isinstance(exc, ConvNextError):
        if debug_enabled():
            return None
        say(f"error: {one_line(exc)}")
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (interrupts.Terminated)
        say(interrupts.message_for(exc))
        return interrupts.code_for(exc)
    if isinstance(exc, (OutputClosed, BrokenPipeError)):
        # the reader went away (`| head`): stop quietly, without a second error on close
        silence_stdout()
        return EXIT_PIPE_CLOSED
    if not isinstance(exc, Exception) or debug_enabled():
        return None
    message = one_line(exc)
    if len(message) > 300:
        message = message[:300] + " ..."
    say(
        f"error: internal error: {type(exc).__name__}: {message} "
        "(set CONVNEXT_DEBUG=1 for the traceback)"
    )
    return EXIT_SOFTWARE


def handle_errors(command: F) -> F:
    """Run a command; turn the project's errors into one line on stderr and an exit code
    (:func:`exit_code_for`)."""
    import typer  # here, not above: the warm calls of cli/quick.py run without Typer

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with interrupts.running():
                return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BaseException as exc:
            code = exit_code_for(exc)
            if code is None:
                raise
            raise typer.Exit(code) from None

    wrapper.handles_errors = True  # type: ignore[attr-defined]  # wrappers around it copy it
    return wrapper  # type: ignore[return-value]
