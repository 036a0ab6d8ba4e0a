"""``--resume``: which inputs an earlier run into the same ``-o FILE`` already recorded.

What counts as recorded: a complete record in the target, or in what an interrupted run left
beside it (``.NAME.partial`` for jsonl and csv, the parts in ``.NAME.parts/`` for Parquet,
and ``.NAME.resume`` when a resume was itself killed while copying).  A line or row cut off
by a kill (no line ending, invalid JSON, a CSV record with fewer ranks than it should have)
is not a record: its input is done again.  Error records count as done unless
``retry_errors``.  Records are matched by their ``path`` (the input's path or dataset id).

The records kept are the ones a resumed run starts its output with, each once (the first
seen wins); the run then appends the new ones.

What wrote the file is recorded beside it (``.NAME.run.json`` for text formats; the
Parquet file's key-value metadata): a resumed run whose command, model, top-k, normalisation
or preprocessing differs is refused unless forced, so one file never mixes two models.
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import json
import os
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Generic, TypeVar, cast

from convnext_cli.errors import ImageError, UsageError, one_line
from convnext_cli.outputs.names import read_path_field
from convnext_cli.reading import (
    MAX_CSV_FIELD_CHARS,
    bounded_lines,
    open_regular_binary,
    read_json_file,
)

if TYPE_CHECKING:
    from convnext_cli.outputs.writers import Writer
    from convnext_cli.results import Result

T = TypeVar("T")

RESUMABLE_FORMATS = ("jsonl", "csv", "parquet")
# what must match between the run that wrote a file and the one resuming it
# (scores: classify --scores; features: embed --stage/--pool/--backbone; both absent when
# not asked for, as in files written before them)
PROVENANCE_KEYS = (
    *("command", "model", "config", "top_k", "normalize", "preprocess"),
    *("scores", "features"),
)
# where and how it ran (the numbers differ with them): compared when the file records them
RUN_KEYS = ("device", "dtype", "decode")


def provenance_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.run.json")


def copy_path(target: Path) -> Path:
    """Where a resuming run copies the kept records before rewriting the partial file."""
    return target.with_name(f".{target.name}.resume")


@dataclass
class Recorded:
    """What earlier runs recorded: the ids done, and (text formats) where the kept records are.

    Only the ids are held in memory.  The kept records themselves (text formats) are written,
    as they are read, to the copy beside the target (:func:`copy_path`), ``header`` first;
    ``ends`` holds where each record ends in it, counted from the end of the header, so they
    can be handed on record by record without reading them back whole.
    """

    ids: set[str] = field(default_factory=set)
    header: bytes = b""  # CSV: the header line of the file the records came from
    ends: array[int] = field(default_factory=lambda: array("q"))
    errors_dropped: int = 0
    torn: int = 0

    @property
    def kept(self) -> int:
        """How many records are kept (text formats)."""
        return len(self.ends)

    def add(self, record_id: str, is_error: bool, retry_errors: bool) -> bool:
        """Count a record in; False when it is not kept (seen already, or an error to retry)."""
        if record_id in self.ids:
            return False
        if is_error and retry_errors:
            self.errors_dropped += 1
            return False
        self.ids.add(record_id)
        return True


# ------------------------------------------------------------------------ provenance


def check_provenance(
    recorded: dict[str, Any] | None, current: dict[str, Any], target: Path, force: bool
) -> None:
    """Refuse to resume a file written by a different model, top-k or preprocessing."""
    if recorded is None or force:
        return
    different = [k for k in PROVENANCE_KEYS if recorded.get(k) != current.get(k)]
    different += [k for k in RUN_KEYS if k in recorded and recorded[k] != current.get(k)]
    if different:
        what = ", ".join(different)
        raise UsageError(
            f"{target}: written by a different run ({what} differ); "
            "--force-resume to add to it anyway, or write a new file"
        )


def read_provenance(target: Path) -> dict[str, Any] | None:
    """``.NAME.run.json``, read through the one safe reader (a regular file of at most
    MAX_JSON_FILE_BYTES, nested at most MAX_JSON_DEPTH deep); None when there is none."""
    path = provenance_path(target)
    if not os.path.lexists(path):
        return None
    name = f"{path}: unreadable record of the earlier run"
    data = read_json_file(path, name)
    return data if isinstance(data, dict) else None


def write_provenance(target: Path, provenance: dict[str, Any]) -> None:
    path = provenance_path(target)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(provenance, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)


# ---------------------------------------------------------------------- text formats


def text_sources(target: Path) -> list[Path]:
    """The target and what interrupted runs left beside it, newest state first."""
    from convnext_cli.outputs.files import partial_path

    check_resumable(target)
    return [p for p in (copy_path(target), partial_path(target), target) if p.is_file()]


def check_resumable(target: Path) -> None:
    """A target that --resume cannot read or add to (a FIFO, a socket: opening either would
    block) is a usage error, before anything is opened.  Devices (``/dev/null``) are
    written as they are, with nothing to resume."""
    import stat

    try:
        mode = os.stat(target).st_mode
    except OSError:
        return  # none yet (or unreadable: the writer says so)
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket"
        raise UsageError(f"{target}: --resume needs a regular file; this is {kind}")


def keep_text_records(
    sources: Iterable[Path],
    copy: Path,
    fmt: str,
    retry_errors: bool,
    top_k: int | None = None,
) -> Recorded:
    """Read every source once, record by record, and write the records kept (the first seen
    of each id; no torn ones; no errors with ``retry_errors``) to ``copy``, atomically.

    Memory holds the set of ids and one offset per kept record, never the records: a file
    of a million records is copied through a 64 KiB buffer.  ``copy`` may be one of the
    sources (a resume that was itself killed): it is read before it is replaced.
    """
    recorded = Recorded()
    temporary = copy.with_name(copy.name + ".tmp")
    written = 0
    with open(temporary, "wb") as out:
        for source in sources:
            records = _jsonl_records if fmt == "jsonl" else _csv_records
            for record_id, raw, is_error in records(source, recorded, top_k):
                if not recorded.add(record_id, is_error, retry_errors):
                    continue
                if not written:
                    out.write(recorded.header)
                out.write(raw)
                written += len(raw)
                recorded.ends.append(written)
    if written:
        os.replace(temporary, copy)
    else:
        temporary.unlink(missing_ok=True)
    return recorded


def kept_records(
    copy: Path, recorded: Recorded, chunk_bytes: int = 1 << 22
) -> Iterator[list[bytes]]:
    """The records :func:`keep_text_records` wrote to ``copy``, about ``chunk_bytes`` of them
    (at least one record) at a time."""
    ends = recorded.ends
    with open(copy, "rb") as handle:
        handle.seek(len(recorded.header))
        start = 0  # where the next record starts, counted from the end of the header
        first = 0  # the next record's number
        while first < len(ends):
            last = max(first + 1, bisect.bisect_right(ends, start + chunk_bytes, lo=first))
            data = handle.read(ends[last - 1] - start)
            bounds = [0, *(end - start for end in ends[first:last])]
            yield [data[a:b] for a, b in itertools.pairwise(bounds)]
            start, first = ends[last - 1], last


def _open_source(source: Path) -> IO[bytes]:
    """A resume source opened through the one safe open (a regular file, never blocking)."""
    try:
        return open_regular_binary(source)
    except ImageError as exc:
        raise UsageError(f"{source}: cannot resume from it ({exc})") from None


def _jsonl_records(
    source: Path, recorded: Recorded, top_k: int | None
) -> Iterator[tuple[str, bytes, bool]]:
    """Complete records, a line at a time (at most MAX_RECORD_LINE_BYTES: a longer line is a
    usage error naming the file); a line that is not a complete record is redone."""
    with _open_source(source) as handle:
        for raw in bounded_lines(handle, str(source)):
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("torn")
                record = json.loads(raw)
                record_id = record["path"]
                complete = "error" in record or "predictions" in record or "embedding" in record
                if not isinstance(record_id, str) or not complete:
                    raise ValueError("incomplete")
            except (ValueError, KeyError, TypeError, RecursionError):
                if raw.strip():
                    recorded.torn += 1
                continue
            yield record_id, raw, "error" in record


def csv_header(data: bytes) -> bytes:
    end = data.find(b"\n")
    return data[: end + 1] if end >= 0 else b""


def _csv_records(
    source: Path, recorded: Recorded, top_k: int | None
) -> Iterator[tuple[str, bytes, bool]]:
    """Rows grouped by path (classify writes one row per rank); the last group may be torn."""
    with _open_source(source) as handle:
        lines = bounded_lines(handle, str(source))
        first_line = next(lines, b"")
        header = csv_header(first_line)
        recorded.header = recorded.header or header
        size = os.fstat(handle.fileno()).st_size
        complete = size > len(header) and os.pread(handle.fileno(), 1, size - 1) == b"\n"
        body = lines if header else iter([first_line])
        text = (line.decode("utf-8", "surrogateescape") for line in body)
        groups = _csv_groups(text, classify=header.startswith(b"path,rank,"), source=source)
        previous = next(groups, None)
        while previous is not None:
            current = next(groups, None)
            record_id, raw, is_error, ranks = previous
            short = top_k is not None and not is_error and ranks is not None and ranks < top_k
            if current is None and (not complete or short):
                recorded.torn += 1
            else:
                yield record_id, raw, is_error
            previous = current


def _csv_groups(
    text: Iterable[str], classify: bool, source: Path | None = None
) -> Iterator[tuple[str, bytes, bool, int | None]]:
    """(id, raw rows, is error, number of rank rows or None for embed rows).

    A field over MAX_CSV_FIELD_CHARS, or anything else csv cannot parse, is a usage error
    naming the file and the line (a kill tears only the end of a line, which parses)."""
    csv.field_size_limit(MAX_CSV_FIELD_CHARS)
    reader = csv.reader(text)
    current: str | None = None
    rows: list[list[str]] = []
    for row in _csv_rows(reader, source):
        if not row:
            continue
        if current is not None and row[0] != current:
            yield _csv_group(current, rows, classify)
            rows = []
        current = row[0]
        rows.append(row)
    if current is not None:
        yield _csv_group(current, rows, classify)


def _csv_rows(reader: Any, source: Path | None) -> Iterator[list[str]]:
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise UsageError(
                f"{source}: line {reader.line_num + 1}: not a CSV record this tool wrote "
                f"({one_line(exc)})"
            ) from None
        yield row


def _csv_group(
    field_text: str, rows: list[list[str]], classify: bool
) -> tuple[str, bytes, bool, int | None]:
    """classify rows: path,rank,label,index,score,error; embed rows: path,error,f0,..."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    raw = out.getvalue().encode("utf-8", "surrogateescape")
    is_error = any(row[-1] for row in rows) if classify else len(rows[0]) > 1 and bool(rows[0][1])
    ranks = len(rows) if classify and not is_error else None
    try:
        record_id = read_path_field(field_text)
    except ValueError:
        record_id = field_text
    return record_id, raw, is_error, ranks


def refuse_if_locked(target: Path, display: object) -> None:
    """The OutputError a writer would give when another run holds ``.NAME.partial``, before
    resuming reads and copies what that run is writing."""
    from convnext_cli.errors import OutputError
    from convnext_cli.outputs.files import partial_path

    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory lock
        return
    partial = partial_path(target)
    try:
        fd = os.open(partial, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # none there: nobody is writing it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise OutputError(
            f"{display}: another convnext run is writing it (lock held on {partial})"
        ) from None
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ parquet


def read_parquet_ids(sources: Iterable[Path], retry_errors: bool) -> Recorded:
    """Ids recorded in Parquet files (the target and the parts of an interrupted run), read
    a batch of rows at a time; a file that cannot be read to its end counts for nothing."""
    import pyarrow.parquet as pq

    recorded = Recorded()
    for source in sources:
        found: list[tuple[str, bool]] = []
        try:
            with _open_source(source) as handle, pq.ParquetFile(handle) as parquet:
                for batch in parquet.iter_batches(
                    batch_size=1 << 16, columns=["path", "error"], use_threads=False
                ):
                    paths = batch.column(0).to_pylist()
                    failed = batch.column(1).is_valid().to_pylist()
                    found.extend(zip(paths, failed, strict=True))
        except Exception:  # a part cut off by a kill: its rows are done again
            recorded.torn += 1
            continue
        for path, is_error in found:
            record_id = _parquet_id(path)
            if record_id is None:
                recorded.torn += 1  # a row no input can claim (no path): not a record
                continue
            recorded.add(record_id, is_error, retry_errors)
    return recorded


def _parquet_id(value: object) -> str | None:
    """A Parquet row's ``path`` as a record id: None for a null (or non-text) path; a field
    that is not the JSON its leading quote promises is taken as it is (as in CSV)."""
    if not isinstance(value, str):
        return None
    try:
        return read_path_field(value)
    except (ValueError, RecursionError):
        return value


class Forwarded(Generic[T]):
    """An attribute of a wrapper that is its ``writer``'s attribute of the same name, read
    and written through."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, wrapper: Any, owner: type | None = None) -> T:
        return cast(T, getattr(wrapper.writer, self.name))

    def __set__(self, wrapper: Any, value: T) -> None:
        setattr(wrapper.writer, self.name, value)


class KeptRecordsWriter:
    """A resumed run's writer: aborted (an error, a refusal mid-run), it keeps its partial
    file, which holds the records of the earlier runs as well as its own, for the next
    ``--resume``; the target is untouched either way."""

    records: Forwarded[int] = Forwarded()
    names_errors_on_stderr: Forwarded[bool] = Forwarded()

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    def write(self, results: list[Result]) -> None:
        self.writer.write(results)

    def close(self) -> None:
        self.writer.close()

    def abort(self, keep: bool = False) -> None:
        self.writer.abort(keep=True)
