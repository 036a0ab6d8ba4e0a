"""The project's own exception types and the exit codes they map to.

Errors a user can cause (a bad flag value, an unknown model, an unreadable
checkpoint, an image that cannot be decoded) are raised as one of these types
with a plain, one-line message.  The CLI maps them to an exit code and prints
the message on stderr; a traceback is shown only with ``CONVNEXT_DEBUG=1``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INPUT_FAILED = 1
EXIT_USAGE = 2
EXIT_SOFTWARE = 70  # an internal error (a bug): EX_SOFTWARE from sysexits.h
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM)
EXIT_PIPE_CLOSED = 141  # the reader of stdout went away (`| head`), as a shell reports SIGPIPE


class ConvNextError(Exception):
    """Base class for errors with a user-facing message."""

    exit_code: int = EXIT_USAGE


class UsageError(ConvNextError):
    """A bad flag value or combination of flags."""


class NoInputsError(UsageError):
    """The inputs named on the command line matched no file."""


class CheckpointError(ConvNextError):
    """A model that cannot be found, read, or matched to a ConvNeXt layout."""


class DeviceError(UsageError):
    """A device or dtype this machine cannot provide."""


class OutputError(UsageError):
    """The output cannot be written (no such folder, no space left, a device that refuses)."""


class OutputClosed(Exception):
    """The reader of stdout went away (``| head``): the run stops quietly (exit 141)."""


class ImageError(ConvNextError):
    """One input image could not be read; reported per input, never fatal."""

    exit_code = EXIT_INPUT_FAILED


class DeviceFailure(ConvNextError):
    """The device failed in a way no later batch survives (a CUDA error other than out of
    memory, such as an illegal memory access, which poisons the CUDA context): the run stops
    at once, its finished records kept as for Ctrl-C."""

    exit_code = EXIT_SOFTWARE


def one_line(message: object) -> str:
    """Collapse a message to a single line, for error records and stderr."""
    text = " ".join(str(message).split())
    return text or type(message).__name__
