"""What the command line sets straight before Typer and rich read anything.

- **Standard streams.** A stream closed by the caller (``convnext classify x.jpg >&-``)
  leaves Python with ``sys.stdout = None`` and its descriptor free, so the next file the
  tool opens would become fd 1 (and a decoding worker's stray output would land in it).
  :func:`guard_standard_streams` puts ``/dev/null`` on each closed descriptor 0-2; stdin then
  reads as empty and stderr discards, while stdout becomes :class:`ClosedStdout`: writing
  to it is :class:`~convnext_cli.errors.OutputError` ("stdout is closed", exit 2), which a
  run checks for before it starts (``-o FILE`` works as usual).  A reader of stdout that
  goes away mid-run (``| head``) is still the quiet exit 141.
- **Terminal size.** rich and Typer read ``COLUMNS`` and ``LINES`` with a bare ``int()``: a
  value such as ``²`` raises, ``1000000000`` pads every help line to a gigabyte.
  :func:`sane_terminal_size` replaces a malformed value, or one outside 1..10000, with 80
  columns / 25 lines (rich's own fallbacks when there is no terminal).

Nothing here imports anything beyond the standard library.
"""

from __future__ import annotations

import io
import os
import re
import sys
from typing import Any, NoReturn

from convnext_cli.errors import OutputError

FALLBACK = {"COLUMNS": 80, "LINES": 25}
MAX_TERMINAL = 10_000  # columns or lines; more is no real terminal
_NUMBER = re.compile(r"[0-9]{1,5}")  # ASCII digits only: int() also reads '²'-like digits

STDOUT_CLOSED_MESSAGE = "stdout is closed: nothing can be written there (use -o FILE)"


def sane_terminal_size(environ: Any = None) -> None:
    """COLUMNS / LINES that are not a whole number in 1..10000 become 80 / 25."""
    environ = os.environ if environ is None else environ
    for name, fallback in FALLBACK.items():
        raw = environ.get(name)
        if raw is None:
            continue
        text = raw.strip()
        if not (_NUMBER.fullmatch(text) and 1 <= int(text) <= MAX_TERMINAL):
            environ[name] = str(fallback)


class ClosedStdout(io.TextIOBase):
    """``sys.stdout`` when the caller closed it: any write is one OutputError (exit 2)."""

    def __init__(self, binary: bool = False) -> None:
        super().__init__()
        self._binary = binary

    @property
    def buffer(self) -> ClosedStdout:
        return ClosedStdout(binary=True)

    def _closed(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise OutputError(STDOUT_CLOSED_MESSAGE)

    write = _closed
    writelines = _closed
    fileno = _closed

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def flush(self) -> None:
        pass


def stdout_closed() -> bool:
    """Whether the caller started the tool with stdout closed."""
    return isinstance(sys.stdout, ClosedStdout)


def _descriptor_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def guard_standard_streams() -> None:
    """Closed descriptors 0-2 get ``/dev/null``; a closed stdout becomes :class:`ClosedStdout`."""
    for fd in (0, 1, 2):
        if _descriptor_open(fd):
            continue
        try:
            null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
        except OSError:
            continue
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if fd == 0 and sys.stdin is None:
            sys.stdin = open(0, closefd=False)  # noqa: SIM115  # reads as empty
        elif fd == 1:
            sys.stdout = ClosedStdout()
        elif fd == 2 and sys.stderr is None:
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115  # discards
    if sys.stdout is None:  # fd 1 open but Python could not use it
        sys.stdout = ClosedStdout()


def prepare() -> None:
    """Everything above, once, before Typer and rich are imported or read the environment."""
    guard_standard_streams()
    sane_terminal_size()
