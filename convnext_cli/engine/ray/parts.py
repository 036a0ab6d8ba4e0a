"""``-o DIR`` on Ray: one Parquet part per unit, written by the cluster, and a status file
beside it; what a folder holds already, for ``--resume``.

A unit ``U`` (see :mod:`~convnext_cli.engine.ray.units`) ends as two files in DIR:

- ``U.parquet``: its records, one row per input, in the unit's order, with the project's
  Parquet columns and the run's provenance in the ``convnext_cli`` metadata;
- ``U.status.json``: ``{"unit", "input", "rows", "errors", "seconds", "part",
  "provenance"}`` (as img2dataset's per-shard stats), written once the part is in place.

The model actors write each batch's rows of a unit as a hidden piece
(``.U.rFIRST-LAST.piece``, under a temporary name then renamed); once every row of the unit
is in a piece, a small task in the cluster joins the pieces into ``U.parquet`` (a
temporary name, then renamed), writes the status and removes the pieces.  A unit is
complete when its status file exists: ``--resume`` lists the folder (it reads the status
files, never the records), skips the complete units and removes everything else of this
tool's (pieces, temporary files, a part without its status) before redoing the rest.
Nothing that does not match these names is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnext_cli.engine.ray.settings import PartFiles
from convnext_cli.engine.task import Task
from convnext_cli.outputs.parquet import CLASSIFY_SCHEMA, METADATA_KEY, embed_schema, parquet_row

if TYPE_CHECKING:
    import pyarrow as pa

    from convnext_cli.results import Result

UNIT_NAME = r"\d{8}-[A-Za-z0-9._+-]{0,48}-[0-9a-f]{10}"
_PART = re.compile(rf"^({UNIT_NAME})\.parquet$")
_STATUS = re.compile(rf"^({UNIT_NAME})\.status\.json$")
_SCRAP = re.compile(rf"^\.({UNIT_NAME})\.(r\d+-\d+\.piece|.*\.tmp)$")
STATUS_SUFFIX = ".status.json"
MAX_STATUS_BYTES = 1 << 20


def _replace_atomically(data: bytes, final: Path) -> None:
    temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as out:
        out.write(data)
    os.replace(temporary, final)


def schema_for(task: Task, dim: int, metadata: Mapping[str, Any]) -> pa.Schema:
    schema = CLASSIFY_SCHEMA if task.command == "classify" else embed_schema(dim)
    return schema.with_metadata({METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)})


def write_piece(
    keys: pa.Table, results: list[Result], task: Task, dim: int, parts: PartFiles
) -> pa.Table:
    """In a model actor: the batch's records, one piece per unit and run of consecutive
    rows, named by the unit and the rows (a retried batch rewrites the same names); returns
    the keys with ``error`` and ``piece`` for the driver's count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    units = keys.column("unit").to_pylist()
    rows = keys.column("row").to_pylist()
    schema = schema_for(task, dim, parts.metadata)
    names: list[str] = [""] * len(units)
    for unit, indices in _runs(units, rows).items():
        for run in indices:
            name = f".{unit}.r{rows[run[0]]:09d}-{rows[run[-1]]:09d}.piece"
            records = [parquet_row(results[i], task.command) for i in run]
            table = pa.Table.from_pylist(records, schema=schema)
            final = Path(parts.folder) / name
            temporary = final.with_name(f"{name}.{os.getpid()}.tmp")
            pq.write_table(table, temporary)
            os.replace(temporary, final)
            for i in run:
                names[i] = name
    errors = pa.array([r.error for r in results], pa.string())
    return keys.append_column("error", errors).append_column("piece", pa.array(names))


def _runs(units: list[str], rows: list[int]) -> dict[str, list[list[int]]]:
    """Per unit, its rows' positions in the batch, in runs of consecutive row numbers."""
    by_unit: dict[str, list[int]] = {}
    for i, unit in enumerate(units):
        by_unit.setdefault(unit, []).append(i)
    runs: dict[str, list[list[int]]] = {}
    for unit, indices in by_unit.items():
        indices.sort(key=rows.__getitem__)
        current = [indices[0]]
        runs[unit] = [current]
        for i in indices[1:]:
            if rows[i] == rows[current[-1]] + 1:
                current.append(i)
            else:
                current = [i]
                runs[unit].append(current)
    return runs


@dataclass(frozen=True)
class UnitDone:
    """What the driver counted of a unit, for its status."""

    unit: str
    input: str
    rows: int
    errors: int
    started: float
    pieces: tuple[str, ...]


def finish_unit(folder: str, done: UnitDone, metadata: Mapping[str, Any]) -> str:
    """In the cluster, once every row of a unit is in a piece: the pieces joined into
    ``UNIT.parquet`` (a temporary name, then renamed), the status written, the pieces
    removed.  Returns the unit's name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = Path(folder)
    part = None
    if done.pieces:
        part = f"{done.unit}.parquet"
        pieces = sorted(done.pieces)
        if len(pieces) == 1:
            os.replace(target / pieces[0], target / part)
        else:
            table = pa.concat_tables(pq.read_table(target / name) for name in pieces)
            temporary = target / f".{part}.{os.getpid()}.tmp"
            pq.write_table(table, temporary)
            os.replace(temporary, target / part)
    status = {
        "unit": done.unit,
        "input": done.input,
        "rows": done.rows,
        "errors": done.errors,
        "seconds": round(max(0.0, time.time() - done.started), 3) if done.started else 0.0,
        "part": part,
        "provenance": dict(metadata),
    }
    data = json.dumps(status, sort_keys=True).encode("utf-8")
    _replace_atomically(data, target / f"{done.unit}{STATUS_SUFFIX}")
    for name in done.pieces:
        with contextlib.suppress(OSError):
            (target / name).unlink()
    return done.unit


def complete_units(folder: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The units whose status file is in ``folder`` (name -> status); a status that is
    not this tool's (unreadable, not a JSON object, too large) does not count."""
    from convnext_cli.reading import read_json_file

    target = Path(folder)
    found: dict[str, dict[str, Any]] = {}
    if not target.is_dir():
        return found
    with os.scandir(target) as listing:
        for entry in listing:
            match = _STATUS.match(entry.name)
            if match is None:
                continue
            try:
                status = read_json_file(Path(entry.path), entry.name)
            except Exception:
                continue
            if isinstance(status, dict) and status.get("unit") == match.group(1):
                found[match.group(1)] = status
    return found


def clear_unfinished(
    folder: str | os.PathLike[str], keep: Iterable[str], shard: tuple[int, int] = (0, 1)
) -> int:
    """Remove this tool's files of the units not in ``keep``: pieces and temporary files, a
    part or status of a unit not kept; with ``shard`` (I, N), only those of the units of
    that shard (a unit's place in the listing, modulo N, is I), so that other shards' runs
    into the same folder are left alone.  Returns how many were removed."""
    kept = set(keep)
    index, count = shard
    removed = 0
    with os.scandir(folder) as listing:
        names = [entry.name for entry in listing]
    for name in names:
        scrap = _SCRAP.match(name)
        final = _PART.match(name) or _STATUS.match(name)
        found = scrap or final
        unit = found.group(1) if found is not None else None
        if unit is None or int(unit[:8]) % count != index:
            continue
        if scrap is None and unit in kept:
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, name))
            removed += 1
    return removed


def shared_ids(folder: str | os.PathLike[str], units: Iterable[str]) -> tuple[int, str | None]:
    """Across the parts of ``units``: how many records have a ``path`` that a record of
    another part has too (ids are unique within a unit, see units.py), and one of them.

    Reads the ``path`` column of each part, one at a time; memory holds one 8-byte hash per
    record (80 MB at ten million), never the paths."""
    import numpy as np
    import pyarrow.parquet as pq

    hashes = []
    parts = []
    for unit in units:
        part = Path(folder) / f"{unit}.parquet"
        if not part.exists():
            continue
        paths = pq.read_table(part, columns=["path"]).column(0).to_pylist()
        hashes.append(np.fromiter((hash(p) for p in paths), np.int64, len(paths)))
        parts.append(part)
    if not hashes:
        return 0, None
    every = np.concatenate(hashes)
    ordered = np.sort(every)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size == 0:
        return 0, None
    wanted = set(np.unique(repeated).tolist())
    shared = int(np.isin(every, np.fromiter(wanted, np.int64)).sum())
    example = None
    for part in parts:
        for path in pq.read_table(part, columns=["path"]).column(0).to_pylist():
            if hash(path) in wanted:
                example = path
                break
        if example is not None:
            break
    return shared, example
