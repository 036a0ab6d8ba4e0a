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

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convnext_cli.errors import UsageError
from convnext_cli.names import read_path_field

RESUMABLE_FORMATS = ("jsonl", "csv", "parquet")
# what must match between the run that wrote a file and the one resuming it
PROVENANCE_KEYS = ("command", "model", "config", "top_k", "normalize", "preprocess")


def provenance_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.run.json")


def copy_path(target: Path) -> Path:
    """Where a resuming run copies the kept records before rewriting the partial file."""
    return target.with_name(f".{target.name}.resume")


@dataclass
class Recorded:
    """The records kept from earlier runs, in the order they were found."""

    lines: list[bytes] = field(default_factory=list)  # text formats: raw records, kept
    header: bytes = b""  # CSV: the header line of the file the records came from
    ids: set[str] = field(default_factory=set)
    errors_dropped: int = 0
    torn: int = 0

    def add(self, record_id: str, raw: bytes, is_error: bool, retry_errors: bool) -> None:
        if record_id in self.ids:
            return
        if is_error and retry_errors:
            self.errors_dropped += 1
            return
        self.ids.add(record_id)
        self.lines.append(raw)


# ------------------------------------------------------------------------ provenance


def check_provenance(
    recorded: dict[str, Any] | None, current: dict[str, Any], target: Path, force: bool
) -> None:
    """Refuse to resume a file written by a different model, top-k or preprocessing."""
    if recorded is None or force:
        return
    different = [k for k in PROVENANCE_KEYS if recorded.get(k) != current.get(k)]
    if different:
        what = ", ".join(different)
        raise UsageError(
            f"{target}: written by a different run ({what} differ); "
            "--force-resume to add to it anyway, or write a new file"
        )


def read_provenance(target: Path) -> dict[str, Any] | None:
    path = provenance_path(target)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable record of the earlier run ({exc})") from exc
    return data if isinstance(data, dict) else None


def write_provenance(target: Path, provenance: dict[str, Any]) -> None:
    path = provenance_path(target)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(provenance, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)


# ---------------------------------------------------------------------- text formats


def text_sources(target: Path) -> list[Path]:
    """The target and what interrupted runs left beside it, newest state first."""
    from convnext_cli.output_file import partial_path

    return [p for p in (copy_path(target), partial_path(target), target) if p.is_file()]


def read_text_records(
    sources: Iterable[Path], fmt: str, retry_errors: bool, top_k: int | None = None
) -> Recorded:
    recorded = Recorded()
    for source in sources:
        data = source.read_bytes()
        if fmt == "jsonl":
            _jsonl_records(data, recorded, retry_errors)
        else:
            _csv_records(data, recorded, retry_errors, top_k)
    return recorded


def _jsonl_records(data: bytes, recorded: Recorded, retry_errors: bool) -> None:
    for raw in data.splitlines(keepends=True):
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("torn")
            record = json.loads(raw)
            record_id = record["path"]
            complete = "error" in record or "predictions" in record or "embedding" in record
            if not isinstance(record_id, str) or not complete:
                raise ValueError("incomplete")
        except (ValueError, KeyError, TypeError):
            if raw.strip():
                recorded.torn += 1
            continue
        recorded.add(record_id, raw, "error" in record, retry_errors)


def csv_header(data: bytes) -> bytes:
    end = data.find(b"\n")
    return data[: end + 1] if end >= 0 else b""


def _csv_records(data: bytes, recorded: Recorded, retry_errors: bool, top_k: int | None) -> None:
    """Rows grouped by path (classify writes one row per rank); the last group may be torn."""
    header = csv_header(data)
    recorded.header = recorded.header or header
    body = data[len(header) :]
    complete = body.endswith(b"\n")
    groups = list(_csv_groups(body, classify=header.startswith(b"path,rank,")))
    for n, (record_id, raw, is_error, ranks) in enumerate(groups):
        last = n == len(groups) - 1
        short = top_k is not None and not is_error and ranks is not None and ranks < top_k
        if last and (not complete or short):
            recorded.torn += 1
            continue
        recorded.add(record_id, raw, is_error, retry_errors)


def _csv_groups(body: bytes, classify: bool) -> Iterator[tuple[str, bytes, bool, int | None]]:
    """(id, raw rows, is error, number of rank rows or None for embed rows)."""
    text = body.decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    current: str | None = None
    rows: list[list[str]] = []
    for row in reader:
        if not row:
            continue
        if current is not None and row[0] != current:
            yield _csv_group(current, rows, classify)
            rows = []
        current = row[0]
        rows.append(row)
    if current is not None:
        yield _csv_group(current, rows, classify)


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


# ------------------------------------------------------------------------------ parquet


def read_parquet_ids(sources: Iterable[Path], retry_errors: bool) -> Recorded:
    """Ids recorded in Parquet files (the target and the parts of an interrupted run)."""
    import pyarrow.parquet as pq

    recorded = Recorded()
    for source in sources:
        try:
            table = pq.read_table(source, columns=["path", "error"])
        except Exception:  # a part cut off by a kill: its rows are done again
            recorded.torn += 1
            continue
        for path, error in zip(
            table.column("path").to_pylist(), table.column("error").to_pylist(), strict=True
        ):
            record_id = read_path_field(path)
            if record_id in recorded.ids:
                continue
            if error is not None and retry_errors:
                recorded.errors_dropped += 1
                continue
            recorded.ids.add(record_id)
    return recorded
