"""Units of work for a distributed run: what the driver lists, never the inputs inside them.

A unit is one of:

- ``tar``: a WebDataset ``.tar`` shard (its members are listed by the read task, inside
  the cluster);
- ``parquet``: a slice of at most :func:`unit_rows` rows of one row group of a Parquet file
  (the driver reads the file's footer for the row counts; the ids and image cells are read
  inside the cluster), or a whole Parquet file whose footer cannot be read (its read task
  then gives the one error record, as the local engine does);
- ``files``: a chunk of at most :func:`unit_rows` loose files, from a folder listing
  (listed lazily, a block at a time), a glob, the command line or stdin;
- ``refs``: for streams to stdout or one file (and the Python API), a chunk of inputs the
  driver listed (members included) as the local engine lists them, ids already given.

The driver holds the units of one window (:func:`windows`): memory O(units in a window),
whatever the number of inputs.  A unit's name (``SEQ-LABEL-DIGEST``: its place in the
listing, a readable label, a digest of what it holds) is the same for the same inputs in
every run, so that ``-o DIR --resume`` skips the units already complete.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from convnext_cli.errors import NoInputsError, UsageError
from convnext_cli.inputs.datasets import TAR_SUFFIXES, is_dataset_file, parquet_layout
from convnext_cli.inputs.expand import InputRef, listed_chunks

UNIT_ROWS = 1024  # inputs per unit of loose files or Parquet rows (a part of -o DIR)
STREAM_UNIT_ROWS = 64  # inputs per unit of a stream (a read task, decoded by one task)
UNIT_ROWS_ENV = "CONVNEXT_RAY_UNIT_ROWS"
WINDOW_UNITS = 4096  # units handed to one Ray Data execution
FIRST_WINDOW_UNITS = 64  # the first execution's: its first parts come sooner
WINDOW_REFS = 250_000  # inputs held by the driver in one window's ``refs`` units


def unit_rows(default: int = UNIT_ROWS) -> int:
    """``default``, or ``CONVNEXT_RAY_UNIT_ROWS`` (1 to 1,000,000) when set."""
    raw = os.environ.get(UNIT_ROWS_ENV, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 1_000_000:
        raise UsageError(f"{UNIT_ROWS_ENV}={raw!r}: use a whole number from 1 to 1000000")
    return int(raw)


@dataclass(frozen=True)
class Unit:
    """One unit of work; see the module docstring."""

    seq: int
    name: str
    kind: str  # "files", "refs", "tar" or "parquet"
    file: str | None = None
    refs: tuple[bytes, ...] = ()  # files, refs: the inputs, encoded (stages.encode_ref)
    row_group: int | None = None  # parquet: None for the whole file
    rows: tuple[int, int, int] = (0, 0, 0)  # parquet: start, stop, file row of the group's 0
    image_column: str | None = None
    id_column: str | None = None

    @property
    def input(self) -> str:
        """What the unit holds, for its status file."""
        if self.kind in ("refs", "files"):
            named = self.refs[0].decode("utf-8", "replace") if self.refs else ""
            return f"{len(self.refs)} inputs from {named}"
        if self.kind == "parquet" and self.row_group is not None:
            start, stop, first = self.rows
            return f"{self.file} rows {first + start}-{first + stop - 1}"
        return str(self.file)

    @property
    def weight(self) -> int:
        """Inputs the driver holds for it (its refs)."""
        return len(self.refs)


_LABEL = re.compile(r"[^A-Za-z0-9._+-]+")


def make_unit(seq: int, kind: str, **fields: Any) -> Unit:
    """A unit with its name: ``SEQ-LABEL-DIGEST``."""
    digest = hashlib.sha1(repr((kind, sorted(fields.items()))).encode("utf-8", "surrogateescape"))
    file = fields.get("file")
    label = "files" if file is None else _LABEL.sub("_", os.path.basename(file))[:40]
    if kind == "parquet" and fields.get("row_group") is not None:
        label = f"{label[:30]}.g{fields['row_group']}.{fields['rows'][0]}"
    name = f"{seq:08d}-{label}-{digest.hexdigest()[:10]}"
    return Unit(seq, name, kind, **fields)


def refs_units(refs: Iterable[InputRef], size: int | None = None) -> Iterator[Unit]:
    """Inputs already listed (members and rows included), in units of ``size`` (None:
    :func:`unit_rows`)."""
    from convnext_cli.engine.ray.stages import encode_ref

    size = size or unit_rows()
    iterator = iter(refs)
    for seq in itertools.count():
        chunk = tuple(encode_ref(ref) for ref in itertools.islice(iterator, size))
        if not chunk:
            return
        yield make_unit(seq, "refs", refs=chunk)


def iter_units(
    inputs: list[str],
    recursive: bool = False,
    stdin: IO[Any] | None = None,
    warn: Callable[[str], None] | None = None,
    null_separated: bool = False,
    columns: tuple[str | None, str | None] = (None, None),
) -> Iterator[Unit]:
    """The units INPUTS name, in listing order, as they are listed: shards and Parquet row
    groups one by one (never their members), loose files in chunks.  ``columns``: the
    ``--image-column`` and ``--id-column``.  NoInputsError when there is none."""
    seq = itertools.count()
    size = unit_rows()
    pending: list[str] = []
    found = False
    for paths, datasets in listed_chunks(inputs, recursive, stdin, warn, null_separated):
        if not datasets:
            pending += paths
        for path in paths if datasets else ():
            if not is_dataset_file(path):
                pending.append(path)
                continue
            yield from _files(seq, pending, 1)
            pending.clear()
            for unit in _dataset_units(seq, path, size, columns):
                found = True
                yield unit
        if len(pending) >= size:
            found = True
            yield from _files(seq, pending, size)
            del pending[: len(pending) - len(pending) % size]
    if pending:
        found = True
        yield from _files(seq, pending, 1)
    if not found:
        raise NoInputsError("no input images found")


def _files(seq: Iterator[int], paths: list[str], least: int) -> Iterator[Unit]:
    """Units of the paths, in chunks of unit_rows(); a last chunk shorter than ``least``
    stays in ``paths`` (the caller keeps it for the next listing)."""
    size = unit_rows()
    whole = len(paths) - len(paths) % size if least > 1 else len(paths)
    for start in range(0, whole, size):
        chunk = tuple(os.fsencode(p) for p in paths[start : start + size])
        yield make_unit(next(seq), "files", refs=chunk)


def _dataset_units(
    seq: Iterator[int], path: str, size: int, columns: tuple[str | None, str | None]
) -> Iterator[Unit]:
    if path.lower().endswith(TAR_SUFFIXES):
        yield make_unit(next(seq), "tar", file=path)
        return
    image, ident = columns
    layout = parquet_layout(path)
    if not layout:
        yield make_unit(next(seq), "parquet", file=path, image_column=image, id_column=ident)
        return
    first = 0
    for group, count in enumerate(layout):
        for start in range(0, count, size):
            rows = (start, min(count, start + size), first)
            yield make_unit(
                next(seq),
                "parquet",
                file=path,
                row_group=group,
                rows=rows,
                image_column=image,
                id_column=ident,
            )
        first += count


def windows(units: Iterable[Unit]) -> Iterator[list[Unit]]:
    """The units, in lists of at most WINDOW_UNITS units holding at most WINDOW_REFS inputs
    (the first at most FIRST_WINDOW_UNITS): one Ray Data execution each."""
    window: list[Unit] = []
    weight = 0
    limit = FIRST_WINDOW_UNITS
    for unit in units:
        if window and (len(window) >= limit or weight + unit.weight > WINDOW_REFS):
            yield window
            window, weight, limit = [], 0, WINDOW_UNITS
        window.append(unit)
        weight += unit.weight
    if window:
        yield window
