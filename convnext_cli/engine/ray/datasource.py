"""The read stage of a distributed run: a Ray Data ``Datasource`` with one read task per
unit, which turns the unit into rows inside the cluster.

A read task lists its unit's inputs with the local engine's own readers (a shard's members
through the bounded, non-blocking tar reader; a Parquet slice's ids through the safe
opener), gives each an id of its own within the unit (``ID#N`` for a later input with an
id already seen in the unit, as :class:`~convnext_cli.inputs.expand.UniqueIds` does), and
yields blocks of rows that hold references, never image bytes (the decode tasks read them).
Columns: see :mod:`~convnext_cli.engine.ray.stages`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from convnext_cli.engine.ray.stages import decode_ref, encode_ref, id_bytes
from convnext_cli.engine.ray.units import Unit
from convnext_cli.inputs.datasets import dataset_items, parquet_slice_items
from convnext_cli.inputs.expand import InputRef, UniqueIds, input_id
from convnext_cli.reading import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    import pyarrow as pa

BLOCK_ROWS = 256  # rows per block a read task yields


def unit_inputs(unit: Unit) -> Iterator[InputRef]:
    """The inputs of a unit, in order, each with its id within the unit (``refs``: the ids
    the driver gave them)."""
    if unit.kind in ("refs", "files"):
        listed: Iterator[InputRef] = (decode_ref(raw) for raw in unit.refs)
        if unit.kind == "refs":
            return listed
    elif unit.kind == "parquet" and unit.row_group is not None:
        listed = parquet_slice_items(
            str(unit.file), unit.row_group, unit.rows, unit.image_column, unit.id_column
        )
    else:
        listed = dataset_items(str(unit.file), IMAGE_EXTENSIONS, unit.image_column, unit.id_column)
    unique = UniqueIds(lambda _message: None)
    return (unique.one(ref) for ref in listed)


def read_unit(unit: Unit) -> Iterator[pa.Table]:
    """A read task: the unit's rows, BLOCK_ROWS at a time; the last row says so."""
    started = time.time()
    rows: list[InputRef] = []
    count = 0
    for ref in unit_inputs(unit):
        rows.append(ref)
        if len(rows) > BLOCK_ROWS:  # one held back: the last row must be known as last
            yield _block(unit, rows[:BLOCK_ROWS], count, False, started)
            count += BLOCK_ROWS
            del rows[:BLOCK_ROWS]
    if rows:
        yield _block(unit, rows, count, True, started)


def _block(unit: Unit, refs: list[InputRef], first: int, ends: bool, started: float) -> pa.Table:
    import pyarrow as pa

    n = len(refs)
    return pa.table(
        {
            "seq": pa.array([unit.seq] * n, pa.int64()),
            "unit": pa.array([unit.name] * n, pa.string()),
            "row": pa.array(range(first, first + n), pa.int64()),
            "last": pa.array([False] * (n - 1) + [ends], pa.bool_()),
            "id": pa.array([id_bytes(input_id(ref)) for ref in refs], pa.binary()),
            "file": pa.array([encode_ref(ref) for ref in refs], pa.binary()),
            "started": pa.array([started] * n, pa.float64()),
        }
    )


def unit_source(units: list[Unit]) -> Any:
    """A Ray Data ``Datasource`` over ``units``: one read task per unit."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class UnitSource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_name(self) -> str:
            return "ConvnextUnits"

        def get_read_tasks(self, parallelism: int, *args: Any, **kwargs: Any) -> list[Any]:
            return [
                ReadTask(
                    _reader(unit),
                    BlockMetadata(
                        num_rows=None, size_bytes=None, exec_stats=None, input_files=None
                    ),
                )
                for unit in units
            ]

    return UnitSource()


def _reader(unit: Unit) -> Any:
    def read() -> Iterator[pa.Table]:
        return read_unit(unit)

    return read
