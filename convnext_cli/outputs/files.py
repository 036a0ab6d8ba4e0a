"""Where records go: stdout, or a file written beside its target and moved into place.

The life cycle of an output file (``-o NAME``), the same for every format:

1. **open beside the target**: ``.NAME.partial`` in the target's folder (symlinks to the
   target are followed: the file they point to is the one replaced) is created and locked
   with ``flock``.  A second run writing the same target finds the lock held and stops with
   one line; nothing of the first run's is touched.
2. **write per batch**: records are appended and flushed as each batch finishes, so after a
   ``kill -9`` the partial file holds every finished batch (the last line may be torn).
3. **close and move into place**: the file is completed (a JSON array closed, a matrix
   header written), synced, given the old target's permissions, and renamed over the target
   with ``os.replace`` -- a reader sees the old file or the new one, never a torn one.
4. **abort** (an error before or during the run): the partial file is removed, or kept when
   it holds finished records (``keep=True``); the target is untouched either way.

A target that exists and is not a regular file (``/dev/null``, ``/dev/full``, a FIFO, a
terminal) is written directly when the user named it (``-o``; ``devices=True``), refused
otherwise: nothing is ever renamed over a device node.  ``-`` is stdout.
Write errors become :class:`OutputError` ("cannot write output", exit 2); a closed stdout
pipe becomes :class:`OutputClosed` (quiet, exit 141).

**The one protection.**  Every file the tool writes for the user (classify/embed ``-o`` and
its npy sidecar, ``benchmark -o``, ``convert``'s three files and its ONNX file) goes through
here: :func:`refuse_overwriting` first (a target that is, through symlinks or hard links,
an input or a checkpoint file is refused before anything is opened), then an
:class:`OutputFile` (or :func:`replacing`, for libraries that write by path).  The only
other files the tool writes are its own in-progress files beside a locked target
(``.NAME.parts/``, ``.NAME.run.json``, ``.NAME.resume``) and Ray's part files;
``tests/outputs/test_every_writer.py`` walks the source and fails on any other write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, BinaryIO

from convnext_cli.engine import _interrupts as interrupts
from convnext_cli.errors import OutputClosed, OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock
    fcntl = None  # type: ignore[assignment]

PARTIAL_SUFFIX = ".partial"


def partial_path(target: Path) -> Path:
    """The in-progress file for a target: ``.NAME.partial`` beside it (deterministic)."""
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def is_stdout(output: Path | str | None) -> bool:
    return output is None or str(output) == "-"


def _cannot_write(name: object, exc: OSError) -> OutputError:
    reason = exc.strerror or type(exc).__name__
    return OutputError(f"{name}: cannot write output ({reason})")


# ------------------------------------------------------------ never over what the user owns


def file_identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of the file ``path`` names (symlinks followed); None if there is none."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def checkpoint_files(model: str) -> list[str]:
    """The local files a model option names: the file itself, or the files in the folder."""
    path = Path(model).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        found: list[str] = []
        for root, _dirs, files in os.walk(path):
            found.extend(os.path.join(root, f) for f in files)
            if len(found) > 10_000:
                break
        return found
    return []


def existing_targets(targets: Iterable[Path]) -> dict[tuple[int, int], Path]:
    """The targets that exist already, by identity (only those can be an input)."""
    existing = {}
    for target in targets:
        identity = file_identity(target)
        if identity is not None:
            existing[identity] = target
    return existing


def refused(target: Path, kind: str, path: object) -> OutputError:
    return OutputError(f"{target}: refusing to write the output over {kind} ({path})")


def refuse_overwriting(
    targets: Iterable[Path],
    inputs: Iterable[str | Path] = (),
    model: str | None = None,
    checkpoint: Iterable[str | Path] = (),
) -> None:
    """An output that is (symlinks and hard links included) an input or a checkpoint file
    (``model``'s local files, or ``checkpoint``: the files a checkpoint was read from) is
    refused before anything is opened for writing."""
    existing = existing_targets(targets)
    if not existing:
        return
    checkpoints = [*checkpoint, *(checkpoint_files(model) if model else [])]
    for kind, paths in (("an input", inputs), ("a checkpoint file", checkpoints)):
        for path in paths:
            identity = file_identity(path)
            if identity in existing:
                raise refused(existing[identity], kind, path)


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def resolve_target(
    output: Path, follow_symlinks: bool = True, devices: bool = True
) -> tuple[Path, bool]:
    """(the path to write, whether it is written directly rather than beside and moved).

    ``follow_symlinks``: a symlink's target is the file replaced (``-o``); else the link
    itself is (``convert``: a link in OUT_DIR is never written through).  ``devices``: an
    existing device, FIFO or terminal is written directly; else it is refused."""
    try:
        info = os.stat(output, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise _cannot_write(output, exc) from exc
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise OutputError(f"{output}: cannot write output (it is a folder)")
    if info is not None and not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
        if not devices:
            raise OutputError(
                f"{output}: refusing to replace it: {_kind(info.st_mode)}, not a regular file"
            )
        return output, True  # a device, FIFO or terminal the user named: written as it is
    if follow_symlinks:
        return Path(os.path.realpath(output)), False
    return Path(os.path.realpath(output.parent)) / output.name, False


class OutputFile:
    """One output file: ``.NAME.partial`` beside the target, locked, then moved into place.

    ``write`` takes bytes; ``commit`` moves the finished file into place; ``abort`` removes
    it (or keeps it).  ``display`` is the name used in messages (what the user typed).
    """

    def __init__(
        self,
        output: Path,
        display: object | None = None,
        *,
        follow_symlinks: bool = True,
        devices: bool = True,
    ) -> None:
        self.display = display if display is not None else output
        self.follow_symlinks = follow_symlinks
        self.target, self.direct = resolve_target(Path(output), follow_symlinks, devices)
        self.partial = self.target if self.direct else partial_path(self.target)
        self.done = False
        try:
            if self.direct:
                self.fd = os.open(
                    self.target, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
                )
            else:
                self.fd = self._open_locked()
        except OSError as exc:
            raise _cannot_write(self.display, exc) from exc
        self.file: BinaryIO = os.fdopen(self.fd, "wb", buffering=1 << 16)

    def _open_locked(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        for _ in range(20):
            fd = os.open(self.partial, flags, 0o666)
            if fcntl is None:
                os.ftruncate(fd, 0)
                return fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(
                        f"{self.display}: another convnext run is writing it "
                        f"(lock held on {self.partial})"
                    ) from None
                raise
            try:
                current = os.stat(self.partial)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(current, os.fstat(fd)):
                os.ftruncate(fd, 0)  # ours now: a partial file left by a killed run is redone
                return fd
            os.close(fd)  # the file was moved into place by the run we raced: open again
        raise OutputError(f"{self.display}: cannot write output (the lock keeps changing hands)")

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as exc:
            raise _cannot_write(self.display, exc) from exc

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            raise _cannot_write(self.display, exc) from exc

    def pwrite(self, data: bytes, offset: int) -> None:
        """Rewrite bytes already written (a header), without moving the append position."""
        self.flush()
        try:
            os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise _cannot_write(self.display, exc) from exc

    # ------------------------------------------------------------------ ending

    def _keep_mode(self, path: Path) -> None:
        """The old target's permissions, else those ``cp`` gives a new file (0666 less the
        umask; a library that wrote by path may have made its file 0600)."""
        with contextlib.suppress(OSError):
            try:
                info = os.stat(self.target, follow_symlinks=self.follow_symlinks)
                mode = stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else None
            except FileNotFoundError:
                mode = None
            if mode is None:
                umask = os.umask(0o022)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.chmod(path, mode)

    def commit(self) -> None:
        """Flush, sync and move the partial file over the target (on failure: abort)."""
        if self.done:
            return
        try:
            self.flush()
            if not self.direct:
                with contextlib.suppress(OSError):
                    os.fsync(self.fd)
                self._keep_mode(self.partial)
                try:
                    os.replace(self.partial, self.target)
                except OSError as exc:
                    raise _cannot_write(self.display, exc) from exc
        except BaseException:
            self.abort()
            raise
        self._close()

    def replace_with(self, built: Path) -> None:
        """Move a finished file built from this partial over the target; drop the partial."""
        if self.done:
            return
        try:
            self._keep_mode(built)
            os.replace(built, self.target)
            self.partial.unlink(missing_ok=True)
        except OSError as exc:
            raise _cannot_write(self.display, exc) from exc
        finally:
            self._close()

    def abort(self, keep: bool = False) -> None:
        """Stop writing; remove the partial file unless ``keep`` (the target is untouched)."""
        if self.done:
            return
        with contextlib.suppress(OSError):
            self.file.flush()
        if not keep and not self.direct:
            with contextlib.suppress(OSError):
                self.partial.unlink()
        self._close()

    def _close(self) -> None:
        self.done = True
        with contextlib.suppress(OSError):
            self.file.close()  # closing the descriptor releases the lock


@contextlib.contextmanager
def replacing(
    target: Path,
    display: object | None = None,
    *,
    follow_symlinks: bool = True,
    devices: bool = True,
) -> Iterator[OutputFile]:
    """An :class:`OutputFile` for a writer that writes by path (``out.partial``) or into
    ``out.file``: committed (moved into place) when the block ends, aborted (the target
    untouched, the partial removed) on an error, and removed too if a signal makes the
    program leave at once inside the block.  An OSError inside is "cannot write output"."""
    out = OutputFile(target, display, follow_symlinks=follow_symlinks, devices=devices)
    try:
        with interrupts.cleanup_on_leave(out.abort):
            yield out
            out.commit()
    except OSError as exc:
        out.abort()
        raise _cannot_write(out.display, exc) from exc
    except BaseException:
        out.abort()
        raise


class StdoutFile:
    """stdout with the same interface: bytes in, errors turned into the project's own."""

    display = "<stdout>"
    direct = True

    def __init__(self) -> None:
        self.stream: IO[bytes] | None = getattr(sys.stdout, "buffer", None)

    def write(self, data: bytes) -> None:
        try:
            if self.stream is not None:
                self.stream.write(data)
            else:  # a text-only stdout (an embedding host): hand it text
                sys.stdout.write(data.decode("utf-8"))
        except OSError as exc:
            raise self._failed(exc) from exc

    def flush(self) -> None:
        try:
            if self.stream is not None:
                self.stream.flush()
            sys.stdout.flush()
        except OSError as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: OSError) -> Exception:
        # Whatever is still buffered would fail again when Python flushes stdout at exit
        # ("Exception ignored ..."): point stdout at /dev/null first.
        silence_stdout()
        if isinstance(exc, BrokenPipeError) or exc.errno == errno.EPIPE:
            return OutputClosed()
        return _cannot_write(self.display, exc)

    def commit(self) -> None:
        self.flush()

    def abort(self, keep: bool = False) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.flush()


def silence_stdout() -> None:
    """Redirect file descriptor 1 to /dev/null (after the reader went away or it failed)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        fileno = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fileno)
        os.close(devnull)


class TextSink:
    """Text on top of an :class:`OutputFile` or :class:`StdoutFile`: UTF-8, no newline mangling.

    Undecodable characters that reach it (they should not: the writers escape names) are
    written as backslash escapes, so an output file is always valid UTF-8.
    """

    def __init__(self, raw: OutputFile | StdoutFile) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        self.raw.write(text.encode("utf-8", "backslashreplace"))
        return len(text)

    def flush(self) -> None:
        self.raw.flush()

    def isatty(self) -> bool:
        if isinstance(self.raw, StdoutFile):
            return sys.stdout.isatty()
        return os.isatty(self.raw.fd)

    def fileno(self) -> int:
        if isinstance(self.raw, StdoutFile):
            return sys.stdout.fileno()
        return self.raw.fd

    @property
    def encoding(self) -> str:
        return "utf-8"
