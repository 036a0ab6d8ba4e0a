"""Reading an input file safely, before any decoder sees it (no PIL, NumPy or torch here).

Anything but a regular file (FIFOs, devices, sockets, folders, symlink loops, dangling
symlinks) is refused from its ``stat`` without a blocking open; the read is non-blocking and
capped at :func:`max_file_bytes`.  The limits' environment variables are read here too, and
the file name extensions a folder listing takes for images.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from convnext_cli.errors import ImageError, UsageError, one_line

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

DEFAULT_MAX_FILE_BYTES = 256 * 1024**2
MAX_FILE_BYTES_ENV = "CONVNEXT_MAX_FILE_BYTES"
DEFAULT_MAX_IMAGE_BYTES = 5 * 1024**3 // 4  # MAX_PIXELS x (4 + 3) bytes fits
MAX_IMAGE_BYTES_ENV = "CONVNEXT_MAX_IMAGE_BYTES"
_SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
MAX_LIMIT_BYTES = 1024**4  # a limit above 1 TiB is a typo, and would overflow a read size


def _limit_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    match = re.fullmatch(r"([0-9]{1,30})\s*([kKmMgG]?)(?:i?[bB])?", raw)
    if not match or int(match[1]) <= 0:
        raise ImageError(f"{name}={raw!r} is not a positive number of bytes (e.g. 268435456, 256M)")
    value = int(match[1]) * _SIZE_SUFFIXES[match[2].lower()]
    if value > MAX_LIMIT_BYTES:
        raise ImageError(f"{name}={raw!r} is over the largest limit, 1024G")
    return value


def max_file_bytes() -> int:
    """The largest file read, in bytes: ``CONVNEXT_MAX_FILE_BYTES`` or 256 MiB."""
    return _limit_from_env(MAX_FILE_BYTES_ENV, DEFAULT_MAX_FILE_BYTES)


def max_image_bytes() -> int:
    """The per-image decoding budget, in bytes: ``CONVNEXT_MAX_IMAGE_BYTES`` or 1.25 GiB."""
    return _limit_from_env(MAX_IMAGE_BYTES_ENV, DEFAULT_MAX_IMAGE_BYTES)


def check_limits() -> None:
    """Raise UsageError (exit 2, one line) if a limit's environment variable is malformed.

    The CLI may call this once at start-up; otherwise every input fails with that line.
    """
    try:
        max_file_bytes()
        max_image_bytes()
    except ImageError as exc:
        raise UsageError(str(exc)) from exc


_KIND_NAMES = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(path: str | Path, mode: int) -> ImageError:
    if stat.S_ISDIR(mode):
        try:
            os.listdir(path)
        except OSError as exc:
            return ImageError(f"is a folder that cannot be read ({exc.strerror or one_line(exc)})")
        return ImageError("is a directory, not an image")
    for test, name in _KIND_NAMES:
        if test(mode):
            return ImageError(f"is {name}, not a regular file")
    return ImageError("is not a regular file")


def _open_error(path: str | Path, exc: OSError) -> ImageError:
    if exc.errno == errno.ELOOP:
        return ImageError("cannot read file: symlink loop (too many levels of symbolic links)")
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return ImageError("cannot read file: broken symlink (its target does not exist)")
    if exc.errno == errno.ENXIO:
        return ImageError("is a socket or device that cannot be opened, not a regular file")
    return ImageError(f"cannot read file: {exc.strerror or one_line(exc)}")


def read_file(path: str | Path) -> bytes:
    """A regular file's bytes, or ImageError with the one-line reason it cannot be read.

    Never blocks and never reads without end: anything but a regular file is refused from
    its ``stat`` before it is opened, the open is non-blocking (should the file be swapped
    for a FIFO in between, ``fstat`` refuses it), and at most :func:`max_file_bytes` are read.
    """
    limit = max_file_bytes()
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _open_error(path, exc) from exc
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(path, info.st_mode)
    if info.st_size > limit:
        raise _too_big(info.st_size, limit)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _open_error(path, exc) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, info.st_mode)
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as stream:
            # sized by the stat (no 256 MiB buffer for a small file), then whatever the file
            # grew by (or all of a /proc file, whose size reads 0), still capped
            data = stream.read(min(limit, info.st_size) + 1)
            while len(data) <= limit:
                more = stream.read(limit + 1 - len(data))
                if not more:
                    break
                data += more
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or one_line(exc)}") from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise _too_big(len(data), limit)
    return data


def _too_big(size: int, limit: int) -> ImageError:
    return ImageError(
        f"refused: file is over the {limit}-byte limit ({size} bytes; "
        f"raise it with {MAX_FILE_BYTES_ENV})"
    )
