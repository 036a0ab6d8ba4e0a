"""Mapping exceptions to one stderr line and an exit code; tracebacks only with CONVNEXT_DEBUG=1."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from convnext_cli.errors import EXIT_INPUT_FAILED, EXIT_INTERRUPTED, ConvNextError, one_line

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get("CONVNEXT_DEBUG", "") not in ("", "0")


def say(message: str) -> None:
    """One line on stderr."""
    print(message, file=sys.stderr, flush=True)


def handle_errors(command: F) -> F:
    """Run a command; turn the project's errors into one line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except ConvNextError as exc:
            if debug_enabled():
                raise
            say(f"error: {one_line(exc)}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            say("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # the reader went away (`| head`): stop quietly, without a second error on close
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(EXIT_INPUT_FAILED) from None
        except Exception as exc:
            if debug_enabled():
                raise
            message = one_line(exc)
            if len(message) > 300:
                message = message[:300] + " ..."
            say(
                f"error: internal error: {type(exc).__name__}: {message} "
                "(set CONVNEXT_DEBUG=1 for the traceback)"
            )
            raise typer.Exit(EXIT_INPUT_FAILED) from None

    return wrapper  # type: ignore[return-value]
