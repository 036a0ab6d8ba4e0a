"""Parquet output for classify and embed, through pyarrow.

One row per input:

- classify: ``path``, ``error`` (null on success), the top-1 as ``label`` / ``index`` /
  ``score``, and the top-k as ``predictions``, a list of ``{label, index, score}`` structs;
- embed: ``path``, ``error``, ``embedding`` as a fixed-size list of float32.

While a run goes, finished rows are written as small, complete Parquet files ("parts") in a
folder beside the target, ``.NAME.parts/``, each written under a temporary name and renamed,
one every ``rows_per_part`` rows: a kill loses at most the rows of the part not yet written,
and memory stays bounded by one part.  At the end the parts are copied, row group by row
group, into one file beside the target, which is moved into place; the parts are removed.
The key-value metadata ``convnext_cli`` holds what wrote the file (tool version, model,
top-k, preprocessing) as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from convnext_cli.pipeline import Result

METADATA_KEY = "convnext_cli"
ROWS_PER_PART = 1024

PREDICTION = pa.struct([("label", pa.string()), ("index", pa.int32()), ("score", pa.float64())])
CLASSIFY_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("error", pa.string()),
        ("label", pa.string()),
        ("index", pa.int32()),
        ("score", pa.float64()),
        ("predictions", pa.list_(PREDICTION)),
    ]
)


def embed_schema(dim: int | None) -> pa.Schema:
    vector = pa.list_(pa.float32(), dim) if dim is not None else pa.list_(pa.float32())
    return pa.schema([("path", pa.string()), ("error", pa.string()), ("embedding", vector)])


def text(value: str) -> str:
    """Parquet strings are UTF-8: a name's undecodable bytes become ``\\udcXX`` escapes."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def parts_folder(target: Path) -> Path:
    return target.with_name(f".{target.name}.parts")


class ParquetRecordWriter:
    """Rows per batch into parts beside ``target``; ``close`` assembles and moves into place."""

    def __init__(
        self,
        target: Path,
        task: str,
        metadata: dict[str, Any] | None = None,
        rows_per_part: int = ROWS_PER_PART,
    ) -> None:
        if task not in ("classify", "embed"):
            raise ValueError(f"unknown task {task!r}")
        self.target = target
        self.task = task
        self.metadata = {METADATA_KEY: json.dumps(metadata or {}, sort_keys=True)}
        self.rows_per_part = rows_per_part
        self.parts = parts_folder(target)
        self.parts.mkdir(exist_ok=True)
        self.next_part = 1 + max(
            (_part_number(p) for p in self.parts.glob("part-*.parquet")), default=-1
        )
        self.pending: list[dict[str, Any]] = []
        self.dim: int | None = None

    # rows -----------------------------------------------------------------------------

    def write(self, results: list[Result]) -> None:
        for result in results:
            self.pending.append(self._row(result))
        if len(self.pending) >= self.rows_per_part and (self.task == "classify" or self.dim):
            self._flush()

    def _row(self, result: Result) -> dict[str, Any]:
        row: dict[str, Any] = {"path": text(result.path), "error": result.error}
        if self.task == "embed":
            if result.embedding is not None and result.error is None:
                values = result.embedding.float().tolist()
                self.dim = self.dim or len(values)
                row["embedding"] = values
            else:
                row["embedding"] = None
            return row
        predictions = [
            {"label": p.label, "index": p.index, "score": float(p.score)}
            for p in result.predictions
        ]
        top = predictions[0] if predictions and result.error is None else None
        row.update(
            label=top["label"] if top else None,
            index=top["index"] if top else None,
            score=top["score"] if top else None,
            predictions=predictions if result.error is None else None,
        )
        return row

    def _schema(self) -> pa.Schema:
        return CLASSIFY_SCHEMA if self.task == "classify" else embed_schema(self.dim)

    def _flush(self) -> None:
        if not self.pending:
            return
        table = pa.Table.from_pylist(self.pending, schema=self._schema())
        final = self.parts / f"part-{self.next_part:06d}.parquet"
        temporary = final.with_suffix(".tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, final)
        self.next_part += 1
        self.pending = []

    # life cycle ---------------------------------------------------------------------

    def close(self, before: Iterable[Path] = ()) -> None:
        """Write what is pending, then ``before`` files and the parts as one file at ``target``."""
        self._flush_any()
        sources = [*before, *sorted(self.parts.glob("part-*.parquet"), key=_part_number)]
        temporary = self.target.with_name(f".{self.target.name}.tmp")
        schema = self._final_schema(sources)
        with pq.ParquetWriter(temporary, schema.with_metadata(self.metadata)) as out:
            for table in _row_groups(sources):
                out.write_table(table.cast(schema))
        os.replace(temporary, self.target)
        shutil.rmtree(self.parts, ignore_errors=True)

    def abort(self) -> None:
        """Keep every finished row on disk as a part (for ``--resume``); write no target."""
        self._flush_any()

    def _flush_any(self) -> None:
        if self.task == "embed" and self.dim is None and self.pending:
            self.dim = _dim_in(self.parts.glob("part-*.parquet"))
        self._flush()

    def _final_schema(self, sources: list[Path]) -> pa.Schema:
        if self.task == "classify":
            return CLASSIFY_SCHEMA
        return embed_schema(self.dim or _dim_in(sources))


def _part_number(path: Path) -> int:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _dim_in(paths: Iterable[Path]) -> int | None:
    """The embedding width recorded in earlier files, if any has one."""
    for path in paths:
        field = pq.read_schema(path).field("embedding")
        if pa.types.is_fixed_size_list(field.type):
            return int(field.type.list_size)
    return None


def _row_groups(paths: Iterable[Path]) -> Iterator[pa.Table]:
    for path in paths:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group)


def read_metadata(path: Path) -> dict[str, Any] | None:
    """What wrote a Parquet file (the ``convnext_cli`` key-value metadata), if anything did."""
    raw = pq.read_schema(path).metadata or {}
    value = raw.get(METADATA_KEY.encode())
    return json.loads(value) if value else None
