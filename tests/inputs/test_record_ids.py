"""Every input has a record of its own, after any number of ``--resume``: inputs that share a
path or an id (two tar members of one name, duplicate Parquet ids, a null id's ``FILE#ROW``
that another row has, the same file named twice or reached twice) get ids of their own
(``X#2``, ``X#3`` ...), said once on stderr, the same in every run."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factories import make_shard
from PIL import Image

CLI = [sys.executable, "-m", "convnext_cli"]


def run(*args: object, timeout: float = 300) -> tuple[int, str, float]:
    start = time.monotonic()
    out = subprocess.run([*CLI, *map(str, args)], capture_output=True, timeout=timeout)
    return out.returncode, out.stderr.decode(), time.monotonic() - start


def ids_of(path: Path, fmt: str) -> list[str]:
    """The record ids in an output file, one per record (CSV: one per group of rank rows)."""
    if fmt == "jsonl":
        return [json.loads(line)["path"] for line in path.read_text().splitlines()]
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(path.read_text())))[1:]
        out: list[str] = []
        for row in rows:
            if row[1] == "1" or row[5]:  # rank 1 starts a record; an error is one row
                out.append(row[0])
        return out
    return [r[0] for r in duckdb.connect().execute(f"SELECT path FROM '{path}'").fetchall()]


def cut(path: Path, fmt: str, keep: int) -> None:
    """Leave only the first ``keep`` records of a finished output (as if killed), as an
    interrupted run leaves them: in the partial file beside the target."""
    partial = path.with_name(f".{path.name}.partial")
    if fmt == "jsonl":
        lines = path.read_text().splitlines(keepends=True)
        partial.write_text("".join(lines[:keep]))
    elif fmt == "csv":
        lines = path.read_text().splitlines(keepends=True)
        partial.write_text("".join(lines[: 1 + 3 * keep]))  # header, 3 ranks per record
    else:
        table = pq.read_table(path).slice(0, keep)
        parts = path.with_name(f".{path.name}.parts")
        parts.mkdir()
        metadata = pq.read_schema(path).metadata
        pq.write_table(table.replace_schema_metadata(metadata), parts / "part-000000.parquet")
    path.unlink()


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> dict[str, list]:
    """name -> (the command-line inputs, how many inputs they are)."""
    root = tmp_path_factory.mktemp("shared_ids")
    a, b = photos[0], photos[4]
    shard = make_shard(
        root / "dup.tar",
        [("x.png", a.read_bytes()), ("x.png", b.read_bytes()), ("x.png", photos[1].read_bytes())],
    )
    dup_ids = root / "dup_ids.parquet"
    pq.write_table(
        pa.table(
            {"id": ["k", "k", "k"], "image": [a.read_bytes(), b.read_bytes(), a.read_bytes()]}
        ),
        dup_ids,
    )
    null_ids = root / "null_ids.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [f"{null_ids}#1", None, None],
                "image": [a.read_bytes(), b.read_bytes(), a.read_bytes()],
            }
        ),
        null_ids,
    )
    naming_a = root / "naming_a.parquet"  # an id that is the path of a file given too
    pq.write_table(pa.table({"id": [str(a), None], "image": [b.read_bytes()] * 2}), naming_a)
    folder = root / "folder"
    folder.mkdir()
    (folder / "one.png").write_bytes(a.read_bytes())
    (folder / "two.jpg").write_bytes(b.read_bytes())
    return {
        "tar members of one name": [[shard], 3],
        "the same shard twice": [[shard, shard], 6],
        "duplicate parquet ids": [[dup_ids], 3],
        "a null id next to its FILE#ROW": [[null_ids], 3],
        "the same file twice": [[a, a, a], 3],
        "a folder and a file in it": [[folder, folder / "one.png", f"{folder}/"], 5],
        "a parquet id naming a file given too": [[a, naming_a], 3],
    }


CASES = [
    "tar members of one name",
    "the same shard twice",
    "duplicate parquet ids",
    "a null id next to its FILE#ROW",
    "the same file twice",
    "a folder and a file in it",
    "a parquet id naming a file given too",
]


PAIRS = [(case, "jsonl") for case in CASES] + [
    (case, fmt)
    for case in ("tar members of one name", "a null id next to its FILE#ROW")
    for fmt in ("csv", "parquet")
]


@pytest.mark.parametrize("case,fmt", PAIRS)
def test_shared_ids_keep_one_record_per_input_through_resumes(
    case: str, fmt: str, cases: dict, v1_checkpoint: Path, tmp_path: Path
) -> None:
    inputs, count = cases[case]
    output = tmp_path / f"out.{fmt}"
    args = ["classify", *inputs, "-m", v1_checkpoint, "-k", "3", "--dtype", "float32", "-o", output]
    code, err, seconds = run(*args)
    assert code == 0, err
    assert "Traceback" not in err and seconds < 120
    collisions = [line for line in err.splitlines() if "more than one input has this id" in line]
    assert len(collisions) == 1, err  # said once, on one line
    first = ids_of(output, fmt)
    assert len(first) == count and len(set(first)) == count, first
    cut(output, fmt, 1)  # as if killed after the first record
    code, err, _seconds = run(*args, "--resume")
    assert code == 0 and "Traceback" not in err, err
    assert "1 inputs already done" in err
    assert sorted(ids_of(output, fmt)) == sorted(first)
    code, err, _seconds = run(*args, "--resume")  # again: all done, nothing lost
    assert code == 0 and "Traceback" not in err, err
    assert f"{count} inputs already done" in err
    assert sorted(ids_of(output, fmt)) == sorted(first)


def test_renamed_inputs_read_their_own_bytes(
    cases: dict, v1_checkpoint: Path, tmp_path: Path, photos: list[Path]
) -> None:
    """X#2 is the second input named X, classified from its own bytes; a file named twice
    reads the file."""
    shard = cases["tar members of one name"][0][0]
    a, b = photos[0], photos[4]
    code, err, _ = run(
        "classify",
        a,
        b,
        photos[1],
        shard,
        a,
        "-m",
        v1_checkpoint,
        "-k",
        "3",
        "-o",
        tmp_path / "o.jsonl",
    )
    assert code == 0, err
    records = {
        r["path"]: [p["index"] for p in r["predictions"]]
        for r in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())
    }
    assert records[f"{shard}#x.png"] == records[str(a)]
    assert records[f"{shard}#x.png#2"] == records[str(b)]  # the second x.png: b's bytes
    assert records[f"{shard}#x.png#3"] == records[str(photos[1])]
    assert records[f"{a}#2"] == records[str(a)]
    assert len(records) == 7


def test_unique_ids_in_the_listing(tmp_path: Path) -> None:
    from convnext_cli.inputs.expand import UniqueIds, input_id

    said: list[str] = []
    unique = UniqueIds(said.append)
    refs = [*unique.paths(["a.jpg", "b.jpg"]), *unique.paths(["a.jpg", "c.jpg", "a.jpg#2"])]
    refs.append(unique.one("a.jpg"))
    assert [input_id(r) for r in refs] == [
        "a.jpg",
        "b.jpg",
        "a.jpg#2",
        "c.jpg",
        "a.jpg#2#2",
        "a.jpg#3",
    ]
    assert len(said) == 1
    assert os.path.basename(str(refs[2].file)) == "a.jpg"  # type: ignore[union-attr]


def tiny_image(n: int) -> bytes:
    """An 8x8 PNG of its own colour."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (n % 256, (n // 256) % 256, (n * 7) % 256)).save(buffer, "PNG")
    return buffer.getvalue()


def kill_after(args: list[object], output: Path, lines: int) -> None:
    """Start a run and SIGKILL it once ``lines`` records are in its partial file."""
    proc = subprocess.Popen(
        [*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    partial = output.with_name(f".{output.name}.partial")
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_kill_9_and_resume_of_10000_inputs_with_shared_ids(tmp_path: Path) -> None:
    """10,000 inputs, most sharing their name with another (tar members of one name, Parquet
    ids repeated or null, a folder named twice): killed with SIGKILL twice and resumed, the
    run ends with exactly 10,000 records, the uninterrupted run's."""
    import factories

    pre = dict(factories.IMAGENET_PREPROCESSOR, size={"shortest_edge": 32})
    model = factories.save_hf(factories.hf_model(num_labels=10, seed=3), tmp_path / "m", pre)
    shard = make_shard(
        tmp_path / "dup.tar", [(f"{n // 2:05d}.png", tiny_image(n)) for n in range(4000)]
    )
    table = pa.table(
        {
            "id": [None if n % 10 == 0 else f"k{n // 3}" for n in range(4000)],
            "image": [tiny_image(4000 + n) for n in range(4000)],
        }
    )
    rows = tmp_path / "dup.parquet"
    pq.write_table(table, rows, row_group_size=500)
    folder = tmp_path / "loose"
    folder.mkdir()
    for n in range(1000):
        (folder / f"{n:04d}.png").write_bytes(tiny_image(8000 + n))
    inputs = [shard, rows, folder, f"{folder}/"]
    common = ["classify", *inputs, "-m", model, "-k", "3", "--dtype", "float32", "-b", "64"]

    reference = tmp_path / "reference.jsonl"
    code, err, _ = run(*common, "-o", reference, timeout=1800)
    assert code == 0 and "Traceback" not in err, err
    expected = {r["path"]: r for r in map(json.loads, reference.read_text().splitlines())}
    assert len(expected) == 10_000

    output = tmp_path / "out.jsonl"
    kill_after([*common, "-o", output], output, 2500)
    kill_after([*common, "-o", output, "--resume"], output, 6000)
    start = time.monotonic()
    code, err, _ = run(*common, "-o", output, "--resume", timeout=1800)
    assert code == 0 and "Traceback" not in err, err
    assert time.monotonic() - start < 1800  # a minute or two on an idle machine
    got = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(got) == 10_000
    by_path = {r["path"]: r for r in got}
    assert by_path.keys() == expected.keys()
    for path, record in expected.items():
        ours = by_path[path]["predictions"]
        want = record["predictions"]
        assert [p["index"] for p in ours] == [p["index"] for p in want], path
        assert [p["score"] for p in ours] == pytest.approx(
            [p["score"] for p in want], rel=1e-4, abs=1e-6
        )
