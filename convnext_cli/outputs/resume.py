"""``--resume``: which inputs an earlier run into the same ``-o FILE`` already recorded.

What counts as recorded: a complete record in the target, or in what an interrupted run left
beside it (``.NAME.partial`` for jsonl and csv, the parts in ``.NAME.parts/`` for Parquet,
and ``.NAME.resume`` when a resume was itself killed while copying).  A line or row cut off
by a kill (no line ending, invalid JSON, a CSV record with fewer ranks than it should have)
is not a record: its input is done again.  Error records count as done unless
``retry_errors``.  Records are matched by their ``path`` (the input's path or dataset id).

The records kept are the ones a resumed run starts its output with, each once (the first
seen wins); the run then appends the new ones.

What wrote the records is recorded with them, and a resumed run whose command, model,
top-k, normalisation or preprocessing differs is refused unless forced (``--force-resume``),
so one file never mixes two models:

- **Parquet**: in every file's own key-value metadata (the target and each part).  A file
  without it, or with columns this tool does not write, is refused (exit 2, naming it).
- **jsonl and csv**: in ``.NAME.run.json`` beside the target, which names the records it
  describes: the SHA-256 of the first record that holds a result (not an error) of the file
  that run wrote.  It is written only once such a record is in the file (a run stopped
  before its first result leaves it as it was), and a resume checks every file it reads
  records from (the target, ``.NAME.partial``, ``.NAME.resume``) against it: records with a
  result and no ``.NAME.run.json``, a file whose first result is not one it names, or a
  ``.NAME.run.json`` that is not what this tool writes, are refused.  Files of error records
  only need none (no model output in them).
- ``--force-resume`` mixes runs, but never records of another shape: another command,
  ``--stage``/``--pool``/``--backbone``, or embedding width is refused even then.
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


# what a forced resume may still not mix: records of another shape (columns, widths)
SHAPE_KEYS = ("command", "features", "width")
RUN_RECORD_MARK = "convnext_cli_run"  # .NAME.run.json: {mark: 1, "runs": {sha256: provenance}}


def check_provenance(
    recorded: dict[str, Any] | None, current: dict[str, Any], target: Path, force: bool
) -> None:
    """Refuse to resume a file written by a different model, top-k or preprocessing (unless
    ``force``), or, forced or not, by a run whose records have another shape."""
    if recorded is None:
        return
    shape = [
        k for k in SHAPE_KEYS if (k in recorded or k in current) and _differs(recorded, current, k)
    ]
    if shape:
        raise UsageError(
            f"{target}: written by a run whose records have another shape "
            f"({', '.join(shape)} differ); write a new file"
        )
    if force:
        return
    different = [k for k in PROVENANCE_KEYS if recorded.get(k) != current.get(k)]
    different += [k for k in RUN_KEYS if k in recorded and recorded[k] != current.get(k)]
    if different:
        what = ", ".join(different)
        raise UsageError(
            f"{target}: written by a different run ({what} differ); "
            "--force-resume to add to it anyway, or write a new file"
        )


def _differs(recorded: dict[str, Any], current: dict[str, Any], key: str) -> bool:
    if key not in recorded and key not in current:
        return False
    if key == "width" and (recorded.get(key) is None or current.get(key) is None):
        return False  # only compared where both say
    return recorded.get(key) != current.get(key)


def read_runs(target: Path) -> dict[str, Any] | None:
    """``.NAME.run.json``'s runs (first-result digest -> provenance), read through the one
    safe reader; None when there is none.  Anything but what this tool writes is a usage
    error naming the file."""
    path = provenance_path(target)
    if not os.path.lexists(path):
        return None
    name = f"{path}: unreadable record of the earlier run"
    data = read_json_file(path, name)
    runs = data.get("runs") if isinstance(data, dict) and data.get(RUN_RECORD_MARK) == 1 else None
    if not isinstance(runs, dict) or not all(isinstance(v, dict) for v in runs.values()):
        raise UsageError(
            f"{path}: not the record of a run this tool writes; --force-resume to add to "
            f"{target} anyway, or write a new file"
        )
    return runs


def check_text_provenance(
    target: Path, fmt: str, sources: Iterable[Path], current: dict[str, Any], force: bool
) -> None:
    """Every file a jsonl/csv resume reads records from, checked against ``.NAME.run.json``
    (see the module docstring)."""
    try:
        runs = read_runs(target)
    except UsageError:
        if not force:
            raise
        runs = None
    for source in sources:
        digest = first_result_digest(source, fmt)
        if digest is None:
            continue  # no record with a result: nothing a model made
        if runs is None and not force:
            raise UsageError(
                f"{target}: {provenance_path(target).name}, the record of the run that wrote "
                f"{source.name}, is missing; --force-resume to add to it anyway, or write a "
                "new file"
            )
        if runs is not None and digest not in runs and not force:
            raise UsageError(
                f"{target}: {provenance_path(target).name} does not describe the records in "
                f"{source.name} (another run wrote them); --force-resume to add to it "
                "anyway, or write a new file"
            )
        check_provenance((runs or {}).get(digest), current, target, force)


def first_result_digest(path: Path, fmt: str) -> str | None:
    """SHA-256 of the first complete record line holding a result (not an error) in a jsonl
    or csv file this tool wrote (the header of a csv skipped); None when it has none."""
    import hashlib

    if not path.is_file():
        return None
    with _open_source(path) as handle:
        lines = bounded_lines(handle, str(path))
        header = next(lines, b"") if fmt == "csv" else b""
        classify = header.startswith(b"path,rank,")
        if fmt != "csv":
            lines = itertools.chain([header], lines) if header else lines
        for line in lines:
            if line.endswith(b"\n") and _holds_a_result(line, fmt, classify):
                return hashlib.sha256(line).hexdigest()
    return None


def _holds_a_result(line: bytes, fmt: str, classify: bool) -> bool:
    if fmt == "jsonl":
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return False
        return isinstance(record, dict) and "path" in record and "error" not in record
    try:
        row = next(csv.reader([line.decode("utf-8", "surrogateescape")]))
    except (csv.Error, StopIteration):
        return False
    if classify:
        return len(row) >= 6 and not row[-1]
    return len(row) >= 3 and not row[1]


def write_provenance(target: Path, fmt: str, provenance: dict[str, Any]) -> bool:
    """Record ``provenance`` for the records of ``.NAME.partial`` once it holds a result
    (False, nothing written, before that), keeping what is recorded for the other files
    the target's records are in (the target, ``.NAME.resume``) and dropping the rest."""
    from convnext_cli.outputs.files import partial_path

    digest = first_result_digest(partial_path(target), fmt)
    if digest is None:
        return False
    try:
        runs = read_runs(target) or {}
    except UsageError:
        runs = {}  # a forced resume over a file that is not ours: replaced
    keep = {first_result_digest(p, fmt) for p in (target, copy_path(target))} - {None}
    runs = {key: value for key, value in runs.items() if key in keep}
    runs[digest] = provenance
    path = provenance_path(target)
    temporary = path.with_name(path.name + ".tmp")
    data = {RUN_RECORD_MARK: 1, "runs": runs}
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)
    return True


class Forwarded(Generic[T]):
    """An attribute of a wrapper that is its ``writer``'s attribute of the same name, read
    and written through."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, wrapper: Any, owner: type | None = None) -> T:
        return cast(T, getattr(wrapper.writer, self.name))

    def __set__(self, wrapper: Any, value: T) -> None:
        setattr(wrapper.writer, self.name, value)


class RecordedWriter:
    """A jsonl/csv writer whose records' provenance is written to ``.NAME.run.json`` as
    soon as the file holds a result, in the same step as that batch (a signal is held
    around both by the caller), and never before."""

    records: Forwarded[int] = Forwarded()
    names_errors_on_stderr: Forwarded[bool] = Forwarded()

    def __init__(
        self,
        writer: Writer,
        target: Path,
        fmt: str,
        provenance: dict[str, Any] | None = None,
        created: list[Path] | None = None,
    ) -> None:
        self.writer = writer
        self.target, self.fmt = Path(os.path.realpath(target)), fmt
        self.provenance = provenance  # None until the model is loaded: nothing is recorded
        self.created = created if created is not None else []
        self.recorded = False

    def record(self) -> None:
        """Write the provenance if the file holds a result now (and it was not written)."""
        if self.recorded or self.provenance is None:
            return
        sidecar = provenance_path(self.target)
        existed = os.path.lexists(sidecar)
        self.recorded = write_provenance(self.target, self.fmt, self.provenance)
        if self.recorded and not existed:
            self.created.append(sidecar)

    def close(self) -> None:
        self.writer.close()

    def abort(self, keep: bool = False) -> None:
        self.writer.abort(keep)

    def write(self, results: list[Result]) -> None:
        self.writer.write(results)
        if not self.recorded and any(r.error is None for r in results):
            self.record()

    def __getattr__(self, name: str) -> Any:  # preserve, set_run_info: the writer's own
        return getattr(self.writer, name)


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
