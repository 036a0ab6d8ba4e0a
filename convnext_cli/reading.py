"""Reading any file safely: input images before a decoder sees them, and every other file
the tool reads (config and label JSON, resume targets and their sidecars, Parquet and tar
inputs, path lists).  No PIL, NumPy or torch here.

Anything but a regular file (FIFOs, devices, sockets, folders, symlink loops, dangling
symlinks) is refused from its ``stat`` without a blocking open (:func:`open_regular`); the
read is non-blocking and capped (:func:`max_file_bytes` for images, the ``MAX_*`` constants
below for the rest).  JSON is parsed with a bounded nesting depth (:func:`parse_json`) and
line-based files are read a bounded line at a time (:func:`bounded_lines`).  The limits'
environment variables are read here too, and the file name extensions a folder listing
takes for images.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from convnext_cli.errors import ConvNextError, ImageError, UsageError, one_line

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

DEFAULT_MAX_FILE_BYTES = 256 * 1024**2
MAX_FILE_BYTES_ENV = "CONVNEXT_MAX_FILE_BYTES"
DEFAULT_MAX_IMAGE_BYTES = 5 * 1024**3 // 4  # MAX_PIXELS x (4 + 3) bytes fits
MAX_IMAGE_BYTES_ENV = "CONVNEXT_MAX_IMAGE_BYTES"
_SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
MAX_LIMIT_BYTES = 1024**4  # a limit above 1 TiB is a typo, and would overflow a read size

# ---- limits for the files that are not images (README: robustness, non-image files) -----
# config.json, preprocessor_config.json, --labels, .NAME.run.json (ImageNet-22k's config
# with its 21841 labels is about 1 MB)
MAX_JSON_FILE_BYTES = 64 * 1024**2
# nesting of any JSON the tool parses (its own files nest 4 deep at most)
MAX_JSON_DEPTH = 64
# one line of a jsonl or csv resume target (a classify record with -k 21841: about 2 MB)
MAX_RECORD_LINE_BYTES = 16 * 1024**2
# one CSV field of a resume target, in characters (csv's own default; a path is at most
# a few KB even JSON-escaped)
MAX_CSV_FIELD_CHARS = 128 * 1024
# one path of a list on stdin or --from-file (PATH_MAX is 4096)
MAX_LIST_LINE_BYTES = 1024**2
# a tar member's GNU long-name / long-link or PAX header block (tarfile reads it whole)
MAX_TAR_HEADER_BYTES = 1024**2


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
        return ImageError("is a directory, not a file")
    for test, name in _KIND_NAMES:
        if test(mode):
            return ImageError(f"is {name}, not a regular file")
    return ImageError("is not a regular file")


def _open_error(path: str | Path, exc: OSError) -> ImageError:
    if exc.errno == errno.ELOOP:
        return ImageError("cannot read file: symlink loop (too many levels of symbolic links)")
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return ImageError("cannot read file: broken symlink (its target does not exist)")
    if exc.errno == errno.ENOENT:
        return ImageError("no such file")
    if exc.errno == errno.ENXIO:
        return ImageError("is a socket or device that cannot be opened, not a regular file")
    return ImageError(f"cannot read file: {exc.strerror or one_line(exc)}")


def open_regular(path: str | Path) -> int:
    """A descriptor for a regular file, opened for reading without blocking, or ImageError
    with the one-line reason it is not one.

    Anything but a regular file is refused from its ``stat`` before it is opened; the open
    is non-blocking and ``fstat`` checks again (should the file be swapped for a FIFO in
    between).  Every file the tool reads is opened here.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _open_error(path, exc) from exc
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(path, info.st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _open_error(path, exc) from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise ImageError(f"cannot read file: {exc.strerror or one_line(exc)}") from exc
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    return fd


def open_regular_binary(path: str | Path) -> IO[bytes]:
    """:func:`open_regular` as a buffered binary file object."""
    return os.fdopen(open_regular(path), "rb")


def read_file(path: str | Path, limit: int | None = None) -> bytes:
    """A regular file's bytes, or ImageError with the one-line reason it cannot be read.

    Never blocks and never reads without end: :func:`open_regular`, then at most ``limit``
    bytes (default :func:`max_file_bytes`) are read.
    """
    env = MAX_FILE_BYTES_ENV if limit is None else None
    limit = max_file_bytes() if limit is None else limit
    fd = open_regular(path)
    try:
        info = os.fstat(fd)
        if info.st_size > limit:
            raise _too_big(info.st_size, limit, env)
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
        raise _too_big(len(data), limit, env)
    return data


ErrorType = Callable[[str], ConvNextError]


def read_small_file(
    path: str | Path, name: str, error: ErrorType = UsageError, limit: int = MAX_JSON_FILE_BYTES
) -> bytes:
    """:func:`read_file` for a file that is not an input: a failure is ``error`` (a usage
    error by default: exit 2) with one line that begins with ``name`` (the file as the user
    knows it, e.g. ``--labels x.json``)."""
    try:
        return read_file(path, limit)
    except ImageError as exc:
        raise error(f"{name}: {exc}") from None


def parse_json(
    data: bytes | str,
    name: str,
    error: ErrorType = UsageError,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """JSON (UTF-8) nested at most ``max_depth`` deep, or ``error`` with one line naming it."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise error(f"{name}: not valid JSON (nested deeper than {max_depth} levels)") from None
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise error(f"{name}: not valid JSON ({one_line(exc)})") from exc
    opened = text.count("[") + text.count("{")
    if opened > max_depth and json_depth(value) > max_depth:
        raise error(f"{name}: not valid JSON (nested deeper than {max_depth} levels)")
    return value


def json_depth(value: Any) -> int:
    """How deep lists and objects nest in a parsed JSON value (a scalar is 0), iteratively."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def read_json_file(
    path: str | Path,
    name: str | None = None,
    error: ErrorType = UsageError,
    *,
    limit: int = MAX_JSON_FILE_BYTES,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """A JSON file, read through :func:`read_small_file` and :func:`parse_json`."""
    name = str(path) if name is None else name
    data = read_small_file(path, name, error, limit)
    return parse_json(data, name, error, object_pairs_hook=object_pairs_hook)


def bounded_lines(
    handle: IO[bytes],
    name: str,
    error: ErrorType = UsageError,
    max_bytes: int = MAX_RECORD_LINE_BYTES,
    first_line: int = 1,
) -> Iterator[bytes]:
    """The lines of a binary file, endings kept, each at most ``max_bytes``: a longer one is
    ``error`` (one line naming the file and the line) before more than that is held."""
    number = first_line
    while line := handle.readline(max_bytes + 1):
        if len(line) > max_bytes:
            raise error(
                f"{name}: line {number} is longer than {max_bytes} bytes "
                "(not a file this tool wrote)"
            )
        yield line
        number += 1


def _too_big(size: int, limit: int, env: str | None = MAX_FILE_BYTES_ENV) -> ImageError:
    raise_it = f"; raise it with {env}" if env else ""
    return ImageError(f"refused: file is over the {limit}-byte limit ({size} bytes{raise_it})")
