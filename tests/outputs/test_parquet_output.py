"""Parquet output: schema, parts on disk while running, one file at the end, read by DuckDB."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from convnext_cli.outputs.files import OutputFile
from convnext_cli.outputs.parquet import ParquetRecordWriter, parts_folder, read_metadata
from convnext_cli.results import Prediction, Result


def classify_results(start: int, count: int) -> list[Result]:
    out = []
    for n in range(start, start + count):
        if n % 5 == 3:
            out.append(Result(path=f"img{n}.jpg", error="cannot decode image: broken"))
        else:
            preds = [Prediction(f"label {n}", n, 0.75), Prediction("other, thing", 7, 0.25)]
            out.append(Result(path=f"img{n}.jpg", predictions=preds))
    return out


def test_classify_parts_then_one_file(tmp_path: Path) -> None:
    target = tmp_path / "labels.parquet"
    metadata = {"model": "m", "top_k": 2}
    writer = ParquetRecordWriter(OutputFile(target), "classify", metadata, rows_per_part=4)
    writer.write(classify_results(0, 5))
    writer.write(classify_results(5, 5))
    parts = sorted(parts_folder(target).glob("part-*.parquet"))
    assert len(parts) == 2 and not target.exists()  # finished rows already on disk
    writer.write([Result(path="bad\udcff name.png", error="empty file")])
    writer.close()
    assert not parts_folder(target).exists()
    assert read_metadata(target) == {"model": "m", "top_k": 2}

    con = duckdb.connect()
    rows = con.execute(
        f"SELECT path, error, label, index, score, len(predictions) FROM '{target}'"
    ).fetchall()
    assert len(rows) == 11
    assert rows[0] == ("img0.jpg", None, "label 0", 0, 0.75, 2)
    assert rows[3] == ("img3.jpg", "cannot decode image: broken", None, None, None, None)
    assert rows[-1][0] == '"bad\\udcff name.png"'  # as in CSV: a JSON string when not plain
    row = con.execute(
        f"SELECT predictions[2].label FROM '{target}' WHERE path = 'img1.jpg'"
    ).fetchone()
    assert row is not None
    (top,) = row
    assert top == "other, thing"


def test_embed_fixed_size_list(tmp_path: Path) -> None:
    target = tmp_path / "emb.parquet"
    writer = ParquetRecordWriter(OutputFile(target), "embed", {}, rows_per_part=2)
    writer.write([Result(path="e0", error="empty file")])
    rows = [Result(path=f"p{n}", embedding=torch.arange(3.0) + n) for n in range(3)]
    writer.write(rows)
    writer.close()
    table = pq.read_table(target)
    vector = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(vector) and vector.list_size == 3
    assert vector.value_type == pa.float32()
    assert table.column("embedding").to_pylist() == [None, [0, 1, 2], [1, 2, 3], [2, 3, 4]]
    query = f"SELECT array_length(embedding) FROM '{target}' WHERE path = 'p0'"
    assert duckdb.connect().execute(query).fetchall() == [(3,)]


def test_abort_keeps_finished_rows_as_parts(tmp_path: Path) -> None:
    """Kept (a resumed run, as a kill does) the finished rows stay as parts for --resume;
    dropped (an error ended a fresh run, as any format's partial file is) they go."""
    dropped = tmp_path / "dropped.parquet"
    writer = ParquetRecordWriter(OutputFile(dropped), "classify", {}, rows_per_part=1)
    writer.write(classify_results(0, 3))
    assert list(parts_folder(dropped).glob("part-*.parquet"))
    writer.abort()
    assert os.listdir(tmp_path) == []
    target = tmp_path / "x.parquet"
    writer = ParquetRecordWriter(OutputFile(target), "classify", {}, rows_per_part=100)
    writer.write(classify_results(0, 3))
    writer.abort(keep=True)
    (part,) = parts_folder(target).glob("part-*.parquet")
    assert pq.read_table(part).num_rows == 3 and not target.exists()
    # a later writer continues the numbering and the final file holds both runs' rows
    again = ParquetRecordWriter(OutputFile(target), "classify", {"run": 2}, resume=True)
    again.write(classify_results(3, 2))
    again.close()
    assert pq.read_table(target).column("path").to_pylist() == [f"img{n}.jpg" for n in range(5)]
    assert json.loads(pq.read_schema(target).metadata[b"convnext_cli"]) == {"run": 2}
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))
