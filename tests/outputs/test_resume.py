"""--resume: a run killed with SIGKILL mid-way, resumed, ends with exactly one record per input
and the predictions of an uninterrupted run; torn last lines, --retry-errors, refusals."""

from __future__ import annotations

import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import duckdb
import pytest
from helpers import assert_records_close

CLI = [sys.executable, "-m", "convnext_cli"]
COUNT = 96


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> Path:
    """96 inputs (the photos repeated) plus one broken file."""
    folder = tmp_path_factory.mktemp("many")
    for n in range(COUNT - 1):
        source = photos[n % len(photos)]
        shutil.copy(source, folder / f"{n:03d}{source.suffix}")
    (folder / "zz_broken.png").write_text("not an image")
    return folder


def run(args: Sequence[object], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, timeout=300, **kwargs)


def common(model: Path, command: str) -> list[str]:
    extra = ["-k", "3"] if command == "classify" else []
    return ["-m", str(model), "--device", "cpu", "--dtype", "float32", "-b", "4", *extra]


def records(path: Path, fmt: str, command: str) -> dict[str, object]:
    """path -> what the record says (predictions, embedding or error), one entry per input."""
    out: dict[str, object] = {}
    if fmt == "jsonl":
        for line in path.read_text().splitlines():
            record = json.loads(line)
            key = "predictions" if command == "classify" else "embedding"
            assert record["path"] not in out, f"duplicate {record['path']}"
            out[record["path"]] = record.get("error") or record[key]
    elif fmt == "csv":
        rows = list(csv.reader(io.StringIO(path.read_text())))
        for row in rows[1:]:
            if command == "classify":
                value = row[5] or (row[2], int(row[3]), round(float(row[4]), 5))
                out.setdefault(row[0], []).append(value)  # type: ignore[attr-defined]
            else:
                assert row[0] not in out, f"duplicate {row[0]}"
                out[row[0]] = row[1] or [round(float(v), 5) for v in row[2:]]
    else:
        column = "predictions" if command == "classify" else "embedding"
        query = f"SELECT path, error, {column} FROM '{path}'"
        for record_path, error, value in duckdb.connect().execute(query).fetchall():
            assert record_path not in out, f"duplicate {record_path}"
            out[record_path] = error or value
    return out


def kill_when_started(args: Sequence[object], output: Path, fmt: str) -> None:
    """Start a run and SIGKILL it once some records are on disk, before it can finish."""
    proc = subprocess.Popen(
        [*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    partial = output.with_name(f".{output.name}.partial")
    parts = output.with_name(f".{output.name}.parts")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        started = partial.exists() and partial.stat().st_size > 2000
        if fmt == "parquet":
            started = parts.is_dir() and any(parts.glob("part-*.parquet"))
        if started:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize(
    "command,fmt",
    [
        ("classify", "jsonl"),
        ("classify", "csv"),
        ("classify", "parquet"),
        ("embed", "jsonl"),
        ("embed", "csv"),
        ("embed", "parquet"),
    ],
)
def test_kill_9_then_resume_gives_one_record_per_input(
    command: str, fmt: str, many: Path, v1_checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    reference = tmp_path / f"reference.{fmt}"
    done = run([command, many, *common(v1_checkpoint, command), "-o", reference])
    assert done.returncode == 1, done.stderr  # the broken file
    expected = records(reference, fmt, command)
    assert len(expected) == COUNT

    output = tmp_path / f"out.{fmt}"
    args = [command, many, *common(v1_checkpoint, command), "-o", output]
    monkeypatch.setenv("CONVNEXT_PARQUET_ROWS_PER_PART", "8")  # parts early, for the kill
    kill_when_started([*args, "--workers", "0"], output, fmt)
    assert not output.exists()  # the target is only ever written whole

    resumed = run([*args, "--resume"])
    assert resumed.returncode == 1, resumed.stderr
    line = [x for x in resumed.stderr.decode().splitlines() if x.startswith("resuming")]
    assert line and "already done" in line[0]
    done_before = int(line[0].split(": ")[1].split()[0])
    assert 0 < done_before < COUNT
    got = records(output, fmt, command)
    # scores are written at full precision: a batch made of other images may change their
    # last float32 bits; labels, indices and paths are exact
    assert_records_close(got, expected)
    assert not list(tmp_path.glob(".out.*.partial")) and not list(tmp_path.glob(".*.parts"))


def test_torn_last_line_is_redone(many: Path, v1_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    args = ["classify", many, *common(v1_checkpoint, "classify"), "-o", output]
    assert run(args).returncode == 1
    lines = output.read_bytes().splitlines(keepends=True)
    partial = tmp_path / ".out.jsonl.partial"
    partial.write_bytes(b"".join(lines[:10]) + lines[10][:25])  # a kill in the middle of a line
    output.unlink()
    resumed = run([*args, "--resume"])
    assert resumed.returncode == 1
    assert "10 inputs already done" in resumed.stderr.decode()
    assert "1 cut-off record(s) to redo" in resumed.stderr.decode()
    got = [json.loads(line)["path"] for line in output.read_text().splitlines()]
    assert sorted(got) == sorted(json.loads(line)["path"] for line in lines)


def test_retry_errors_and_error_records_count_as_done(
    many: Path, v1_checkpoint: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    args = ["classify", many, *common(v1_checkpoint, "classify"), "-o", output]
    assert run(args).returncode == 1
    again = run([*args, "--resume"])
    assert again.returncode == 0  # nothing left to do: the error record counts as done
    assert f"{COUNT} inputs already done\n" in again.stderr.decode()
    (many / "zz_broken.png").write_bytes((many / "000.png").read_bytes())
    try:
        retried = run([*args, "--resume", "--retry-errors"])
    finally:
        (many / "zz_broken.png").write_text("not an image")
    assert retried.returncode == 0, retried.stderr
    assert "1 failed ones to retry" in retried.stderr.decode()
    by_path = {json.loads(x)["path"]: json.loads(x) for x in output.read_text().splitlines()}
    assert len(by_path) == COUNT and "predictions" in by_path[str(many / "zz_broken.png")]


def test_a_different_model_or_top_k_is_refused(
    many: Path, v1_checkpoint: Path, v2_checkpoint: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out.csv"
    args = ["classify", many, "--device", "cpu", "--dtype", "float32", "-o", output]
    assert run([*args, "-m", v1_checkpoint, "-k", "3"]).returncode == 1
    before = output.read_bytes()
    for change in (["-m", v1_checkpoint, "-k", "2"], ["-m", v2_checkpoint, "-k", "3"]):
        refused = run([*args, *change, "--resume"])
        assert refused.returncode == 2
        (message,) = refused.stderr.decode().splitlines()
        assert message.startswith("error: ") and "differ" in message
        assert output.read_bytes() == before
    forced = run([*args, "-m", v1_checkpoint, "-k", "2", "--resume", "--force-resume"])
    assert forced.returncode == 0


def test_resume_needs_a_resumable_output(many: Path, v1_checkpoint: Path, tmp_path: Path) -> None:
    for extra in ([], ["-o", tmp_path / "x.json"]):
        out = run(["classify", many, "-m", v1_checkpoint, "--resume", *extra])
        assert out.returncode == 2
        assert "--resume needs -o FILE" in out.stderr.decode()


def test_kept_records_are_copied_record_by_record(tmp_path: Path) -> None:
    """What a resume keeps goes through a file, a few records at a time (here 40 bytes), each
    once (first seen wins), without torn ones, with the header, across every source."""
    from convnext_cli.outputs import resume

    header = b"path,error,f0,f1\n"
    rows = [f"p{n},,{n}.5,{n}.25\n".encode() for n in range(10)]
    copy = tmp_path / ".out.csv.resume"
    partial = tmp_path / ".out.csv.partial"
    target = tmp_path / "out.csv"
    copy.write_bytes(header + b"".join(rows[:3]))
    partial.write_bytes(header + b"".join(rows[:6]) + b'p6,"cannot decode",,\n' + b"p7,,1")
    target.write_bytes(header + b"".join(rows[5:]))  # an older, complete file
    recorded = resume.keep_text_records([copy, partial, target], copy, "csv", False)
    assert recorded.torn == 1 and recorded.header == header
    kept = [r for chunk in resume.kept_records(copy, recorded, chunk_bytes=40) for r in chunk]
    expected = [*rows[:6], b"p6,cannot decode,,\n", *rows[7:]]
    assert kept == expected and recorded.kept == len(expected)
    assert recorded.ids == {f"p{n}" for n in range(10)}
    assert copy.read_bytes() == header + b"".join(expected)
    assert not copy.with_name(copy.name + ".tmp").exists()
    retried = resume.keep_text_records([partial], copy, "csv", True)
    assert retried.errors_dropped == 1 and "p6" not in retried.ids


def test_resume_holds_the_ids_not_the_records(tmp_path: Path) -> None:
    """200,000 records (50 MB of JSON lines) kept by a resume: what Python allocates on the
    way stays under 80 MB (the set of ids and a few MiB of records at a time); holding the
    records, as before, took 147 MB."""
    import tracemalloc

    from convnext_cli.engine.job import Job, open_resumable

    output = tmp_path / "out.jsonl"
    preds = json.dumps([{"label": "tabby, tabby cat", "index": 281, "score": 0.5}] * 3)
    with open(output, "w") as out:
        for n in range(200_000):
            out.write(f'{{"path": "/photos/{n:07d}/IMG_{n:07d}.jpg", "predictions": {preds}}}\n')
    before = output.read_bytes()
    # made by hand, with no record of the run that wrote it: forced
    job = Job("classify", [], "model", "jsonl", output, top_k=3, resume=True, force_resume=True)
    tracemalloc.start()
    try:
        todo, writer = open_resumable(job, "jsonl", iter(["/photos/new.jpg"]), {"top_k": 3})
        assert list(todo) == ["/photos/new.jpg"]
        writer.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert output.read_bytes() == before  # every record kept, once, in order
    assert not (tmp_path / ".out.jsonl.resume").exists()
    assert peak < 80 * 2**20, f"{peak / 2**20:.0f} MB"
