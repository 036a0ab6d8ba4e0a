"""Dataset inputs beside loose files: WebDataset ``.tar`` shards and Parquet files of image bytes.

Each contributes one input per image, with an id that names where it came from:

- a tar member: ``SHARD#MEMBER``, e.g. ``shards/00001.tar#000123.jpg`` (the shard as it was
  named on the command line or found in a folder, then ``#``, then the member's name inside
  the archive).  Members are found by image extension (as in folders); the others (``.json``,
  ``.txt``, ``.cls`` ...) are WebDataset metadata and are skipped.  Members are read in place
  (``pread`` at the member's offset, the archive kept open by each decoding process), never
  extracted to disk.  A sparse member (GNU or PAX sparse formats) gets an error record: its
  stored bytes are not the file's.  Only uncompressed tar is read: a compressed archive cannot
  be read member by member without decompressing all of it.
- a Parquet row: the value of the id column when there is one (``--id-column``, else a
  column named ``id``, ``key``, ``__key__``, ``path`` or ``file_name`` when present), else
  ``FILE#ROW`` with the 0-based row number in the file.  The image column (``--image-column``,
  else the first of ``image``, ``jpg``, ``png``, ``img``, ``bytes``, ``image_bytes``) holds
  encoded bytes: plain binary, or the ``{bytes, path}`` struct that Hugging Face datasets writes.

A broken shard (a truncated or corrupt tar, an unreadable Parquet file) gives one input that
fails with the reason, named after the file; the members or rows read before the damage keep
their own records.  Every decoding-policy guarantee applies to members and cells as to files:
they are bytes handed to the same decoder, with the same size cap.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from convnext_cli.errors import ImageError, UsageError, one_line
from convnext_cli.reading import MAX_TAR_HEADER_BYTES, open_regular, open_regular_binary

IMAGE_COLUMNS = ("image", "jpg", "png", "img", "bytes", "image_bytes")
ID_COLUMNS = ("id", "key", "__key__", "path", "file_name")
TAR_SUFFIXES = (".tar",)
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class Item:
    """One dataset input: where its bytes are, and the id its record carries as ``path``.

    A tar member is the byte range ``offset``, ``length`` of ``file``; a Parquet cell is row
    ``row`` of row group ``row_group`` in ``column`` of ``file`` (read when it is decoded,
    one row group at a time, so listing a dataset reads no image bytes).  ``error`` is a
    failure known when listing (a broken shard).  With ``length`` None (and no row group),
    the input is the whole of ``file``, read as a loose file is: a file whose path an earlier
    input already has as its id gets such an item, with an id of its own (see
    :class:`convnext_cli.inputs.expand.UniqueIds`).
    """

    id: str
    file: str | None = None
    offset: int = 0
    length: int | None = None
    row_group: int | None = None
    row: int = 0
    column: str | None = None
    error: str | None = None


def read_item(item: Item, max_bytes: int) -> bytes:
    """The encoded image bytes of a dataset input, or ImageError with the reason."""
    if item.error is not None:
        raise ImageError(item.error)
    if item.file is None:
        raise ImageError("nothing to read")
    if item.row_group is not None and item.column is not None:
        data = _parquet_cell(item.file, item.row_group, item.column, item.row)
        if len(data) > max_bytes:
            raise ImageError(f"cell is {len(data)} bytes, over the {max_bytes}-byte limit")
        return data
    if item.length is None:  # a whole file (named twice: its later names get ID#N)
        from convnext_cli.reading import read_file

        return read_file(item.file)
    return read_range(item.file, item.offset, item.length, max_bytes)


def is_dataset_file(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES + PARQUET_SUFFIXES)


def dataset_items(
    path: str,
    image_extensions: frozenset[str],
    image_column: str | None = None,
    id_column: str | None = None,
) -> Iterator[Item]:
    """The inputs a ``.tar`` or ``.parquet`` file contributes, in stored order."""
    if path.lower().endswith(TAR_SUFFIXES):
        yield from tar_items(path, image_extensions)
    else:
        yield from parquet_items(path, image_column, id_column)


# ---------------------------------------------------------------------------------- brace


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


MAX_BRACE_NAMES = 1_000_000  # {0..9}{0..9}... multiplies: refuse before building it
MAX_BRACE_PATTERN = 4096  # characters (PATH_MAX): a longer brace pattern is refused


def expand_braces(pattern: str) -> list[str]:
    """``shards/{00000..00002}.tar`` -> three names (zero padding kept); ``{a,b}`` alternatives.

    One pass over the pattern: each innermost ``{...}`` that is a range or a comma list is
    expanded, and what it expands to is not expanded again, so a nested ``{0..{1..3}}``
    gives ``{0..1}``, ``{0..2}``, ``{0..3}`` literally, as bash does.  A brace group that is
    neither a range nor a comma list is kept literally, as the shell does.  A pattern that
    would name more than a million files, or is longer than 4096 characters, is a usage
    error (checked before anything is built).
    """
    groups = check_braces(pattern)
    if not groups:
        return [pattern]
    pieces: list[list[str]] = []
    last = 0
    for match, choices in groups:
        pieces.append([pattern[last : match.start()]])
        pieces.append(choices())
        last = match.end()
    pieces.append([pattern[last:]])
    return ["".join(parts) for parts in itertools.product(*pieces)]


def check_braces(pattern: str) -> list[tuple[re.Match[str], Callable[[], list[str]]]]:
    """UsageError when a brace pattern is too long or would name more than a million files
    (counted, not expanded); else its expandable groups, each with how to list its choices."""
    if "{" not in pattern:
        return []
    if len(pattern) > MAX_BRACE_PATTERN:
        raise UsageError(
            f"{pattern[:60]}...: a brace pattern is at most {MAX_BRACE_PATTERN} characters "
            f"(this one has {len(pattern)})"
        )
    total = 1
    groups: list[tuple[re.Match[str], Callable[[], list[str]]]] = []
    for group in _BRACE.finditer(pattern):
        body = group.group(1)
        count = _brace_count(body)
        if count == 0:
            continue  # kept literally
        total *= count
        if total > MAX_BRACE_NAMES:
            raise UsageError(f"{pattern}: the brace pattern names over {MAX_BRACE_NAMES} files")
        groups.append((group, functools.partial(_brace_choices, body)))
    return groups


def _brace_count(body: str) -> int:
    """How many names a group gives (0: not a range or a list, kept literally)."""
    numeric = _RANGE.match(body)
    if numeric:
        return abs(int(numeric.group(2)) - int(numeric.group(1))) + 1
    return len(body.split(",")) if "," in body else 0


def _brace_choices(body: str) -> list[str]:
    numeric = _RANGE.match(body)
    if numeric:
        start, end = numeric.group(1), numeric.group(2)
        width = len(start) if start.lstrip("-").startswith("0") and len(start) > 1 else 0
        lo, hi = int(start), int(end)
        step = 1 if hi >= lo else -1
        return [str(n).zfill(width) for n in range(lo, hi + step, step)]
    if "," in body:
        return body.split(",")
    return []


# ------------------------------------------------------------------------------------ tar


def tar_items(shard: str, image_extensions: frozenset[str]) -> Iterator[Item]:
    """Image members of an uncompressed tar, by offset; one failing item for a broken shard."""
    try:
        fd = os.open(shard, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        yield Item(shard, error=f"cannot read archive: {exc.strerror or one_line(exc)}")
        return
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            yield Item(shard, error="not a regular file (cannot read it as an archive)")
            return
        yield from _tar_members(shard, handle, info.st_size, image_extensions)


def _tar_members(
    shard: str, handle: object, size: int, image_extensions: frozenset[str]
) -> Iterator[Item]:
    last = "the start"
    try:
        archive = tarfile.open(fileobj=handle, mode="r:", tarinfo=_BoundedTarInfo)  # type: ignore[call-overload]
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield Item(shard, error=f"not a readable tar archive ({_tar_reason(exc)})")
        return
    try:
        while True:
            member = archive.next()
            archive.members.clear()  # keep memory flat on archives with millions of members
            if member is None:
                break
            last = member.name
            if os.path.splitext(member.name)[1].lower() not in image_extensions:
                continue
            item_id = f"{shard}#{member.name}"
            if not member.isreg():
                yield Item(item_id, error="not a regular file inside the archive")
            elif _is_sparse(member):
                yield Item(item_id, error=SPARSE_MEMBER)
            elif member.offset_data + member.size > size:
                yield Item(item_id, error="truncated archive member")
            else:
                yield Item(item_id, file=shard, offset=member.offset_data, length=member.size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield Item(shard, error=f"corrupt tar archive after {last!r} ({_tar_reason(exc)})")
        return
    if not _ends_cleanly(archive, size):
        yield Item(shard, error=f"truncated or corrupt tar archive after {last!r}")


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extension blocks (a GNU long name or long link, a PAX header),
    which tarfile reads whole into memory, are refused past MAX_TAR_HEADER_BYTES or past
    the end of the file, before they are read."""

    def _check_extension(self, archive: tarfile.TarFile) -> None:
        fileobj: Any = archive.fileobj
        left = os.fstat(fileobj.fileno()).st_size - fileobj.tell()
        if self.size > MAX_TAR_HEADER_BYTES or self.size > left:
            raise tarfile.ReadError(
                f"the extended header (long name or PAX) at byte {self.offset} claims "
                f"{self.size} bytes: over the {MAX_TAR_HEADER_BYTES}-byte limit or past the "
                "end of the file"
            )

    def _proc_gnulong(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_extension(archive)
        return super()._proc_gnulong(archive)  # type: ignore[misc]

    def _proc_pax(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_extension(archive)
        return super()._proc_pax(archive)  # type: ignore[misc]


SPARSE_MEMBER = (
    "sparse archive member (GNU or PAX sparse format): not read, its bytes are not stored as is"
)


def _is_sparse(member: tarfile.TarInfo) -> bool:
    """A GNU (type ``S``) or PAX (``GNU.sparse.*``, formats 0.0, 0.1, 1.0) sparse member: its
    stored bytes are not the file's (the holes are left out, and a map says where)."""
    if member.type == tarfile.GNUTYPE_SPARSE or getattr(member, "sparse", None) is not None:
        return True
    return any(key.startswith("GNU.sparse.") for key in member.pax_headers)


def _ends_cleanly(archive: tarfile.TarFile, size: int) -> bool:
    """A tar ends with zero blocks; a header cut off or garbage where one belongs does not."""
    offset = archive.offset
    if size - offset < tarfile.BLOCKSIZE:
        return False
    archive.fileobj.seek(offset)
    block = archive.fileobj.read(tarfile.BLOCKSIZE)
    return block == b"\0" * tarfile.BLOCKSIZE


def _tar_reason(exc: BaseException) -> str:
    return one_line(exc) if str(exc) else type(exc).__name__


def read_range(path: str, offset: int, length: int, max_bytes: int) -> bytes:
    """``length`` bytes of a regular file at ``offset`` (a tar member), within the size cap.

    The archive stays open in this process for the members that follow (one ``pread`` per
    member; see :func:`_archive`), as a decoding process reads a shard's members in a row.
    """
    if length > max_bytes:
        raise ImageError(f"member is {length} bytes, over the {max_bytes}-byte limit")
    fd = _archive(path)
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        _forget_archive(path)
        raise ImageError(f"cannot read archive member: {exc.strerror}") from exc
    if len(data) != length:
        raise ImageError("truncated archive member")
    return data


OPEN_ARCHIVES = 8  # tar shards a process keeps open (the least recently read is closed)
_archives: dict[str, int] = {}  # path -> descriptor, least recently read first
_archives_pid = 0  # the process that opened them: a forked child opens its own


def _archive(path: str) -> int:
    """A descriptor for a shard, opened once per process (non-blocking, a regular file only)."""
    global _archives_pid
    if _archives_pid != os.getpid():
        _archives.clear()  # a forked child: the parent's descriptors are the parent's
        _archives_pid = os.getpid()
    fd = _archives.pop(path, None)
    if fd is None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ImageError(f"cannot read archive: {exc.strerror or one_line(exc)}") from exc
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        if not regular:
            os.close(fd)
            raise ImageError("not a regular file (cannot read it as an archive)")
        while len(_archives) >= OPEN_ARCHIVES:
            os.close(_archives.pop(next(iter(_archives))))
    _archives[path] = fd  # most recently read last
    return fd


def _forget_archive(path: str) -> None:
    fd = _archives.pop(path, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


# -------------------------------------------------------------------------------- parquet


def parquet_items(
    path: str, image_column: str | None = None, id_column: str | None = None
) -> Iterator[Item]:
    """One item per row, by row group and row; only the id column is read here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        handle = open_regular_binary(path)
    except ImageError as exc:
        yield Item(path, error=f"cannot read Parquet file: {exc}")
        return
    try:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        image = _pick_column(names, image_column, IMAGE_COLUMNS, "image")
        ident = _pick_id_column(names, id_column)
        for group in range(parquet.num_row_groups):
            count = parquet.metadata.row_group(group).num_rows
            for item in _group_items(parquet, path, group, (0, count, row), image, ident):
                yield item
                row += 1
    except _ColumnMissing as exc:
        yield Item(path, error=str(exc))
    except (pa.ArrowException, OSError, ValueError) as exc:
        where = f"after row {row}" if row else "at the start"
        yield Item(path, error=f"corrupt or unreadable Parquet file {where} ({one_line(exc)})")
    finally:
        handle.close()


def _group_items(
    parquet: Any, path: str, group: int, rows: tuple[int, int, int], image: str, ident: str | None
) -> Iterator[Item]:
    """Rows ``start`` to ``stop`` of row group ``group`` as items (``rows``: start, stop, the
    file's row number of the group's row 0): the id column's value, else ``FILE#ROW``."""
    start, stop, first = rows
    ids: list[object] = [None] * (stop - start)
    if ident is not None:
        column = parquet.read_row_group(group, columns=[ident], use_threads=False).column(0)
        ids = column.slice(start, stop - start).to_pylist()
    for n in range(start, stop):
        value = ids[n - start]
        item_id = f"{path}#{first + n}" if value is None else str(value)
        yield Item(item_id, file=path, row_group=group, row=n, column=image)


MAX_ROW_GROUP_BYTES = 1 << 30  # one row group's image column, uncompressed, is read at once


@lru_cache(maxsize=8)
def _parquet_file(path: str, pid: int, thread: int) -> Any:
    """An open Parquet file, once per process and thread (`pid` keeps a forked child off its
    parent's; the thread reading ahead has its own).

    A decoding process maps the file into memory (about half the cost of reading a row
    group: no copy of the compressed pages); the main process reads it, since a file cut
    short while mapped ends the process that maps it (SIGBUS), which a decoding process may
    do (its inputs get error records) and the run may not.
    """
    import pyarrow.parquet as pq

    os.close(open_regular(path))  # never a FIFO or a device, whatever it became since
    return pq.ParquetFile(path, memory_map=_in_decoding_process())


def _in_decoding_process() -> bool:
    import multiprocessing

    return multiprocessing.parent_process() is not None


def _read_row_group(path: str, group: int, column: str) -> Any:
    """One row group's image column, as Arrow holds it, within the size cap."""
    parquet = _parquet_file(path, os.getpid(), threading.get_ident())
    meta = parquet.metadata.row_group(group)
    size = sum(
        meta.column(n).total_uncompressed_size
        for n in range(meta.num_columns)
        if meta.column(n).path_in_schema.split(".")[0] == column
    )
    if size > MAX_ROW_GROUP_BYTES:
        raise ImageError(
            f"row group {group} holds {size} bytes of images, over the {MAX_ROW_GROUP_BYTES}-byte "
            "limit for one read (rewrite the file with smaller row groups)"
        )
    # one thread: the decoding processes are the parallelism
    return parquet.read_row_group(group, columns=[column], use_threads=False).column(0)


class _RowGroups:
    """The row groups a process is decoding, read once each: the current one, and (in a
    decoding process) the next one, read ahead by a thread while the current one's images
    are decoded.  At most two are held; decoders take consecutive rows, so a row group
    is read again only by a process that comes back to it."""

    def __init__(self) -> None:
        self.pid = 0
        self.held: dict[tuple[str, int, str], Future[Any]] = {}
        self.reader: ThreadPoolExecutor | None = None

    def column(self, path: str, group: int, column: str) -> Any:
        if self.pid != os.getpid():  # a forked child: nothing of its parent's
            self.pid, self.held, self.reader = os.getpid(), {}, None
        key = (path, group, column)
        held = self.held.pop(key, None)
        if held is None:
            held = Future()
            try:
                held.set_result(_read_row_group(path, group, column))
            except Exception as exc:
                held.set_exception(exc)
        following = (path, group + 1, column)
        ahead = self.held.get(following)
        self.held = {key: held}  # the current one, and the next one
        if ahead is not None:
            self.held[following] = ahead
        else:
            self._read_ahead(path, group + 1, column)
        return held.result()

    def _read_ahead(self, path: str, group: int, column: str) -> None:
        if not _in_decoding_process():
            return  # no thread in the main process, which forks the decoding processes
        try:
            groups = _parquet_file(path, os.getpid(), threading.get_ident()).num_row_groups
        except Exception:
            return
        if group >= groups:
            return
        if self.reader is None:
            self.reader = ThreadPoolExecutor(1, thread_name_prefix="convnext-parquet")
        self.held[(path, group, column)] = self.reader.submit(_read_row_group, path, group, column)

    def clear(self) -> None:
        self.held.clear()


_row_groups = _RowGroups()


def _parquet_cell(path: str, group: int, column: str, row: int) -> bytes:
    import pyarrow as pa

    try:
        value = _row_groups.column(path, group, column)[row].as_py()
    except (pa.ArrowException, OSError, ValueError, IndexError) as exc:
        raise ImageError(f"cannot read the Parquet row ({one_line(exc)})") from exc
    if isinstance(value, dict):  # the {bytes, path} struct Hugging Face datasets writes
        value = value.get("bytes")
    if value is None:
        raise ImageError("no image bytes in this row")
    if isinstance(value, str):
        raise ImageError("the image column holds text, not encoded image bytes")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ImageError(f"the image column holds {type(value).__name__}, not bytes")
    return bytes(value)


class _ColumnMissing(Exception):
    pass


def _pick_column(
    names: list[str], chosen: str | None, candidates: tuple[str, ...], what: str
) -> str:
    if chosen is not None:
        if chosen not in names:
            raise _ColumnMissing(f"no column {chosen!r} (columns: {', '.join(names[:12])})")
        return chosen
    found = next((c for c in candidates if c in names), None)
    if found is None:
        raise _ColumnMissing(
            f"no {what} column (looked for {', '.join(candidates)}; "
            f"columns: {', '.join(names[:12])}; choose one with --{what}-column)"
        )
    return found


def _pick_id_column(names: list[str], chosen: str | None) -> str | None:
    if chosen is not None:
        return _pick_column(names, chosen, ID_COLUMNS, "id")
    return next((c for c in ID_COLUMNS if c in names), None)


def parquet_layout(path: str) -> list[int] | None:
    """The rows of each row group of a Parquet file (its footer only, through the safe
    opener), or None when it cannot be read as one (its items then say why)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = open_regular_binary(path)
    except ImageError:
        return None
    try:
        metadata = pq.ParquetFile(handle).metadata
        return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    except (pa.ArrowException, OSError, ValueError):
        return None
    finally:
        handle.close()


def parquet_slice_items(
    path: str,
    group: int,
    rows: tuple[int, int, int],
    image_column: str | None = None,
    id_column: str | None = None,
) -> Iterator[Item]:
    """The items of rows ``start`` to ``stop`` (excluded) of row group ``group``, with the
    ids :func:`parquet_items` gives them; ``rows`` is (start, stop, the file's row number of
    row 0 of the group).  One failing item, named after the file, when it cannot be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = open_regular_binary(path)
    except ImageError as exc:
        yield Item(path, error=f"cannot read Parquet file: {exc}")
        return
    try:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        image = _pick_column(names, image_column, IMAGE_COLUMNS, "image")
        ident = _pick_id_column(names, id_column)
        yield from _group_items(parquet, path, group, rows, image, ident)
    except _ColumnMissing as exc:
        yield Item(path, error=str(exc))
    except (pa.ArrowException, OSError, ValueError) as exc:
        yield Item(path, error=f"corrupt or unreadable Parquet file ({one_line(exc)})")
    finally:
        handle.close()
