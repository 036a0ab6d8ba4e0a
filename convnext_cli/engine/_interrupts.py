"""Ctrl-C and SIGTERM: one line on stderr, exit 130 / 143, finished records kept.

Three phases, so that a signal at any moment ends the program the same way:

- **starting** (interpreter up, imports running, arguments being parsed): nothing has been
  written yet, so the handler writes ``interrupted`` (or ``terminated``) and leaves at once
  with ``os._exit`` -- no traceback from half-done imports.
- **running** (inside a command, before records flow: reading inputs, loading the model):
  there is nothing to save yet, so the handler runs the registered clean-ups (dropping the
  output file opened beside its target, see :func:`cleanup_on_leave`), writes the line and
  leaves at once.  An exception raised into third-party code (a half-done import, a model
  load) could be swallowed by its ``except:`` or surface during shutdown; leaving cannot.
- **streaming** (:func:`raising`, while records are produced and written): SIGINT raises
  :class:`KeyboardInterrupt`, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``),
  so the command unwinds, finishes its writer and moves the output into place.  While a
  batch of records is being written (:func:`deferred`), the signal is held and raised once
  the batch is complete, so no record is ever cut in half.
- **finishing** (closing the output after a signal): a second signal leaves at once; the
  output target is untouched and the in-progress file stays beside it.

This module imports nothing heavy: the CLI installs it before importing anything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from convnext_cli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def exit_code(signum: int) -> int:
    return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED


def message(signum: int) -> str:
    return "terminated" if signum == signal.SIGTERM else "interrupted"


def exception_for(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def code_for(exc: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def message_for(exc: BaseException) -> str:
    return "terminated" if isinstance(exc, Terminated) else "interrupted"


def _leave_now(signum: int, _frame: FrameType | None = None) -> None:
    """Write the one line and exit without unwinding (nothing is open for writing)."""
    with contextlib.suppress(OSError):
        os.write(2, (message(signum) + "\n").encode())
    os._exit(exit_code(signum))


def install_startup_handlers() -> None:
    """From process start until a command runs: leave at once on SIGINT/SIGTERM."""
    for signum in _SIGNALS:
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(signum, _leave_now)


class _State:
    depth = 0  # nesting of deferred()
    pending: int | None = None  # a signal that arrived while deferred
    raising = False  # records are flowing: signals raise (else: clean up and leave)
    cleanups: list[Callable[[], None]] = []


def _raise_or_hold(signum: int, _frame: FrameType | None) -> None:
    if not _State.raising:
        for cleanup in reversed(_State.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        _leave_now(signum)
    if _State.depth:
        if _State.pending is not None:  # a second signal while a write is stuck: leave now
            _leave_now(signum)
        _State.pending = signum
        return
    raise exception_for(signum)


@contextlib.contextmanager
def running() -> Iterator[None]:
    """While a command runs: signals raise (see the module docstring); restored afterwards."""
    previous: dict[int, Any] = {}
    try:
        for signum in _SIGNALS:
            previous[signum] = signal.signal(signum, _raise_or_hold)
    except ValueError:  # not the main thread: leave Python's defaults alone
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        yield
        return
    _State.depth, _State.pending, _State.raising = 0, None, False
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def raising() -> Iterator[None]:
    """While records are produced and written: a signal raises, so the writer is finished."""
    before, _State.raising = _State.raising, True
    try:
        yield
    finally:
        _State.raising = before


@contextlib.contextmanager
def cleanup_on_leave(cleanup: Callable[[], None]) -> Iterator[None]:
    """Run ``cleanup`` if a signal makes the program leave at once inside this block."""
    _State.cleanups.append(cleanup)
    try:
        yield
    finally:
        _State.cleanups.remove(cleanup)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a batch of records is written; raise when it is complete."""
    _State.depth += 1
    try:
        yield
    except BaseException:
        _State.depth -= 1
        raise
    _State.depth -= 1
    if _State.depth == 0 and _State.pending is not None:
        signum, _State.pending = _State.pending, None
        raise exception_for(signum)


@contextlib.contextmanager
def finishing() -> Iterator[None]:
    """Closing the output after a signal: a second signal leaves at once."""
    previous: dict[int, Any] = {}
    with contextlib.suppress(ValueError):
        for signum in _SIGNALS:
            previous[signum] = signal.signal(signum, _leave_now)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
