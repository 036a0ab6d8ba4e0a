"""Parquet output for classify and embed, through pyarrow.

One row per input (the path as in CSV: the name itself, or a JSON string when it is not
plain; see :mod:`convnext_cli.outputs.names`):

- classify: ``path``, ``error`` (null on success), the top-1 as ``label`` / ``index`` /
  ``score``, and the top-k as ``predictions``, a list of ``{label, index, score}`` structs;
- embed: ``path``, ``error``, ``embedding`` as a fixed-size list of float32.

While a run goes, finished rows are written as small, complete Parquet files ("parts") in a
folder beside the target, ``.NAME.parts/``, each written under a temporary name and renamed,
one every ``rows_per_part`` rows (1024; ``CONVNEXT_PARQUET_ROWS_PER_PART``) or every 10
seconds, whichever comes first: a kill loses at most the rows of the part not yet written,
and memory stays bounded by one part.  At the end the parts are copied, row group by row
group, into one file beside the target, which is moved into place; the parts are removed.
The key-value metadata ``convnext_cli`` holds what wrote the file (tool version, model,
top-k, preprocessing) as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from convnext_cli.errors import ImageError, OutputError, UsageError, one_line
from convnext_cli.limits import MAX_PARQUET_ROWS_PER_PART, env_int
from convnext_cli.outputs.files import OutputFile
from convnext_cli.outputs.names import path_field, utf8_text
from convnext_cli.reading import open_regular_binary, parse_json

if TYPE_CHECKING:
    from convnext_cli.results import Result

METADATA_KEY = "convnext_cli"
ROWS_PER_PART = 1024
ROWS_PER_PART_ENV = "CONVNEXT_PARQUET_ROWS_PER_PART"
SECONDS_PER_PART = 10.0  # a part is also written once its oldest row is this old


def rows_per_part_from_env() -> int:
    """``CONVNEXT_PARQUET_ROWS_PER_PART`` (1 to 1,000,000), else 1024."""
    return env_int(ROWS_PER_PART_ENV, ROWS_PER_PART, 1, MAX_PARQUET_ROWS_PER_PART)


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


def features_schema(shapes: dict[str, tuple[int, ...]]) -> pa.Schema:
    """embed --stage / --backbone: one column per stage, a fixed-size list of float32 for a
    pooled (C,) feature, a fixed-shape tensor (C, H, W) column for a whole map."""
    columns = [("path", pa.string()), ("error", pa.string())]
    for name, shape in shapes.items():
        if len(shape) == 1:
            columns.append((name, pa.list_(pa.float32(), shape[0])))
        else:
            columns.append((name, pa.fixed_shape_tensor(pa.float32(), list(shape))))
    return pa.schema(columns)


def feature_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows of stage features as a table of ``schema`` (tensor columns built from flat
    storage; a failed input's tensors are null)."""
    arrays = []
    for column in schema:
        values = [row.get(column.name) for row in rows]
        if isinstance(column.type, pa.FixedShapeTensorType):
            storage = pa.array(
                [None if v is None else v.reshape(-1).tolist() for v in values],
                type=column.type.storage_type,
            )
            arrays.append(pa.ExtensionArray.from_storage(column.type, storage))
        elif pa.types.is_fixed_size_list(column.type):
            arrays.append(
                pa.array([None if v is None else v.tolist() for v in values], type=column.type)
            )
        else:
            arrays.append(pa.array(values, type=column.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def parquet_row(result: Result, task: str) -> dict[str, Any]:
    """One row for a result: the columns of ``CLASSIFY_SCHEMA`` or ``embed_schema``."""
    error = None if result.error is None else utf8_text(result.error)
    row: dict[str, Any] = {"path": path_field(result.path), "error": error}
    if task == "embed" and result.features is not None:
        row.update({name: value.float() for name, value in result.features.items()})
        return row
    if task == "embed":
        ok = result.embedding is not None and result.error is None
        row["embedding"] = result.embedding.float().tolist() if ok else None  # type: ignore[union-attr]
        return row
    predictions = [
        {"label": utf8_text(p.label), "index": p.index, "score": float(p.score)}
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


def parts_folder(target: Path) -> Path:
    return target.with_name(f".{target.name}.parts")


class ParquetRecordWriter:
    """The Parquet writer, with the life cycle every writer has (see :mod:`output_file`).

    ``raw`` is the locked output file beside the target: the finished file is written into
    it at ``close`` and moved into place.  Rows go to parts in ``.NAME.parts/`` as they come.
    A fresh run starts with no parts; with ``resume``, the target's rows and the parts an
    interrupted run left are kept (their error rows dropped with ``retry_errors``) and
    come first in the finished file.
    """

    names_errors_on_stderr = False

    def __init__(
        self,
        raw: OutputFile,
        task: str,
        metadata: dict[str, Any] | None = None,
        resume: bool = False,
        retry_errors: bool = False,
        rows_per_part: int | None = None,
    ) -> None:
        if task not in ("classify", "embed"):
            raise ValueError(f"unknown task {task!r}")
        self.raw = raw
        self.target = raw.target
        self.task = task
        self.metadata = {METADATA_KEY: json.dumps(metadata or {}, sort_keys=True)}
        self.rows_per_part = rows_per_part or rows_per_part_from_env()
        self.retry_errors = retry_errors
        self.parts = parts_folder(self.target)
        if not resume:
            shutil.rmtree(self.parts, ignore_errors=True)
        self.parts.mkdir(exist_ok=True)
        self.earlier = sorted(self.parts.glob("part-*.parquet"), key=_part_number)
        if resume and self.target.is_file():
            self.earlier.insert(0, self.target)
        self.next_part = 1 + max((_part_number(p) for p in self.earlier), default=-1)
        self.pending: list[dict[str, Any]] = []
        self.pending_since = time.monotonic()
        self.dim: int | None = None
        self.shapes: dict[str, tuple[int, ...]] | None = None  # embed --stage / --backbone
        self.records = 0

    # rows -----------------------------------------------------------------------------

    def write(self, results: list[Result]) -> None:
        if not self.pending:
            self.pending_since = time.monotonic()
        for result in results:
            self.pending.append(self._row(result))
        self.records += len(results)
        due = (
            len(self.pending) >= self.rows_per_part
            or time.monotonic() - self.pending_since >= SECONDS_PER_PART
        )
        if due and (self.task == "classify" or self.dim or self.shapes):
            self._flush()

    def _row(self, result: Result) -> dict[str, Any]:
        if result.features is not None:
            shapes = {name: tuple(v.shape) for name, v in result.features.items()}
            if self.shapes is None:
                self.shapes = shapes
            elif shapes != self.shapes:  # --pool none maps of images of several sizes
                raise OutputError(
                    f"{self.raw.display}: {result.path}: features of shape "
                    f"{list(shapes.values())} after {list(self.shapes.values())}; a Parquet "
                    "column holds one shape (resize the images, or use --pool avg)"
                )
        row = parquet_row(result, self.task)
        if row.get("embedding") is not None:
            self.dim = self.dim or len(row["embedding"])
        return row

    def _schema(self) -> pa.Schema:
        return CLASSIFY_SCHEMA if self.task == "classify" else embed_schema(self.dim)

    def _flush(self) -> None:
        if not self.pending:
            return
        if self.shapes is not None:
            table = feature_table(self.pending, features_schema(self.shapes))
        else:
            table = pa.Table.from_pylist(self.pending, schema=self._schema())
        final = self.parts / f"part-{self.next_part:06d}.parquet"
        temporary = final.with_suffix(".tmp")
        pq.write_table(table.replace_schema_metadata(self.metadata), temporary)
        os.replace(temporary, final)
        self.next_part += 1
        self.pending = []

    # life cycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Write what is pending, then the earlier rows and the parts as one file."""
        self._flush_any()
        new = [p for p in sorted(self.parts.glob("part-*.parquet"), key=_part_number)]
        new = [p for p in new if p not in self.earlier]
        schema = self._final_schema([*self.earlier, *new]).with_metadata(self.metadata)
        with pq.ParquetWriter(self.raw.file, schema) as out:
            for source in [*self.earlier, *new]:
                drop_errors = self.retry_errors and source in self.earlier
                for table in _row_groups([source]):
                    if drop_errors:
                        table = table.filter(pc.is_null(table.column("error")))
                    try:
                        table = table.cast(schema)
                    except (pa.ArrowException, ValueError) as exc:
                        raise OutputError(
                            f"{self.raw.display}: {source.name} holds rows of another shape "
                            f"({one_line(exc)}); write a new file"
                        ) from None
                    out.write_table(table)
        self.raw.commit()
        shutil.rmtree(self.parts, ignore_errors=True)

    def abort(self, keep: bool = False) -> None:
        """``keep`` (a resumed run, or a kill): every finished row stays on disk as a part
        for ``--resume``; else (an error ended a fresh run) the parts go with the partial
        file.  The target is untouched either way."""
        try:
            if keep:
                self._flush_any()
            elif not self.raw.done and not [p for p in self.earlier if p != self.target]:
                shutil.rmtree(self.parts, ignore_errors=True)  # only this run's rows
        finally:
            self.raw.abort(keep)

    def _flush_any(self) -> None:
        if self.shapes is None and self.pending and _features_in(self.earlier):
            self.shapes = _features_in(self.earlier)
        if self.task == "embed" and self.dim is None and self.pending and self.shapes is None:
            self.dim = _dim_in(self.earlier)
        self._flush()

    def _final_schema(self, sources: list[Path]) -> pa.Schema:
        if self.task == "classify":
            return CLASSIFY_SCHEMA
        shapes = self.shapes or _features_in(sources)
        if shapes:
            return features_schema(shapes)
        return embed_schema(self.dim or _dim_in(sources))


def _part_number(path: Path) -> int:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _features_in(paths: Iterable[Path]) -> dict[str, tuple[int, ...]] | None:
    """The stage columns and shapes of earlier files (embed --stage), if they have them."""
    for path in paths:
        schema = pq.read_schema(path)
        if "embedding" in schema.names:
            return None
        shapes: dict[str, tuple[int, ...]] = {}
        for column in schema:
            if isinstance(column.type, pa.FixedShapeTensorType):
                shapes[column.name] = tuple(column.type.shape)
            elif pa.types.is_fixed_size_list(column.type):
                shapes[column.name] = (int(column.type.list_size),)
        return shapes or None
    return None


def _dim_in(paths: Iterable[Path]) -> int | None:
    """The embedding width recorded in earlier files, if any has one."""
    for path in paths:
        schema = pq.read_schema(path)
        if "embedding" not in schema.names:
            continue
        field = schema.field("embedding")
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
    try:
        raw = pq.read_schema(path).metadata or {}
        value = raw.get(METADATA_KEY.encode())
        found = parse_json(value, str(path)) if value else None
    except (pa.ArrowException, OSError, ValueError, UsageError):
        return None
    return found if isinstance(found, dict) else None


def written_by(target: Path) -> dict[str, Any] | None:
    """The metadata of the target, else of the first readable part an interrupted run left."""
    for source in earlier_sources(target):
        found = read_metadata(source)
        if found is not None:
            return found
    return None


def earlier_sources(target: Path) -> list[Path]:
    """The files a resumed run keeps rows from: the target, then an interrupted run's parts."""
    parts = sorted(parts_folder(target).glob("part-*.parquet"), key=_part_number)
    return [p for p in [target, *parts] if p.is_file()]


def check_earlier(target: Path, command: str, current: dict[str, Any], force: bool) -> list[Path]:
    """The files a resumed run keeps rows from (:func:`earlier_sources`), each checked: a
    Parquet file with this tool's columns for ``command`` and the ``convnext_cli`` metadata
    of the run that wrote it, which must match ``current`` (see resume.check_provenance).
    Anything else is a usage error naming the file; a part an interrupted run left that
    cannot be read at all is skipped (its rows are done again)."""
    from convnext_cli.outputs.resume import check_provenance

    readable = []
    for source in earlier_sources(target):
        try:
            with open_regular_binary(source) as handle:
                schema = pq.read_schema(handle)
        except (pa.ArrowException, OSError, ValueError, ImageError) as exc:
            if source != target:
                continue  # a part cut off: redone
            raise UsageError(
                f"{source}: not a Parquet file this tool wrote ({one_line(exc)})"
            ) from None
        if not _our_columns(schema, command):
            raise UsageError(
                f"{source}: not a Parquet file this tool wrote for {command} (columns "
                f"{', '.join(schema.names)}); write a new file"
            )
        found = read_metadata(source)
        if found is None:
            raise UsageError(
                f"{source}: no record of the run that wrote it ({METADATA_KEY} metadata); "
                "write a new file"
            )
        check_provenance(found, current, target, force)
        readable.append(source)
    return readable


def _our_columns(schema: pa.Schema, command: str) -> bool:
    """The columns this tool writes for ``command`` (any embedding width or stage shape)."""
    if command == "classify":
        return schema.remove_metadata().equals(CLASSIFY_SCHEMA)
    if schema.names[:2] != ["path", "error"] or len(schema.names) < 3:
        return False
    if not all(pa.types.is_string(schema.field(n).type) for n in ("path", "error")):
        return False
    for field in list(schema)[2:]:
        kind = field.type
        if isinstance(kind, pa.FixedShapeTensorType):
            ok = kind.value_type == pa.float32()
        elif pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind):
            ok = kind.value_type == pa.float32()
        else:
            ok = False
        if not ok:
            return False
    return True
