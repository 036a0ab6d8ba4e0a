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
  batch of records is being written, or the output closed and moved into place
  (:func:`deferred`), the signal is held and raised once that is complete, so no record is
  ever cut in half and a finished output always reaches its name.
- **finishing** (closing the output after a signal, or closing it at the end of a run): a
  second signal is held until the output is in place; a third leaves at once (the output
  target is untouched and the in-progress file stays beside it).
- **leaving** (:func:`leave`, after the command returned and every output was closed): the
  process ends with ``os._exit`` once stdout and stderr are flushed; a signal until then
  ends it with 130/143 too (the handlers of the starting phase are back).

This module imports nothing heavy: the CLI installs it before importing anything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NoReturn

from convnext_cli.errors import EXIT_INTERRUPTED, EXIT_PIPE_CLOSED, EXIT_TERMINATED, EXIT_USAGE

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


# A write or a close in progress holds signals; this many signals in all make the program
# leave at once anyway (a write stuck on a dead network file system): Ctrl-C twice still
# finds the records at their name, three times leaves now.
LEAVE_AT_SIGNAL = 3


class _State:
    depth = 0  # nesting of deferred()
    pending: int | None = None  # a signal that arrived while deferred
    raising = False  # records are flowing: signals raise (else: clean up and leave)
    signals = 0  # signals received while running
    cleanups: list[Callable[[], None]] = []


def _raise_or_hold(signum: int, _frame: FrameType | None) -> None:
    _State.signals += 1
    if not _State.raising:
        for cleanup in reversed(_State.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        _leave_now(signum)
    if _State.depth:
        if _State.signals >= LEAVE_AT_SIGNAL:  # a write that is stuck: leave now
            _leave_now(signum)
        if _State.pending is None:
            _State.pending = signum
        return
    raise exception_for(signum)


def _hold_or_leave(signum: int, _frame: FrameType | None = None) -> None:
    """While the output is finished after a signal: held, until LEAVE_AT_SIGNAL signals."""
    _State.signals += 1
    if _State.signals >= LEAVE_AT_SIGNAL:
        _leave_now(signum)


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
    _State.depth, _State.pending, _State.raising, _State.signals = 0, None, False, 0
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
    """Hold SIGINT/SIGTERM while a batch of records is written (or the output is closed and
    moved into place); raise when it is complete.  A signal held while the block failed is
    raised in place of the failure (the run ends 130/143, as the user asked), and is never
    left pending for a later block."""
    _State.depth += 1
    try:
        yield
    except BaseException as exc:
        _State.depth -= 1
        if _State.depth == 0 and _State.pending is not None:
            signum, _State.pending = _State.pending, None
            if not isinstance(exc, KeyboardInterrupt):
                raise exception_for(signum) from exc
        raise
    _State.depth -= 1
    if _State.depth == 0 and _State.pending is not None:
        signum, _State.pending = _State.pending, None
        raise exception_for(signum)


@contextlib.contextmanager
def finishing() -> Iterator[None]:
    """Closing the output after a signal: a second signal is held until it is in place, a
    third leaves at once (the target untouched, the in-progress file kept beside it)."""
    previous: dict[int, Any] = {}
    with contextlib.suppress(ValueError):
        for signum in _SIGNALS:
            previous[signum] = signal.signal(signum, _hold_or_leave)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def leave(code: int | str | None) -> NoReturn:
    """End the process with ``code`` once stdout and stderr are flushed, without the
    interpreter's teardown: every output was closed and moved into place by the command, so
    nothing is lost, and nothing of the teardown (torch's takes about a second) comes after
    the summary line.  A signal in that second would otherwise meet Python's own default
    handler, which finalisation puts back, and the process would die by SIGINT (-2) instead
    of exiting 130.  ``sys.exit``'s conventions: None is 0, a string is said and is 1."""
    import sys

    if code is None:
        code = 0
    elif isinstance(code, str):
        with contextlib.suppress(OSError):
            os.write(2, (code + "\n").encode("utf-8", "backslashreplace"))
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BrokenPipeError:
            code = code or EXIT_PIPE_CLOSED
        except (OSError, ValueError):
            code = code or EXIT_USAGE
    os._exit(code)
